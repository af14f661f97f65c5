#!/usr/bin/env python3
"""Loads a LoRA adapter written by moera with PEFT and checks PEFT's logits against moera's.

    python scripts/check_peft_adapter.py BASE_MODEL_DIR ADAPTER_DIR LOGITS.safetensors [--tolerance 1e-4]

LOGITS.safetensors holds `prompt_ids` (int64 [T]) and `logits` (f32 [T, vocab]) as moera
computed them with the adapter. Exits 1 when the largest difference exceeds the tolerance.
Needs torch, transformers, peft and safetensors.
"""
import argparse
import sys

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("logits")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32,
                                                attn_implementation="eager")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    expected = load_file(args.logits)
    prompt = torch.tensor(expected["prompt_ids"], dtype=torch.long).reshape(1, -1)
    with torch.no_grad():
        logits = model(prompt).logits[0].numpy()
    diff = float(np.abs(logits - expected["logits"].reshape(logits.shape)).max())
    print(f"PEFT vs moera logits: max difference {diff:.3g} (tolerance {args.tolerance:g})")
    sys.exit(0 if diff <= args.tolerance else 1)


if __name__ == "__main__":
    main()
