//! The vector index on GloVe-6B-50d beside hnsw_rs, in one run: build with 2 threads,
//! then, in a fresh process each, open time, RSS after opening and after the first query,
//! and recall@10 and QPS with one search thread over a sweep of `ef`.
//!
//! Data: `python3 benches/index_peers.py --prepare-only` writes `base.npy` (first 390k rows),
//! `queries.npy` (last 10k rows) and `truth.npy` (exact cosine top-100) into
//! `$MOERA_BENCH_DIR` (default /tmp/moera-index-bench). `benches/index_compare.sh` runs this
//! and the hnswlib/faiss peers and prints one table.
//!
//! `cargo bench --bench index` — set `MOERA_BENCH_SKIP_HNSW_RS=1` to leave hnsw_rs out (its
//! build takes minutes), `MOERA_BENCH_INT8=1` to add the int8 variant.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use hnsw_rs::anndists::dist::DistCosine;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw as HnswRs;
use hnsw_rs::hnswio::HnswIo;
use moera::index::npy::{Matrix, read_f32_matrix, read_matrix};
use moera::index::{Collection, CollectionConfig, DurableCollection, Metric, Point, Quantization};
use moera::process::{cpu_seconds, rss_mib, rss_split_mib};
use serde_json::{Value, json};

const K: usize = 10;
const EFS: [usize; 12] = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];
const BUILD_THREADS: usize = 2;
const TARGETS: [f64; 3] = [0.90, 0.95, 0.99];
const REPEATS: usize = 3;

struct Queries {
    queries: Matrix,
    truth: Matrix<i64>,
}

fn bench_dir() -> PathBuf {
    std::env::var_os("MOERA_BENCH_DIR")
        .map_or_else(|| PathBuf::from("/tmp/moera-index-bench"), PathBuf::from)
}

fn load_queries(dir: &Path) -> Queries {
    Queries {
        queries: read_f32_matrix(&dir.join("queries.npy")).expect("queries.npy"),
        truth: read_matrix(&dir.join("truth.npy")).expect("truth.npy"),
    }
}

/// Runs `search` over every query for each ef (one thread) and reports recall and QPS.
fn sweep(name: &str, data: &Queries, search: impl Fn(&[f32], usize) -> Vec<u64>) -> Value {
    let mut rows = Vec::new();
    for ef in EFS {
        // The best of REPEATS passes, as the Python peers are timed.
        let mut found = Vec::new();
        let mut qps = 0f64;
        for _ in 0..REPEATS {
            let started = Instant::now();
            found = (0..data.queries.rows)
                .map(|q| search(data.queries.row(q), ef))
                .collect();
            qps = qps.max(data.queries.rows as f64 / started.elapsed().as_secs_f64());
        }
        let hits: usize = found
            .iter()
            .enumerate()
            .map(|(q, ids)| {
                let exact = &data.truth.row(q)[..K];
                ids.iter()
                    .filter(|&&id| exact.contains(&(id as i64)))
                    .count()
            })
            .sum();
        let recall = hits as f64 / (data.queries.rows * K) as f64;
        println!("{name:>12} ef {ef:>4}: recall@10 {recall:.4}, {qps:>7.0} QPS");
        rows.push(json!({"ef": ef, "recall": recall, "qps": qps}));
    }
    let at = |target: f64| {
        rows.iter()
            .filter(|r| r["recall"].as_f64() >= Some(target))
            .filter_map(|r| r["qps"].as_f64())
            .fold(None, |best: Option<f64>, qps| {
                Some(best.map_or(qps, |b| b.max(qps)))
            })
    };
    let qps_at: serde_json::Map<String, Value> = TARGETS
        .iter()
        .map(|&t| (format!("{t:.2}"), json!(at(t))))
        .collect();
    json!({"sweep": rows, "qps_at": qps_at})
}

/// In a fresh process: open a moera index, then sweep.
fn child_moera(dir: &Path, index: &Path, name: &str) {
    let data = load_queries(dir);
    let split = || rss_split_mib().unwrap_or_default();
    let before = split();
    let growth =
        |(anon, file): (f64, f64)| json!({"anon": anon - before.0, "file": file - before.1});
    let started = Instant::now();
    let (store, _) = DurableCollection::open(index).expect("open");
    let open_s = started.elapsed().as_secs_f64();
    let after_open = split();
    let collection = store.collection();
    collection.search(data.queries.row(0), K, 64, None).unwrap();
    let after_query = split();
    drop(collection);
    drop(store);
    let started = Instant::now();
    let options = moera::index::OpenOptions {
        verify_checksums: false,
    };
    let (store, _) = DurableCollection::open_with(index, options).expect("open");
    let open_unverified_s = started.elapsed().as_secs_f64();
    println!(
        "{name:>12}: open {:.1} ms ({:.1} ms without checksums); RSS growth anonymous + file-backed: {:.1} + {:.1} MiB after open, {:.1} + {:.1} MiB after the first query",
        open_s * 1e3,
        open_unverified_s * 1e3,
        after_open.0 - before.0,
        after_open.1 - before.1,
        after_query.0 - before.0,
        after_query.1 - before.1,
    );
    let collection = store.collection();
    let mut result = sweep(name, &data, |q, ef| {
        collection
            .search(q, K, ef, None)
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect()
    });
    result["load_s"] = json!(open_s);
    result["load_unverified_s"] = json!(open_unverified_s);
    result["load_rss_mb"] = json!((after_open.0 + after_open.1) - (before.0 + before.1));
    result["rss_after_open_mb"] = growth(after_open);
    result["rss_after_first_query_mb"] = growth(after_query);
    result["rss_after_sweep_mb"] = growth(split());
    println!("RESULT {result}");
}

