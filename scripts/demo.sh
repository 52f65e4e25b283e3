#!/usr/bin/env bash
# The main job (README: "Run it"): build, write a small random Grok-1-architecture model and
# generate tokens from it on the CPU.
#   scripts/demo.sh [PRESET] [DTYPE]      PRESET: tiny | small (default tiny8), DTYPE: f32 | bf16 | int8
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
preset=${1:-tiny8}
dtype=${2:-bf16}
model=models/$preset-$dtype

cargo build --release --bins --locked
if [ ! -f "$model/config.json" ]; then
  target/release/grokctl gen-model --preset "$preset" --dtype "$dtype" --seed 1 --out "$model"
fi
target/release/grokctl generate --model "$model" --prompt-ids 5,17,99,3,42 --max-new-tokens 16 --json
