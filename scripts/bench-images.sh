#!/usr/bin/env bash
# The benchmark's corpus: ten Debian bookworm application images, each in two versions, built
# without Docker (debootstrap + chroot + umoci) into one OCI layout, and cached between runs.
# Usage: scripts/bench-images.sh [OUTDIR [APP...]]   (default /var/tmp/starlight-bench-images, all apps)
#
# Tags in $OUTDIR/oci:
#   bookworm-v1   1 layer: debootstrap --variant=minbase bookworm (the release suite only)
#   bookworm-v2   1 layer: the same base rebuilt with bookworm-updates and bookworm-security
#   APP-v1        bookworm-v1 + the application's packages from the release suite
#   APP-v2        bookworm-v2 + the same packages, updates included
# v2 is v1 as a CI pipeline rebuilds it once the Debian base has its point and security updates:
# both layers are new, and most files are the same. Each image's config carries its command and
# the label `org.starlight.bench.ready`: the line the container prints once it is ready.
# An image is rebuilt when its recipe below changes (a stamp per tag in $OUTDIR/stamps).
set -euo pipefail

OUTDIR=${1:-/var/tmp/starlight-bench-images}
shift || true
OCI=$OUTDIR/oci
ALL_APPS=(redis memcached nginx postgres mariadb python node tomcat apache mosquitto)
APPS=("$@")
((${#APPS[@]})) || APPS=("${ALL_APPS[@]}")

# The recipes: packages, optional setup commands, the command, its user, environment and ready line.
recipe() {
  PKGS="" SETUP="true" USER_="" ENV_=() ENTRY=() READY=""
  case $1 in
  redis) PKGS=redis-server READY="Ready to accept connections"
    ENTRY=(redis-server --protected-mode no) ;;
  memcached) PKGS=memcached READY="server listening"
    ENTRY=(memcached -u nobody -vv) ;;
  nginx) PKGS=nginx READY="start worker processes"
    ENTRY=(nginx -g "daemon off; error_log stderr notice;") ;;
  postgres) PKGS=postgresql READY="database system is ready to accept connections" USER_=postgres
    ENTRY=(/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main
      -c config_file=/etc/postgresql/15/main/postgresql.conf -c external_pid_file= -c ssl=off
      -k /tmp) ;;
  mariadb) PKGS=mariadb-server READY="ready for connections"
    ENTRY=(mariadbd --user=mysql --socket=/tmp/mysqld.sock --pid-file=/tmp/mysqld.pid) ;;
  python) PKGS=python3 READY="Serving HTTP on"
    ENTRY=(python3 -u -m http.server 8000) ;;
  node) PKGS=nodejs READY="node listening on 3000"
    ENTRY=(node -e "require('http').createServer((q, s) => s.end('ok\\n')).listen(3000, () => console.log('node listening on 3000'))") ;;
  tomcat) PKGS=tomcat10 READY="Server startup in"
    ENV_=(CATALINA_HOME=/usr/share/tomcat10 CATALINA_BASE=/var/lib/tomcat10 CATALINA_TMPDIR=/tmp
      JAVA_HOME=/usr/lib/jvm/default-java)
    ENTRY=(/usr/share/tomcat10/bin/catalina.sh run) ;;
  apache) PKGS=apache2 READY="resuming normal operations"
    SETUP="ln -sf /dev/stderr /var/log/apache2/error.log"
    # /run is an empty tmpfs in a container: apache2ctl makes its lock directory in /run/lock.
    ENTRY=(/bin/sh -c "mkdir -p /run/lock && exec apache2ctl -D FOREGROUND") ;;
  mosquitto) PKGS=mosquitto READY="running"
    ENTRY=(mosquitto -v) ;;
  *) die "unknown app $1 (known: ${ALL_APPS[*]})" ;;
  esac
}

# shellcheck source=lib-debian.sh
source "$(dirname "$0")/lib-debian.sh"

stamp_of() { # the recipe of a tag, as text; a change rebuilds the tag
  local tag=$1 app=${1%-v*}
  echo "recipe 1 of $tag"
  if [[ $app != bookworm ]]; then
    recipe "$app"; declare -p PKGS SETUP USER_ ENV_ ENTRY READY
    # ... on the base it was built on: a rebuilt base rebuilds it.
    cat "$OUTDIR/stamps/bookworm-${1##*-}" 2>/dev/null
    umoci stat --image "$OCI:bookworm-${1##*-}" --json 2>/dev/null | head -c 300 || true
  fi
}
have_tag() {
  [[ -f $OUTDIR/stamps/$1 && $(cat "$OUTDIR/stamps/$1") == "$(stamp_of "$1")" ]] \
    && umoci stat --image "$OCI:$1" >/dev/null 2>&1
}
done_tag() { mkdir -p "$OUTDIR/stamps"; stamp_of "$1" >"$OUTDIR/stamps/$1"; }

need=0
for app in "${APPS[@]}"; do
  recipe "$app"
  for v in v1 v2; do have_tag "$app-$v" || need=1; done
done
if ((need == 0)); then echo "cached: $OCI has ${APPS[*]} in v1 and v2"; exit 0; fi

check_tools
start_work
find_mirrors
debootstrap_cached
[[ -d $OCI ]] || umoci init --layout "$OCI"

for v in v1 v2; do
  have_tag "bookworm-$v" && continue
  log "building bookworm-$v"
  umoci new --image "$OCI:bookworm-$v"
  umoci unpack --image "$OCI:bookworm-$v" "$WORK/b"
  tar -C "$WORK/b/rootfs" -xpf "$CACHE" "${TAR_OPTS[@]}"
  if [[ $v == v2 ]]; then
    write_update_sources "$WORK/b/rootfs/etc/apt/sources.list.d/updates.sources"
    in_chroot "$WORK/b/rootfs" "apt-get update
      apt-get -y upgrade -o Dpkg::Options::=--force-confold"
  fi
  umoci repack --image "$OCI:bookworm-$v" --history.created_by "debootstrap bookworm ($v)" "$WORK/b"
  rm -rf "$WORK/b"
  done_tag "bookworm-$v"
done

for app in "${APPS[@]}"; do
  recipe "$app"
  for v in v1 v2; do
    tag=$app-$v
    have_tag "$tag" && continue
    log "building $tag ($PKGS)"
    umoci unpack --image "$OCI:bookworm-$v" "$WORK/b"
    in_chroot "$WORK/b/rootfs" "apt-get update
      apt-get install -y --no-install-recommends $PKGS
      $SETUP"
    umoci repack --image "$OCI:$tag" --history.created_by "apt-get install $PKGS" "$WORK/b"
    rm -rf "$WORK/b"
    args=(--image "$OCI:$tag" --config.label "org.starlight.bench.ready=$READY")
    for a in "${ENTRY[@]}"; do args+=(--config.entrypoint "$a"); done
    for e in "${ENV_[@]}"; do args+=(--config.env "$e"); done
    [[ -z $USER_ ]] || args+=(--config.user "$USER_")
    umoci config "${args[@]}"
    done_tag "$tag"
  done
done
umoci gc --layout "$OCI"
log "done: $OCI"
umoci ls --layout "$OCI"
