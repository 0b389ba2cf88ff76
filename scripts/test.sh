#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the test API server against the real kubectl
# and kube-rs, and the network-namespace lab on the real kernel. The lab tests need root;
# without it they fail (they never skip).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the lab tests need root (network namespaces, nftables): run sudo ./scripts/test.sh" >&2
  exit 1
fi
# The previous release's speaker first (the rolling-upgrade test runs it beside this one),
# then this workspace (whose speaker binary replaces it in target/debug).
./scripts/build-previous.sh
cargo build --workspace --locked --all-targets
cargo nextest run --workspace --locked --no-tests=fail "$@"
