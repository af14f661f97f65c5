#!/usr/bin/env bash
# Training speed on an NVIDIA GPU: moera on wgpu (Vulkan) beside PEFT + PyTorch (CUDA, fp32)
# on the same GPU, on SmolLM2-135M's architecture with random weights
# (benches/smollm2_shape.py: the real weights need not travel to the GPU machine). One process
# per configuration; JSON lines to stdout, each followed by the peak GPU memory the process
# took above the idle baseline (nvidia-smi, sampled every 100 ms).
#   benches/training_gpu.sh TRAINING_BENCH_BINARY [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$1
steps=${2:-8}
model=${MOERA_TRAIN_MODEL:-/tmp/smollm2-shape}
[ -f "$model/model.safetensors" ] || python3 benches/smollm2_shape.py "$model" >&2
export MOERA_TRAIN_MODEL=$model MOERA_WARMUP_STEPS=${MOERA_WARMUP_STEPS:-3}

gpu_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }

# Runs "$@", then prints the peak GPU memory used during it, in MiB above the idle baseline.
with_gpu_peak() {
  local idle samples sampler
  idle=$(gpu_memory)
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$samples" &
  sampler=$!
  "$@" || echo "{\"failed\": \"$*\"}"
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  echo "{\"gpu_peak_above_idle_mib\": $(( $(sort -n "$samples" | tail -1) - idle ))}"
}

for config in "lora off 256 4" "lora layers 256 4" "lora off 1024 4" "lora layers 1024 4" "full off 256 4"; do
  MOERA_DEVICE=wgpu with_gpu_peak "$bench" $config "$steps" none
  MOERA_DEVICE=cuda with_gpu_peak python3 benches/training_peer.py $config "$steps"
done
# LoRA over an int4 base through the fused dequant-matmul kernels (moera only).
MOERA_DEVICE=wgpu with_gpu_peak "$bench" lora off 256 4 "$steps" int4
