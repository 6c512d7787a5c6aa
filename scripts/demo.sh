#!/usr/bin/env bash
# The main job end to end on the embedded defaults (local store directory + redb index): builds a
# real Debian-based image (debootstrap + apt, cached), pushes it with skopeo to a docker-registry on
# loopback, converts it with starlight-convert from the registry and its update from the registry,
# prints what was stored, and stops the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)" >&2; exit 1; }

bash scripts/install-deps.sh
images="${STARLIGHT_IMAGES:-/var/tmp/starlight-images}"
bash scripts/debian-image.sh "$images"
cargo build --locked -p starlight-converter --bin starlight-convert
convert=target/debug/starlight-convert

work=$(mktemp -d)
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
trap 'kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

for tag in app app-v2; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$images/oci:$tag" "docker://127.0.0.1:$port/demo/redis:$tag"
done
echo "== converting demo/redis:app from the registry (store $work/data/store, index $work/data/index.redb)"
$convert --store "$work/data/store" --index "$work/data/index.redb" --plain-http "docker://127.0.0.1:$port/demo/redis:app"
echo "== converting the update demo/redis:app-v2 (only new layers and new contents are stored)"
$convert --store "$work/data/store" --index "$work/data/index.redb" --plain-http "docker://127.0.0.1:$port/demo/redis:app-v2"
echo "== stored: $(du -sb "$work/data/store/blobs" | cut -f1) bytes of seekable blobs, $(du -sb "$work/data/store/tocs" | cut -f1) bytes of TOCs"
