#!/usr/bin/env python3
"""Peer for benches/moe.rs: the expert loop of HF transformers (MixtralExperts.forward,
the `eager` experts implementation: one-hot mask, per-expert index, gate_up linear,
SiLU·up, down linear, weighted index_add_) on the same shapes, in PyTorch on CPU.

    python3 benches/moe_peer.py [--threads 2]

Prints one line per case: name, median milliseconds over the timed runs.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE = 1024, 512


def experts_forward(x, top_k_index, top_k_weights, gate_up_proj, down_proj):
    # Copied in substance from transformers 5.23 MixtralExperts.forward.
    num_experts = gate_up_proj.shape[0]
    final = torch.zeros_like(x)
    expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current = x[token_idx]
        gate, up = F.linear(current, gate_up_proj[expert_idx]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_proj[expert_idx])
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h)
    return final


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(7)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for experts in (8, 64):
        scale = HIDDEN ** -0.5
        gate_up = (torch.rand(experts, 2 * INTERMEDIATE, HIDDEN, generator=g) * 2 - 1) * scale
        down = (torch.rand(experts, HIDDEN, INTERMEDIATE, generator=g) * 2 - 1) * scale
        for top_k in (2, 8):
            for tokens in (1, 8, 64, 512):
                x = torch.rand(tokens, HIDDEN, generator=g) * 2 - 1
                logits = (torch.rand(tokens, experts, generator=g) * 2 - 1) * 3
                probs = logits.softmax(-1)
                weights, index = probs.topk(top_k, dim=-1)
                weights = weights / weights.sum(-1, keepdim=True)
                with torch.no_grad():
                    for _ in range(3):
                        experts_forward(x, index, weights, gate_up, down)
                    times = []
                    deadline = time.perf_counter() + args.seconds
                    while time.perf_counter() < deadline or len(times) < 10:
                        start = time.perf_counter()
                        experts_forward(x, index, weights, gate_up, down)
                        times.append(time.perf_counter() - start)
                print(f"E{experts}/k{top_k}/t{tokens} {statistics.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
