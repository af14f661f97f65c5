#!/usr/bin/env bash
# The vector index on GloVe-6B-50d (390k base, 10k held-out queries, cosine, M=16,
# ef_construction=200; builds on 2 threads, searches on 1) beside hnsw_rs, hnswlib and faiss,
# all in one run, and one table at the end. Needs: scripts/fetch-models.sh glove, and
# `pip install hnswlib faiss-cpu numpy`. Takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export MOERA_BENCH_DIR="${MOERA_BENCH_DIR:-/tmp/moera-index-bench}"
python3 benches/index_peers.py --workdir "$MOERA_BENCH_DIR" --prepare-only
MOERA_BENCH_INT8=1 cargo bench --bench index
python3 benches/index_peers.py --workdir "$MOERA_BENCH_DIR" --json "$MOERA_BENCH_DIR/peers.json"
python3 - "$MOERA_BENCH_DIR" <<'PY'
import json, sys, pathlib
work = pathlib.Path(sys.argv[1])
rust = json.loads((work / "rust_results.json").read_text())
peers = json.loads((work / "peers.json").read_text())
rows = {**rust, **{k: v for k, v in peers["libraries"].items() if k != "brute_force"}}
fmt = lambda v: "–" if v is None else format(v, ",.0f")

def interpolated(sweep, target):
    """QPS where the recall curve crosses `target`, linear between the two ef values around it
    (every library is swept over the same ef values, so no one gains from where they fall)."""
    points = sorted((p["recall"], p["qps"]) for p in sweep)
    for (r0, q0), (r1, q1) in zip(points, points[1:]):
        if r0 <= target <= r1 and r1 > r0:
            return q0 + (q1 - q0) * (target - r0) / (r1 - r0)
    return None

targets = ["0.90", "0.95", "0.99"]
print("\n| library | build s (CPU-s) | QPS @ recall 0.90 / 0.95 / 0.99, interpolated | best measured | open | RSS after open |")
print("|---|---|---|---|---|---|")
for name, r in rows.items():
    best = " / ".join(fmt(r["qps_at"][t]) for t in targets)
    between = " / ".join(fmt(interpolated(r["sweep"], float(t))) for t in targets)
    print(f"| {name} | {r['build_wall_s']:.1f} ({r['build_cpu_s']:.1f}) | {between} | {best} | "
          f"{r['load_s'] * 1e3:.1f} ms | +{r['load_rss_mb']:.1f} MiB |")
print(f"| numpy brute force | – | {peers['libraries']['brute_force']['qps']:.1f} QPS at recall 1 | – | – |")
PY