/// In a fresh process: reload the hnsw_rs dump, then sweep.
fn child_hnsw_rs(dir: &Path) {
    let data = load_queries(dir);
    let before = rss_mib().unwrap_or_default();
    let started = Instant::now();
    let mut io = HnswIo::new(dir, "hnsw_rs");
    let index: HnswRs<f32, DistCosine> = io.load_hnsw().expect("reload hnsw_rs");
    let load_s = started.elapsed().as_secs_f64();
    let load_rss = rss_mib().unwrap_or_default() - before;
    println!(
        "{:>12}: load {:.2} s, RSS +{load_rss:.1} MiB",
        "hnsw_rs", load_s
    );
    let mut result = sweep("hnsw_rs", &data, |q, ef| {
        index
            .search(q, K, ef)
            .iter()
            .map(|n| n.d_id as u64)
            .collect()
    });
    result["load_s"] = json!(load_s);
    result["load_rss_mb"] = json!(load_rss);
    println!("RESULT {result}");
}

/// Runs this bench binary again in child mode and returns the child's RESULT.
fn in_child(mode: &str, index: &Path, name: &str) -> Value {
    let output = Command::new(std::env::current_exe().expect("current exe"))
        .env("MOERA_BENCH_CHILD", mode)
        .env("MOERA_BENCH_INDEX", index)
        .env("MOERA_BENCH_NAME", name)
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut result = Value::Null;
    for line in stdout.lines() {
        match line.strip_prefix("RESULT ") {
            Some(json) => result = serde_json::from_str(json).expect("child result"),
            None => println!("{line}"),
        }
    }
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    result
}

fn timed<T>(work: impl FnOnce() -> T) -> (T, f64, f64) {
    let (started, cpu) = (Instant::now(), cpu_seconds().unwrap_or_default());
    let value = work();
    let wall = started.elapsed().as_secs_f64();
    (value, wall, cpu_seconds().unwrap_or_default() - cpu)
}

fn main() {
    let dir = bench_dir();
    let index = std::env::var_os("MOERA_BENCH_INDEX").map(PathBuf::from);
    let name = std::env::var("MOERA_BENCH_NAME").unwrap_or_default();
    match (std::env::var("MOERA_BENCH_CHILD").as_deref(), &index) {
        (Ok("moera"), Some(index)) => return child_moera(&dir, index, &name),
        (Ok("hnsw_rs"), _) => return child_hnsw_rs(&dir),
        _ => {}
    }
    let base = read_f32_matrix(&dir.join("base.npy")).unwrap_or_else(|e| {
        panic!("{e}: run `python3 benches/index_peers.py --prepare-only` first")
    });
    println!(
        "GloVe-50: {} base vectors, cosine, M=16, ef_construction=200, build on {BUILD_THREADS} threads, search on 1",
        base.rows
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(BUILD_THREADS)
        .build()
        .unwrap();
    let mut results = serde_json::Map::new();

    let mut variants = vec![("moera", Quantization::None)];
    if std::env::var_os("MOERA_BENCH_INT8").is_some() {
        variants.push(("moera-int8", Quantization::Int8));
    }
    let points: Vec<Point> = (0..base.rows)
        .map(|row| Point {
            id: row as u64,
            vector: base.row(row).to_vec(),
            payload: Value::Null,
        })
        .collect();
    for (name, quantization) in variants {
        let config = CollectionConfig {
            quantization,
            ..CollectionConfig::new(base.cols, Metric::Cosine)
        };
        let (collection, wall, cpu) = timed(|| {
            pool.install(|| {
                let mut collection = Collection::new(config);
                collection.upsert_batch(&points).unwrap();
                collection
            })
        });
        let path = dir.join(name);
        let _ = std::fs::remove_dir_all(&path);
        let ((), write_s, _) = timed(|| {
            DurableCollection::create_from(&path, collection).unwrap();
        });
        println!("{name:>12}: build {wall:.1} s ({cpu:.1} CPU-s), write {write_s:.2} s");
        let mut result = in_child("moera", &path, name);
        result["build_wall_s"] = json!(wall);
        result["build_cpu_s"] = json!(cpu);
        results.insert(name.into(), result);
    }

    if std::env::var_os("MOERA_BENCH_SKIP_HNSW_RS").is_none() {
        let (index, wall, cpu) = timed(|| {
            pool.install(|| {
                let index = HnswRs::<f32, DistCosine>::new(16, base.rows, 16, 200, DistCosine {});
                let rows: Vec<(&[f32], usize)> = (0..base.rows).map(|r| (base.row(r), r)).collect();
                index.parallel_insert_slice(&rows);
                index
            })
        });
        println!("{:>12}: build {wall:.1} s ({cpu:.1} CPU-s)", "hnsw_rs");
        index.file_dump(&dir, "hnsw_rs").expect("dump hnsw_rs");
        drop(index);
        let mut result = in_child("hnsw_rs", &dir, "hnsw_rs");
        result["build_wall_s"] = json!(wall);
        result["build_cpu_s"] = json!(cpu);
        results.insert("hnsw_rs".into(), result);
    }
    let out = dir.join("rust_results.json");
    std::fs::write(&out, Value::Object(results).to_string()).expect("write results");
    println!("results: {}", out.display());
}
