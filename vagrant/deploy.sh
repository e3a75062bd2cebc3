#!/usr/bin/env bash
# Creates the CA material (root kept on this VM only; the cluster gets the intermediate) and deploys
# daemonset/ with kustomize.
set -euo pipefail
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
CA_DIR=/root/nodemesh-ca
python3 -m venv /opt/nodemesh-cli && /opt/nodemesh-cli/bin/pip install -q /nodemesh
[ -d "$CA_DIR" ] || /opt/nodemesh-cli/bin/nodemesh ca init "$CA_DIR"

kubectl apply -f /nodemesh/daemonset/base/namespace.yaml
# The cluster gets the signing intermediate and the root certificate; the root key stays on this VM.
kubectl -n nodemesh-system create secret generic nodemesh-ca-keys \
  --from-file=ca.json="$CA_DIR/ca.json" --from-file=ca-cert.pem="$CA_DIR/ca-cert.pem" \
  --from-file=ca-key.pem="$CA_DIR/ca-key.pem" --from-file=root-cert.pem="$CA_DIR/root-cert.pem" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl -n nodemesh-system create configmap nodemesh-ca-root \
  --from-file=root-cert.pem="$CA_DIR/root-cert.pem" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k /nodemesh/daemonset/base
kubectl -n nodemesh-system rollout status daemonset/nodemesh-agent --timeout=180s
kubectl -n nodemesh-system rollout status deployment/nodemesh-ca --timeout=180s
