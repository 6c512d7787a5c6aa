#!/usr/bin/env bash
# Build Debian bookworm OCI test images without Docker (debootstrap + umoci).
# Usage: scripts/debian-image.sh [OUTDIR]     (default /var/tmp/starlight-images)
# Produces the OCI layout $OUTDIR/oci with tags:
#   base    1 layer : debootstrap --variant=minbase bookworm
#   app     2 layers: base + redis-server (entrypoint redis-server --protected-mode no)
#   app-v2  3 layers: app + `apt-get upgrade` from bookworm-updates/-security
# The debootstrap result is cached in $OUTDIR/cache/ so re-runs after a later
# failure are fast. Must run as root (chroot, mounts, device nodes).
set -euo pipefail

OUTDIR=${1:-/var/tmp/starlight-images}
OCI=$OUTDIR/oci
TAGS=(base app app-v2)
PY=/usr/bin/python3

# Python helper over the layout's index/manifests. $1 = check (exit 0 iff all
# TAGS exist) | sizes (compressed bytes per layer) | full (also gunzip each layer).
oci_info() {
  "$PY" - "$OCI" "$1" "${TAGS[@]}" <<'EOF'
import gzip, json, os, sys
oci, mode, tags = sys.argv[1], sys.argv[2], sys.argv[3:]
blob = lambda d: os.path.join(oci, "blobs", *d.split(":", 1))
try:
    idx = {m.get("annotations", {}).get("org.opencontainers.image.ref.name"): m
           for m in json.load(open(os.path.join(oci, "index.json")))["manifests"]}
except (OSError, ValueError, KeyError):
    sys.exit(1)
if mode == "check":
    sys.exit(0 if set(tags) <= idx.keys() else 1)
def usize(p):
    with gzip.open(p) as f:
        return sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
for t in tags:
    layers = json.load(open(blob(idx[t]["digest"])))["layers"]
    print(f"{t}: {len(layers)} layers, {sum(l['size'] for l in layers)} bytes compressed")
    for l in layers:
        extra = f", {usize(blob(l['digest']))} uncompressed" if mode == "full" else ""
        print(f"  {l['digest'][7:19]} {l['size']} compressed{extra}")
EOF
}

# Fast path: all tags present -> nothing to do.
if oci_info check; then
  echo "cached: $OCI already has tags ${TAGS[*]}"
  oci_info sizes
  exit 0
fi

# shellcheck source=lib-debian.sh
source "$(dirname "$0")/lib-debian.sh"
check_tools
start_work
find_mirrors
debootstrap_cached

L=$WORK/oci
umoci init --layout "$L"
# 2. base: unpack the empty image, fill rootfs, repack -> one layer.
log "building base"
umoci new --image "$L:base"
umoci unpack --image "$L:base" "$WORK/b-base"
tar -C "$WORK/b-base/rootfs" -xpf "$CACHE" "${TAR_OPTS[@]}"
umoci repack --image "$L:base" --history.created_by "debootstrap --variant=minbase bookworm" "$WORK/b-base"
rm -rf "$WORK/b-base"

# 3. app = base + redis-server (release suite only, so app-v2 has something to upgrade).
log "building app (redis-server)"
umoci unpack --image "$L:base" "$WORK/b-app"
in_chroot "$WORK/b-app/rootfs" "apt-get update
  apt-get install -y --no-install-recommends redis-server"
umoci repack --image "$L:app" --history.created_by "apt-get install redis-server" "$WORK/b-app"
rm -rf "$WORK/b-app"
umoci config --image "$L:app" --config.entrypoint redis-server \
  --config.entrypoint --protected-mode --config.entrypoint no --config.exposedports 6379/tcp

# 4. app-v2 = app + upgrades from bookworm-updates and bookworm-security.
log "building app-v2 (apt-get upgrade from updates/security)"
umoci unpack --image "$L:app" "$WORK/b-v2"
write_update_sources "$WORK/b-v2/rootfs/etc/apt/sources.list.d/updates.sources"
in_chroot "$WORK/b-v2/rootfs" "apt-get update
  apt-get -y upgrade -o Dpkg::Options::=--force-confold"
umoci repack --image "$L:app-v2" --history.created_by "apt-get upgrade (updates+security)" "$WORK/b-v2"
rm -rf "$WORK/b-v2"

umoci gc --layout "$L"
# 5. Move into place: rename aside the old (incomplete) layout, then swap.
if [[ -e $OCI ]]; then mv "$OCI" "$WORK/oci.old"; fi
mv "$L" "$OCI"
log "done: $OCI"
umoci ls --layout "$OCI"
oci_info full
