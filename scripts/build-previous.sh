#!/usr/bin/env bash
# Builds the speaker of the previous release (VIP Leases renewed per IP, before LAN mode) from
# this repository's history into target/previous/l2speaker, for the rolling-upgrade lab test.
# It shares target/ with the workspace, so only the speaker crate itself is compiled again.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${L2S_PREVIOUS_REV:-dd14325ec16a9908491112effa68585b37b163dc}
out=target/previous
if [ -x "$out/l2speaker" ] && [ "$(cat "$out/rev" 2>/dev/null)" = "$rev" ]; then
  exit 0
fi
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
  # A shallow clone: fetch that one commit.
  git fetch --quiet --depth=1 origin "$rev" || {
    echo "scripts/build-previous.sh: commit $rev is not in this clone and cannot be fetched" >&2
    exit 1
  }
fi
rm -rf "$out"
mkdir -p "$out/src"
git archive "$rev" | tar -x -C "$out/src"
cargo build --locked --manifest-path "$out/src/Cargo.toml" --target-dir target \
  -p l2speaker --bin l2speaker
cp target/debug/l2speaker "$out/l2speaker"
echo "$rev" > "$out/rev"
rm -rf "$out/src"
