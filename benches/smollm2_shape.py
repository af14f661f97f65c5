#!/usr/bin/env python3
"""Writes a Hugging Face folder with SmolLM2-135M's architecture and seeded random weights
(f32, tied embeddings), for speed measurements where the real weights cannot travel (a GPU
machine with no network): the work per step depends on the shapes alone.

    python3 benches/smollm2_shape.py OUT_DIR
"""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    out = sys.argv[1]
    # SmolLM2-135M-Instruct's GGUF header: 30 blocks, 576 wide, 1536 feed-forward, 9 heads,
    # 3 KV heads, rope base 1e5, RMS eps 1e-5, 49152 tokens, context 8192, tied head.
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
