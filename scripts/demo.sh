#!/usr/bin/env bash
# The main job end to end on the embedded defaults (local store directory + redb index): builds a
# real Debian-based image (debootstrap + apt, cached), pushes it and its security update with skopeo
# to a docker-registry on loopback, converts the image with starlight-convert, then puts
# starlight-gateway in front of the registry and fetches a fresh delta bundle of the image and an
# update bundle (the update converted on demand), prints what each carried. Then the worker pulls,
# exports, updates and mounts the image, and a private containerd with starlight-snapshotter runs
# both versions with `ctr run` and garbage-collects them. It stops everything it started.
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
containerd_pid=
snapshotter_pid=
# The snapshotter's mount processes outlive it by design: find them by their mount points.
# (The pattern's brackets keep grep from finding itself.)
snapshot_mounts() { grep -l -s -a "$work/snap/snapshot[s]" /proc/[0-9]*/cmdline | cut -d/ -f3 || true; }
cleanup() {
  kill $mount_pid $snapshotter_pid $containerd_pid $gateway_pid "$registry_pid" 2>/dev/null || true
  local m; m=$(snapshot_mounts)
  [ -z "$m" ] || kill $m 2>/dev/null || true
  wait $mount_pid $snapshotter_pid $containerd_pid $gateway_pid "$registry_pid" 2>/dev/null || true
  sleep 0.5
  grep " $work/" /proc/self/mountinfo | cut -d' ' -f5 | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap 'st=$?; cleanup; exit $st' EXIT
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

# containerd: the snapshotter serves Starlight images; `ctr run` starts them while they stream.
echo "== containerd + starlight-snapshotter: pull demo/redis:app into containerd, ctr run it"
csock="$work/containerd/containerd.sock"
ssock="$work/snap.sock"
mkdir -p "$work/containerd"
cat >"$work/containerd/config.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$csock"
[ttrpc]
  address = "$csock.ttrpc"
[proxy_plugins]
  [proxy_plugins.starlight]
    type = "snapshot"
    address = "$ssock"
TOML
target/debug/starlight-snapshotter --gateway "http://127.0.0.1:$gport" --root "$work/snap" --socket "$ssock" \
  >"$work/snapshotter.log" 2>&1 &
snapshotter_pid=$!
containerd --config "$work/containerd/config.toml" >"$work/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do ctr --address "$csock" version >/dev/null 2>&1 && [ -S "$ssock" ] && break; sleep 0.1; done
ctrc() { ctr --address "$csock" "$@"; }
$pull --gateway "http://127.0.0.1:$gport" --containerd "$csock" demo/redis:app
echo "   $(ctrc run --rm --snapshotter starlight "127.0.0.1:$gport/demo/redis:app" demo /usr/bin/redis-server --version | cut -c1-40)"
pulled() { cat "$work"/snap/snapshots/*/mount.log 2>/dev/null | grep -c '^pulled' || true; }
for _ in $(seq 600); do [ "$(pulled)" = 1 ] && break; sleep 0.1; done
echo "== the update, once demo/redis:app is whole: only the delta travels"
$pull --gateway "http://127.0.0.1:$gport" --containerd "$csock" demo/redis:app-v2
echo "   $(ctrc run --rm --snapshotter starlight "127.0.0.1:$gport/demo/redis:app-v2" demo2 /bin/cat /etc/debian_version)"
ctrc images ls -q | sed 's/^/   image: /'
for _ in $(seq 600); do [ "$(pulled)" = 2 ] && break; sleep 0.1; done
cat "$work"/snap/snapshots/*/mount.log | grep '^pulled' | sed 's/^/   /'
echo "== removing both images: containerd's GC removes their snapshots, the snapshotter their mounts and contents"
ctrc images rm --sync "127.0.0.1:$gport/demo/redis:app" "127.0.0.1:$gport/demo/redis:app-v2" >/dev/null
for _ in $(seq 100); do [ -z "$(ls -A "$work/snap/store/contents/sha256")" ] && [ -z "$(snapshot_mounts)" ] && break; sleep 0.1; done
echo "   contents left in the snapshotter's store: $(ls "$work/snap/store/contents/sha256" | wc -l); mount processes: $(snapshot_mounts | wc -w)"
