//! Embedding throughput of all-MiniLM-L6-v2 on flex (CPU):
//! `cargo bench --bench embedding -- [SENTENCES] [BATCH]` (default 512 sentences, batch 32).
//! The sentences are 16-word windows of `tests/fixtures/english.txt`, built the same way by
//! `benches/embedding_peer.py` for sentence-transformers. Prints one JSON line: sentences/s
//! over a second pass (the first warms up).

#[path = "../src/allocator.rs"]
mod allocator;

use moera::engine::Device;
use moera::engine::embed::{BertEmbedder, Embedder};
use moera::engine::hub::resolve_model;

/// Window `i`: 16 words from word `7·i` on, wrapping around the text.
fn sentences(count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/english.txt"),
    )
    .expect("english.txt");
    let words: Vec<&str> = text.split_whitespace().collect();
    (0..count)
        .map(|i| {
            (0..16)
                .map(|j| words[(7 * i + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn main() {
    allocator::keep_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let count = args.first().copied().unwrap_or(512);
    let batch = args.get(1).copied().unwrap_or(32);
    let mut embedder = BertEmbedder::load(&resolve_model("minilm"), &Device::flex())
        .expect("all-MiniLM-L6-v2 (scripts/fetch-models.sh minilm)");
    embedder.batch_size = batch;
    let texts = sentences(count);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    embedder.embed(&texts).expect("warm-up pass");
    let started = std::time::Instant::now();
    let vectors = embedder.embed(&texts).expect("embed");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(vectors.len(), count);
    println!(
        "{}",
        serde_json::json!({
            "engine": "moera",
            "model": "all-MiniLM-L6-v2",
            "sentences": count,
            "batch": batch,
            "seconds": seconds,
            "sentences_per_second": count as f64 / seconds,
        })
    );
}
