#!/usr/bin/env bash
# The full test suite: installs dependencies, builds the cached Debian test images, builds the
# workspace once, and runs every test. Tests start their own registry, Redis, Redis Cluster and S3
# servers on ephemeral loopback ports and stop them when done.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (mknod, chown, debootstrap)" >&2; exit 1; }

bash scripts/install-deps.sh
bash scripts/debian-image.sh "${STARLIGHT_IMAGES:-/var/tmp/starlight-images}"

cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads 2 --skip gateway_passes_every_test_the_registry_passes
# The OCI conformance suite against docker-registry directly and through the gateway: both tables
# are printed, and the test fails if the gateway loses any test the registry passes.
cargo test --locked -p starlight-gateway --test conformance -- --nocapture
