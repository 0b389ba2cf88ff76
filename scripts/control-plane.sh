#!/usr/bin/env bash
# Builds the lab's real control plane, kube-apiserver and etcd at pinned versions, from the
# wrapper modules under e2e/control-plane (their go.sum files are the anchor), with this
# machine's Go: GOTOOLCHAIN=local, -mod=readonly. The binaries go to target/control-plane and
# are rebuilt only when a wrapper module changes; the Go build cache makes a rebuild on the
# same machine fast. Cold on 2 cores: kube-apiserver ~6 min (~2.1 GiB of memory at most),
# etcd under 1 min (with the modules downloaded from the Go module proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v go >/dev/null 2>&1; then
  echo "control-plane: go is missing (it builds kube-apiserver and etcd for the lab); install it and run again" >&2
  exit 1
fi
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly
out=$PWD/target/control-plane
mkdir -p "$out"
kube_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' e2e/control-plane/kube-apiserver/go.mod)
for c in etcd kube-apiserver; do
  dir=e2e/control-plane/$c
  stamp=$(cat "$dir/go.mod" "$dir/go.sum" "$dir/main.go" | sha256sum | cut -c1-16)
  if [ -x "$out/$c" ] && [ "$(cat "$out/$c.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "control-plane: $c is built ($out/$c)"
    continue
  fi
  ldflags=
  if [ "$c" = kube-apiserver ]; then
    minor=$(echo "$kube_version" | cut -d. -f2)
    ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  fi
  t0=$(date +%s)
  (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/$c" .)
  echo "$stamp" >"$out/$c.stamp"
  echo "control-plane: built $c in $(($(date +%s) - t0)) s ($out/$c)"
done
"$out/etcd" --version | head -1
"$out/kube-apiserver" --version
