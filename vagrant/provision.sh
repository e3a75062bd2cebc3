#!/usr/bin/env bash
# Provisions one lab VM: kernel headers for bcc, k3s (server or agent), the nodemesh image imported into
# k3s's containerd, and on the server the manifests and the end-to-end check.
set -euo pipefail
: "${ROLE:?server or agent}" "${NODE_IP:?}" "${SERVER_IP:?}" "${K3S_VERSION:?}"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl ca-certificates linux-headers-amd64 buildah python3 \
  iproute2 nftables >/dev/null
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

TOKEN_FILE=/nodemesh/vagrant/.k3s-token
if [ "$ROLE" = server ]; then
  curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$K3S_VERSION" sh -s - server \
    --node-ip "$NODE_IP" --flannel-iface eth1 --write-kubeconfig-mode 0600
  cp /var/lib/rancher/k3s/server/node-token "$TOKEN_FILE"
else
  for _ in $(seq 60); do [ -s "$TOKEN_FILE" ] && break; sleep 5; done
  curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$K3S_VERSION" K3S_URL="https://$SERVER_IP:6443" \
    K3S_TOKEN="$(cat "$TOKEN_FILE")" sh -s - agent --node-ip "$NODE_IP" --flannel-iface eth1
fi

# Build the image on every node and hand it to k3s's containerd (no registry needed).
cd /nodemesh
buildah bud -q -f daemonset/Containerfile -t ghcr.io/nodemesh/nodemesh:0.1.0 .
buildah push ghcr.io/nodemesh/nodemesh:0.1.0 oci-archive:/tmp/nodemesh.tar
k3s ctr images import /tmp/nodemesh.tar

if [ "$ROLE" = server ]; then
  bash /nodemesh/vagrant/deploy.sh
  bash /nodemesh/vagrant/e2e.sh
fi
