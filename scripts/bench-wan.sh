#!/usr/bin/env bash
# The WAN benchmark in one command: installs what it needs, builds the release binaries, builds
# the ten application images (cached in /var/tmp/starlight-bench-images) and runs the sweep.
# Usage: scripts/bench-wan.sh [--quick] [more `starlight-bench wan` options]
#   --quick: redis, nginx and python at RTT 150 ms, one round (under 10 minutes once the images
#   are built; building all twenty takes about 20 minutes the first time).
# Results: bench/wan/{wan.json,wan.md,wan.svg} unless --out says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN, containerd, FUSE, debootstrap)" >&2; exit 1; }
bash scripts/install-deps.sh
cargo build --release --locked -p starlight-bench -p starlight-gateway -p starlight-worker
case " $* " in *" --out "*|*" --out="*) out=() ;; *) out=(--out bench/wan) ;; esac
exec ./target/release/starlight-bench wan "${out[@]}" "$@"
