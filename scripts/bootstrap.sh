#!/usr/bin/env bash
# Installs everything nodemesh's demo, tests and benchmarks need on a Debian 12 machine, as root.
# Idempotent and quick when already done: apt runs only for missing packages, pip only when
# pyproject.toml changed. Every missing prerequisite is reported in one line.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.nodemesh-installed"

die() { echo "nodemesh setup: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, eBPF and apt need it)"
command -v apt-get >/dev/null || die "apt-get not found: a Debian 12 machine is required"

APT_PACKAGES=(
  python3-bpfcc bpftool iproute2 nftables iputils-ping tcpdump procps
  stunnel4 nghttp2-proxy tinyproxy haproxy nginx-light wrk nodejs
  golang-cfssl
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if [ "$p" = nodejs ] && command -v node >/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

KREL="$(uname -r)"
KDIR="/lib/modules/$KREL"
need_headers=0
if [ ! -e "$KDIR/build/include/uapi/linux/bpf.h" ] && [ ! -e "$KDIR/build/include/generated/uapi/linux/version.h" ]; then
  need_headers=1
  dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" \
    || missing+=(linux-headers-amd64)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "nodemesh setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Services from these packages must not start on install: the tests start their own copies.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq >/dev/null || die "apt-get update failed (no access to Debian's package mirror?)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
fi

# bcc compiles programs at run time against kernel headers. When the running kernel ships none,
# Debian's generic headers serve for programs that use only uapi headers.
if [ "$need_headers" = 1 ]; then
  arch_dir="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)"
  common_dir="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || die "kernel headers missing and linux-headers-amd64 gave none"
  mkdir -p "$KDIR"
  ln -sfn "$arch_dir" "$KDIR/build"
  ln -sfn "$common_dir" "$KDIR/source"
fi

# bpffs for pinned links and maps.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf"
fi

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
  || die "Python >= 3.11 required ($PY is $("$PY" --version 2>&1))"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || die "cannot create a virtualenv with $PY (is the venv module installed?)"
fi

# bcc is Debian's (python3-bpfcc); PyPI's 'bcc' is another project. Link the package into the venv.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -d /usr/lib/python3/dist-packages/bcc ] || die "python3-bpfcc is installed but its bcc package is missing"
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  echo "nodemesh setup: installing the project into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' \
    || die "pip install failed (see the output above)"
  echo "$want" > "$STAMP"
fi

"$VENV/bin/python" -c 'import bcc' 2>/dev/null || die "bcc does not import in $VENV"

# kubectl (with its built-in kustomize) renders the manifests in the tests; this machine image ships it.
command -v kubectl >/dev/null || echo "nodemesh setup: warning: kubectl not found; the manifest tests will fail" >&2
