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
CACHE=$OUTDIR/cache/debootstrap-bookworm-minbase.tar
SOURCES=/etc/apt/sources.list.d/debian.sources
TAGS=(base app app-v2)
PY=/usr/bin/python3

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

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

[[ $(id -u) == 0 ]] || die "must run as root"
for t in debootstrap umoci chroot; do
  command -v "$t" >/dev/null || die "$t missing (apt-get install -y debootstrap umoci)"
done
[[ -r $SOURCES ]] || die "$SOURCES not readable"

# URIs of the deb822 stanza whose Suites contain the given suite (paragraph mode).
uri_for() {
  awk -v s="$1" 'BEGIN{RS=""} { u=""; hit=0
    n=split($0, L, "\n"); for (i=1;i<=n;i++) {
      if (L[i] ~ /^URIs:/) { split(L[i], f, /[ \t]+/); u=f[2] }
      if (L[i] ~ /^Suites:/) { m=split(L[i], f, /[ \t]+/); for (j=2;j<=m;j++) if (f[j]==s) hit=1 } }
    if (hit && u != "") { print u; exit } }' "$SOURCES"
}
MIRROR=$(uri_for bookworm);            [[ -n $MIRROR ]]   || die "no bookworm URI in $SOURCES"
UPD_MIRROR=$(uri_for bookworm-updates); UPD_MIRROR=${UPD_MIRROR:-$MIRROR}
SEC_MIRROR=$(uri_for bookworm-security); [[ -n $SEC_MIRROR ]] || die "no bookworm-security URI in $SOURCES"
log "mirror=$MIRROR updates=$UPD_MIRROR security=$SEC_MIRROR"

mkdir -p "$OUTDIR/cache"
# Temp dir on the same filesystem as $OUTDIR so the final mv is a rename.
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")

# Unmount everything below $WORK (deepest first). Used after each chroot step
# and by the EXIT trap; a dir with a live /dev bind mount must never be rm -rf'd.
unmount_all() {
  local m
  for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
}
cleanup() {
  local rc=$?
  unmount_all
  if awk -v w="$WORK/" 'index($2, w) == 1 {f=1} END {exit !f}' /proc/self/mounts; then
    echo "error: mounts remain under $WORK; not deleting it" >&2
  else
    rm -rf "$WORK"
  fi
  ((rc == 0)) || echo "error: build failed (exit $rc); $OCI left untouched" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. debootstrap (cached). Tar keeps owners, xattrs (file caps) and device nodes.
TAR_OPTS=(--numeric-owner --xattrs --xattrs-include='*' --acls)
if [[ ! -f $CACHE ]]; then
  log "debootstrap --variant=minbase bookworm $MIRROR (takes minutes)"
  debootstrap --variant=minbase bookworm "$WORK/debootstrap" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
  # debootstrap copies the host's resolv.conf/hostname; keep them out of images.
  rm -f "$WORK/debootstrap/etc/resolv.conf" "$WORK/debootstrap/etc/hostname"
  # debootstrap leaves its ~90 downloaded .debs (~45 MB) in the apt cache.
  rm -rf "$WORK/debootstrap/var/lib/apt/lists/"* "$WORK/debootstrap/var/cache/apt/"*.bin \
    "$WORK/debootstrap/var/cache/apt/archives/"*.deb
  tar -C "$WORK/debootstrap" -cf "$CACHE.tmp" "${TAR_OPTS[@]}" .
  mv "$CACHE.tmp" "$CACHE"
  rm -rf "$WORK/debootstrap"
else
  log "using cached rootfs $CACHE"
fi

L=$WORK/oci
umoci init --layout "$L"
# 2. base: unpack the empty image, fill rootfs, repack -> one layer.
log "building base"
umoci new --image "$L:base"
umoci unpack --image "$L:base" "$WORK/b-base"
tar -C "$WORK/b-base/rootfs" -xpf "$CACHE" "${TAR_OPTS[@]}"
umoci repack --image "$L:base" --history.created_by "debootstrap --variant=minbase bookworm" "$WORK/b-base"
rm -rf "$WORK/b-base"

# Run a shell script inside a chroot of $1 with /proc, /dev, /sys mounted,
# host DNS and a policy-rc.d that stops maintainer scripts starting daemons.
in_chroot() {
  local r=$1 script=$2 log=$WORK/chroot.log
  mount -t proc proc "$r/proc"
  mount --bind /dev "$r/dev"
  mount -t sysfs sysfs "$r/sys"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
  local rc=0
  chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 /bin/sh -euxc "$script
      apt-get clean; rm -rf /var/lib/apt/lists/*" >"$log" 2>&1 || rc=$?
  rm -f "$r/usr/sbin/policy-rc.d" "$r/etc/resolv.conf"
  unmount_all   # must be gone before umoci repack walks the rootfs
  ((rc == 0)) || { tail -n 30 "$log" >&2; die "chroot step failed (exit $rc)"; }
  grep -E '^(Setting up|Inst) ' "$log" | sed 's/^/    /' >&2 || true
}

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
for sm in "bookworm-updates $UPD_MIRROR" "bookworm-security $SEC_MIRROR"; do
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
    "${sm#* }" "${sm%% *}" /usr/share/keyrings/debian-archive-keyring.gpg
done >"$WORK/b-v2/rootfs/etc/apt/sources.list.d/updates.sources"
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
