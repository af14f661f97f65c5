#!/usr/bin/env bash
# Training speed and memory of moera beside PEFT + PyTorch on SmolLM2-135M (CPU, 2 threads),
# one process per configuration; JSON lines to stdout. BENCHMARKS.md records a run.
#   benches/training.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-4}"
export RAYON_NUM_THREADS=2 TORCH_THREADS=2
cargo bench --bench training --no-run >/dev/null 2>&1
bench=$(ls -t target/release/deps/training-* | grep -v '\.d$' | head -1)
for config in "lora off 256 4" "lora layers 256 4" "lora off 1024 1" "lora layers 1024 1" "full off 256 4"; do
  "$bench" $config "$steps" none
  [ "${config%% *}" = lora ] && "$bench" $config "$steps" auto
  python3 benches/training_peer.py $config "$steps"
done
# burn's op-level checkpointing, for comparison (moera only).
"$bench" lora balanced 256 4 "$steps" none
"$bench" lora balanced 1024 1 "$steps" none
