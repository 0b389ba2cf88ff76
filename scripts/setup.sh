#!/usr/bin/env bash
# Installs what building and testing l2speaker needs on a Debian machine with a Rust
# toolchain: iproute2 and nftables (the lab and the dataplane), kubectl and cargo-nextest,
# and checks for clippy and rustfmt.
# Run as root. Safe to run again.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v kubectl >/dev/null 2>&1 || need+=(kubectl)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null || true
fi
for tool in ip nft kubectl cargo; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup: $tool is missing and could not be installed; install it and run again" >&2
    exit 1
  fi
done
# The test runner: from crates.io, built once per machine (a few minutes on 2 cores).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
for sub in nextest clippy fmt; do
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    echo "setup: cargo $sub is missing and could not be installed; install it and run again" >&2
    exit 1
  fi
done
echo "setup: ip, nft, kubectl, cargo, cargo nextest, clippy and rustfmt are present"
