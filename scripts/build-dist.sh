#!/usr/bin/env bash
# Builds the binaries a GPU host runs (it has no Rust toolchain) into dist/: release builds
# with the CUDA backend, stripped, and dist/COMMIT (the commit they were built from). Then
#   run (device tool) with carry ["dist"]:  scripts/gpu-check.sh $OUT
# SIMD paths are chosen at run time, so the binaries run on any x86-64 host.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features grok-worker/cuda,grok-tools/cuda \
  -p grok-coordinator -p grok-worker -p grokctl -p grok-tools --bins
mkdir -p dist
for b in grok-coordinator grok-worker grokctl grok-gpu-check; do
  cp target/release/$b dist/$b
  strip dist/$b
done
git rev-parse HEAD > dist/COMMIT 2>/dev/null || echo unknown > dist/COMMIT
git diff --quiet 2>/dev/null || echo "(with uncommitted changes)" >> dist/COMMIT
du -ch dist/* | tail -1
