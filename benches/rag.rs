//! The RAG path on the Rust book that ships with the toolchain, on flex (CPU):
//! `cargo bench --bench rag -- [QUESTIONS] [MAX_TOKENS]` (default 10 questions, 64 tokens).
//! Ingests the book into a fresh collection (all-MiniLM-L6-v2, default chunking) and reports
//! the time; then asks the first QUESTIONS questions of `tests/fixtures/rust_book_questions.json`
//! with SmolLM2 and reports each stage's latency (embed, search, rerank, generate). Between
//! the two, every 10th chunk (as embedded: title line and text) is embedded again, timed, and
//! written to `target/rag-chunks.json` for `benches/embedding_peer.py --texts`. One JSON line
//! per measurement.

#[path = "../src/allocator.rs"]
mod allocator;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use moera::engine::embed::{BertEmbedder, Embedder};
use moera::engine::hub::resolve_model;
use moera::engine::rag::breaker::{BreakerConfig, CircuitBreaker};
use moera::engine::rag::chunk::ChunkOptions;
use moera::engine::rag::ingest::{Ingestor, open_collection};
use moera::engine::rag::pipeline::{ModelGenerator, QueryOptions, RagPipeline};
use moera::engine::{Device, Model};

fn main() {
    allocator::keep_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let question_count = args.first().copied().unwrap_or(10);
    let max_tokens = args.get(1).copied().unwrap_or(64);
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .expect("rustc");
    let book =
        Path::new(String::from_utf8_lossy(&sysroot.stdout).trim()).join("share/doc/rust/html/book");
    let device = Device::flex();
    let embedder = Arc::new(
        BertEmbedder::load(&resolve_model("minilm"), &device)
            .expect("all-MiniLM-L6-v2 (scripts/fetch-models.sh minilm)"),
    );
    let data = tempfile::tempdir().expect("temporary directory");
    let collection = open_collection(data.path(), "book", 384, true).expect("collection");
    let started = Instant::now();
    let report = Ingestor::new(embedder.as_ref(), ChunkOptions::default())
        .expect("chunk options")
        .ingest(&book, &collection, &mut |_| {})
        .expect("ingest the book");
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "measure": "ingestion",
            "corpus": "the Rust book (html)",
            "files": report.files,
            "skipped": report.skipped.len(),
            "chunks": report.chunks_written,
            "seconds": seconds,
            "chunks_per_second": report.chunks_written as f64 / seconds,
        })
    );

    // Chunk embedding throughput on a sample of the real chunks, for the peer to repeat.
    let sample: Vec<String> = {
        let collection = collection.collection();
        collection
            .scroll(None, usize::MAX)
            .iter()
            .step_by(10)
            .map(|p| {
                format!(
                    "{}\n{}",
                    p.payload["title"].as_str().unwrap_or_default(),
                    p.payload["text"].as_str().unwrap_or_default()
                )
            })
            .collect()
    };
    let texts: Vec<&str> = sample.iter().map(String::as_str).collect();
    embedder
        .embed(&texts[..32.min(texts.len())])
        .expect("warm-up");
    let started = Instant::now();
    embedder.embed(&texts).expect("embed the sample");
    let seconds = started.elapsed().as_secs_f64();
    let dump = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rag-chunks.json");
    std::fs::write(&dump, serde_json::to_string(&sample).expect("JSON")).expect("write the sample");
    println!(
        "{}",
        serde_json::json!({
            "measure": "chunk embedding",
            "engine": "moera",
            "chunks": texts.len(),
            "batch": embedder.batch_size,
            "seconds": seconds,
            "chunks_per_second": texts.len() as f64 / seconds,
            "texts": dump,
        })
    );

    let model = Model::load_on(resolve_model("smollm2"), &device, &mut |_| {})
        .expect("SmolLM2 (scripts/fetch-models.sh)");
    let pipeline = RagPipeline::new(embedder, Arc::new(collection)).with_generator(
        Arc::new(ModelGenerator::new(Arc::new(model), "smollm2")),
        Arc::new(CircuitBreaker::new(BreakerConfig::default())),
    );
    let questions: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rust_book_questions.json"),
        )
        .expect("questions"),
    )
    .expect("questions JSON");
    let options = QueryOptions {
        max_tokens,
        ..QueryOptions::default()
    };
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for question in questions["questions"]
        .as_array()
        .expect("questions")
        .iter()
        .take(question_count)
    {
        let answer = pipeline
            .ask(question["question"].as_str().expect("question"), &options)
            .expect("ask");
        for timing in answer.timings {
            stages
                .entry(timing.stage)
                .or_default()
                .push(timing.seconds * 1e3);
        }
    }
    for (stage, mut millis) in stages {
        millis.sort_by(f64::total_cmp);
        let mean = millis.iter().sum::<f64>() / millis.len() as f64;
        println!(
            "{}",
            serde_json::json!({
                "measure": "query stage",
                "stage": stage,
                "queries": millis.len(),
                "mean_ms": mean,
                "p50_ms": millis[millis.len() / 2],
                "max_ms": millis[millis.len() - 1],
                "max_tokens": max_tokens,
            })
        );
    }
}
