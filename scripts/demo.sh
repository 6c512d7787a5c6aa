#!/usr/bin/env bash
# The main job end to end on the embedded defaults (local store directory + redb index): builds a
# real Debian-based image (debootstrap + apt, cached), pushes it and its security update with skopeo
# to a docker-registry on loopback, converts the image with starlight-convert, then puts
# starlight-gateway in front of the registry and fetches a fresh delta bundle of the image and an
# update bundle (the update converted on demand), prints what each carried, and stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)" >&2; exit 1; }

bash scripts/install-deps.sh
images="${STARLIGHT_IMAGES:-/var/tmp/starlight-images}"
bash scripts/debian-image.sh "$images"
cargo build --locked -p starlight-converter -p starlight-gateway -p starlight-worker --bins
convert=target/debug/starlight-convert
gateway=target/debug/starlight-gateway
pull=target/debug/starlight-pull

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
gateway_pid=
mount_pid=
trap 'st=$?; kill $mount_pid $gateway_pid "$registry_pid" 2>/dev/null; wait $mount_pid $gateway_pid "$registry_pid" 2>/dev/null || true; rm -rf "$work"; exit $st' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

for tag in app app-v2; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$images/oci:$tag" "docker://127.0.0.1:$port/demo/redis:$tag"
done
echo "== converting demo/redis:app from the registry (store $work/data/store, index $work/data/index.redb)"
$convert --store "$work/data/store" --index "$work/data/index.redb" --plain-http "docker://127.0.0.1:$port/demo/redis:app"
echo "== stored: $(du -sb "$work/data/store/blobs" | cut -f1) bytes of seekable blobs, $(du -sb "$work/data/store/tocs" | cut -f1) bytes of TOCs"

gport=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
STARLIGHT_LOG=warn $gateway --upstream "http://127.0.0.1:$port" --listen "127.0.0.1:$gport" \
  --store "$work/data/store" --index "$work/data/index.redb" >"$work/gateway.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$gport/readyz" >/dev/null && break; sleep 0.1; done
bundle() { # $1 query, $2 output file: prints the Starlight response headers and the size
  curl -fsS -D "$work/headers" -o "$2" "http://127.0.0.1:$gport/v2/demo/redis/_starlight/bundle?$1"
  grep -i '^starlight-' "$work/headers" | tr -d '\r' | sed 's/^/   /'
  echo "   $(stat -c %s "$2") bytes"
}
gzip_bytes() { # sum of the gzip layer sizes of a tag, as a plain pull downloads them
  /usr/bin/python3 - "$images/oci" "$1" <<'PY'
import json, sys, os
layout, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(layout, "index.json")))
d = next(m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
m = json.load(open(os.path.join(layout, "blobs/sha256", d["digest"][7:])))
print(sum(l["size"] for l in m["layers"]))
PY
}
echo "== fresh delta bundle of demo/redis:app through the gateway (plain pull: $(gzip_bytes app) bytes of gzip layers)"
bundle "to=app" "$work/app.bundle"
v1=$(grep -i '^starlight-image:' "$work/headers" | tr -d '\r' | awk '{print $2}')
echo "== update bundle app -> app-v2 (have=$v1; app-v2 is converted on demand)"
bundle "to=app-v2&have=$v1" "$work/update.bundle"
echo "== the gateway's conversions: $(curl -fs "http://127.0.0.1:$gport/metrics" | grep '^starlight_gateway_conversions_total' | tr '\n' ' ')"

# The worker: pull through the gateway into a content-addressed store, export, update, mount.
wstore="$work/worker"
echo "== starlight-pull demo/redis:app (a fresh worker)"
$pull --gateway "http://127.0.0.1:$gport" --store "$wstore" demo/redis:app
$pull --store "$wstore" export demo/redis:app "$work/rootfs"
echo "   rootfs: $(find "$work/rootfs" | wc -l) entries; chroot runs: $(chroot "$work/rootfs" /usr/bin/redis-server --version | cut -c1-40)"
echo "== starlight-pull demo/redis:app-v2 (the update: only what app lacks)"
$pull --gateway "http://127.0.0.1:$gport" --store "$wstore" demo/redis:app-v2
$pull --store "$wstore" list
echo "== mounting demo/redis:app-v2 from the store with FUSE, running redis-server from it"
mkdir -p "$work/mnt"
$pull --store "$wstore" mount demo/redis:app-v2 "$work/mnt" >"$work/mount.log" &
mount_pid=$!
for _ in $(seq 100); do grep -q '^mounted' "$work/mount.log" 2>/dev/null && break; sleep 0.05; done
echo "   $(chroot "$work/mnt" /usr/bin/redis-server --version | cut -c1-40)"
kill -TERM "$mount_pid"; wait "$mount_pid"; mount_pid=
cat "$work/mount.log" | sed 's/^/   /'
