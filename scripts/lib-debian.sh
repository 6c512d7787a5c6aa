# Shared by scripts/debian-image.sh and scripts/bench-images.sh: building Debian bookworm OCI
# images without Docker (debootstrap + chroot + umoci). Source it after setting OUTDIR; then
# check_tools, and start_work sets WORK (a temp dir under OUTDIR, removed on exit, never while
# something is mounted under it).
# shellcheck shell=bash

SOURCES=/etc/apt/sources.list.d/debian.sources
CACHE=$OUTDIR/cache/debootstrap-bookworm-minbase.tar
TAR_OPTS=(--numeric-owner --xattrs --xattrs-include='*' --acls)

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

check_tools() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  local t
  for t in debootstrap umoci chroot; do
    command -v "$t" >/dev/null || die "$t missing (apt-get install -y debootstrap umoci)"
  done
  [[ -r $SOURCES ]] || die "$SOURCES not readable"
}

# URIs of the deb822 stanza whose Suites contain the given suite (paragraph mode).
uri_for() {
  awk -v s="$1" 'BEGIN{RS=""} { u=""; hit=0
    n=split($0, L, "\n"); for (i=1;i<=n;i++) {
      if (L[i] ~ /^URIs:/) { split(L[i], f, /[ \t]+/); u=f[2] }
      if (L[i] ~ /^Suites:/) { m=split(L[i], f, /[ \t]+/); for (j=2;j<=m;j++) if (f[j]==s) hit=1 } }
    if (hit && u != "") { print u; exit } }' "$SOURCES"
}

find_mirrors() {
  MIRROR=$(uri_for bookworm); [[ -n $MIRROR ]] || die "no bookworm URI in $SOURCES"
  UPD_MIRROR=$(uri_for bookworm-updates); UPD_MIRROR=${UPD_MIRROR:-$MIRROR}
  SEC_MIRROR=$(uri_for bookworm-security); [[ -n $SEC_MIRROR ]] || die "no bookworm-security URI in $SOURCES"
  log "mirror=$MIRROR updates=$UPD_MIRROR security=$SEC_MIRROR"
}

# The deb822 sources of bookworm-updates and bookworm-security, written to $1.
write_update_sources() {
  local sm
  for sm in "bookworm-updates $UPD_MIRROR" "bookworm-security $SEC_MIRROR"; do
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
      "${sm#* }" "${sm%% *}" /usr/share/keyrings/debian-archive-keyring.gpg
  done >"$1"
}


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
  ((rc == 0)) || echo "error: build failed (exit $rc)" >&2
}
start_work() {
  mkdir -p "$OUTDIR/cache"
  # Temp dir on the same filesystem as $OUTDIR so a final mv is a rename.
  WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

# debootstrap --variant=minbase bookworm, cached as a tar in $CACHE. Tar keeps owners, xattrs
# (file caps) and device nodes.
debootstrap_cached() {
  if [[ -f $CACHE ]]; then log "using cached rootfs $CACHE"; return; fi
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
}

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
