#!/usr/bin/env bash
# Idempotent setup for a fresh machine: what building and testing the profiler needs.
#  - rust-src for the nightly toolchain (eBPF is built with -Z build-std=core)
#  - bpf-linker, built against the nightly toolchain's own libLLVM
#  - the Debian packages the tests use (chromium: the headless browser test of the HTML page)
# Fast when everything is present already (a few hundred ms).
set -euo pipefail

NIGHTLY=${NIGHTLY:-nightly}
BPF_LINKER_VERSION=${BPF_LINKER_VERSION:-0.13.0}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
BPF_LINKER_ROOT=${BPF_LINKER_ROOT:-$CARGO_HOME}
# A local copy of the rust-src component, used when rustup cannot download it.
RUST_SRC_TARBALL=${PROFILER_RUST_SRC_TARBALL:-}
APT_PACKAGES=${PROFILER_APT_PACKAGES:-"golang-1.19-go bpftrace linux-perf bpftool chromium"}

log() { printf '[setup] %s\n' "$*" >&2; }

sysroot=$(rustc +"$NIGHTLY" --print sysroot)

# 1. rust-src for nightly.
if [ ! -f "$sysroot/lib/rustlib/src/rust/library/core/Cargo.toml" ]; then
  log "installing rust-src for $NIGHTLY"
  if ! rustup component add rust-src --toolchain "$NIGHTLY"; then
    if [ -z "$RUST_SRC_TARBALL" ]; then
      here=$(cd "$(dirname "$0")/.." && pwd)
      RUST_SRC_TARBALL="$here/../shared/toolchain/rust-src-nightly.tar.xz"
    fi
    [ -f "$RUST_SRC_TARBALL" ] || { log "rustup failed and no rust-src tarball at $RUST_SRC_TARBALL (set PROFILER_RUST_SRC_TARBALL)"; exit 1; }
    log "rustup download failed; installing rust-src from $RUST_SRC_TARBALL"
    tmp=$(mktemp -d)
    tar -xJf "$RUST_SRC_TARBALL" -C "$tmp"
    mkdir -p "$sysroot/lib/rustlib/src"
    cp -a "$(find "$tmp" -type d -path '*/lib/rustlib/src/rust' | head -n1)" "$sysroot/lib/rustlib/src/"
    rm -rf "$tmp"
  fi
fi

# 2. bpf-linker matching nightly's LLVM, linked to nightly's own libLLVM (RUNPATH into the toolchain).
if ! "$BPF_LINKER_ROOT/bin/bpf-linker" --version 2>/dev/null | grep -qx "bpf-linker $BPF_LINKER_VERSION"; then
  llvm_major=$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
  libllvm=$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)
  log "building bpf-linker $BPF_LINKER_VERSION against $libllvm (llvm-$llvm_major), about a minute"
  work=$(mktemp -d)
  mkdir -p "$work/prefix" "$work/link"
  ln -s "$sysroot/lib" "$work/prefix/lib"
  ln -s "$libllvm" "$work/link/libLLVM.so"
  LLVM_PREFIX="$work/prefix" RUSTFLAGS="-L native=$work/link" \
    cargo +stable install --locked --force --root "$BPF_LINKER_ROOT" "bpf-linker@$BPF_LINKER_VERSION" \
      --no-default-features --features "llvm-$llvm_major"
  rm -rf "$work"
  "$BPF_LINKER_ROOT/bin/bpf-linker" --version >/dev/null
fi

# 3. Debian packages used by the tests and the bench.
missing=()
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages (${missing[*]}); run as root to install them"
  else
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
log "ready"
