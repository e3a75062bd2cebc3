#!/usr/bin/env bash
# End-to-end check on the real cluster: two pods on different nodes, the namespace enrolled with the
# ambient label, traffic that must become mTLS (the agents' metrics say so) and a policy that must deny.
set -euo pipefail
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
NS=nodemesh-e2e
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec:
  nodeSelector: {kubernetes.io/hostname: nm-worker}
  containers:
    - {name: echo, image: busybox:1.36, command: [sh, -c, "while true; do nc -lk -p 8080 -e cat; done"]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  nodeSelector: {kubernetes.io/hostname: nm-server}
  containers:
    - {name: sleep, image: busybox:1.36, command: [sleep, "3600"]}
YAML
kubectl -n "$NS" wait --for=condition=Ready pod/server pod/client --timeout=120s
kubectl label namespace "$NS" istio.io/dataplane-mode=ambient --overwrite
for _ in $(seq 20); do
  [ "$(kubectl -n "$NS" get pod client -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}')" \
    = enabled ] && break
  sleep 1
done
SERVER_IP=$(kubectl -n "$NS" get pod server -o jsonpath='{.status.podIP}')
out=$(kubectl -n "$NS" exec client -- sh -c "echo hello | nc -w 3 $SERVER_IP 8080")
[ "$out" = hello ] || { echo "e2e: echo through the mesh failed: '$out'"; exit 1; }
AGENT=$(kubectl -n nodemesh-system get pod -l app.kubernetes.io/name=nodemesh-agent \
  --field-selector spec.nodeName=nm-worker -o name)
kubectl -n nodemesh-system exec "$AGENT" -- python3 -c \
  "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15020/metrics').read().decode())" \
  | grep 'istio_tcp_connections_opened_total{.*connection_security_policy="mutual_tls"' >/dev/null \
  || { echo "e2e: no mutual_tls connection in the destination agent's metrics"; exit 1; }
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-8080}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
YAML
sleep 2
if kubectl -n "$NS" exec client -- sh -c "echo hello | nc -w 3 $SERVER_IP 8080" | grep -q hello; then
  echo "e2e: the DENY policy did not deny"; exit 1
fi
echo "e2e: ok (mTLS across nodes, policy denial)"
