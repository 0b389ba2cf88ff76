#!/usr/bin/env bash
# The demo: builds l2speaker, brings up a three-node lab of network namespaces with the test
# API server, gives a LoadBalancer Service a floating IP, shows it working, runs a failover
# drill and prints the outage the client saw, then removes everything. Needs root.
# With --node-ips: no pool; the Service is published on the nodes' own addresses.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/demo.sh: the lab needs root (network namespaces): run sudo ./scripts/demo.sh" >&2
  exit 1
fi
./scripts/setup.sh >/dev/null
cargo build --workspace --locked --quiet
exec ./target/debug/l2s-demo "$@"
