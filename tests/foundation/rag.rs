//! Retrieval-augmented generation: ingestion (formats, re-ingestion, bad files), retrieval
//! over the Rust book that ships with the toolchain (recall@5 of the right chapter on a
//! committed question set), `moera ingest/search/ask`, the result cache and circuit breaker
//! in the pipeline, and the concurrent fused query.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moera::engine::embed::{BertEmbedder, Embedder};
use moera::engine::rag::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use moera::engine::rag::cache::MemoryResultCache;
use moera::engine::rag::chunk::ChunkOptions;
use moera::engine::rag::ingest::{Ingestor, open_collection};
use moera::engine::rag::pipeline::{Generator, QueryOptions, RagPipeline};
use moera::engine::{Error, GenerationRequest, Result};
use moera::index::{CollectionConfig, DurableCollection, Filter, Metric};
use serde_json::Value;

use crate::common::*;

fn embedder() -> Option<Arc<BertEmbedder>> {
    let dir = minilm_path()?;
    Some(Arc::new(
        BertEmbedder::load(&dir, &flex()).expect("load all-MiniLM-L6-v2"),
    ))
}

fn ingest(
    embedder: &dyn Embedder,
    dir: &Path,
    collection: &DurableCollection,
) -> moera::engine::rag::ingest::IngestReport {
    Ingestor::new(embedder, ChunkOptions::default())
        .unwrap()
        .ingest(dir, collection, &mut |_| {})
        .unwrap()
}

/// Sources of the stored chunks, with their texts.
fn stored(collection: &DurableCollection) -> Vec<(String, String)> {
    let collection = collection.collection();
    let mut out: Vec<(String, String)> = collection
        .scroll(None, usize::MAX)
        .into_iter()
        .map(|p| {
            let field = |k: &str| p.payload[k].as_str().unwrap().to_string();
            (field("source"), field("text"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn ingestion_reads_formats_replaces_changed_files_and_skips_bad_ones() {
    let Some(embedder) = embedder() else { return };
    let docs = scratch();
    let dir = docs.path();
    std::fs::write(dir.join("a.txt"), "Ferris is a crab.\n\nFerris likes Rust.").unwrap();
    std::fs::write(dir.join("b.md"), "# Borrowing\n\nReferences borrow values.").unwrap();
    std::fs::write(
        dir.join("c.html"),
        "<html><head><title>Slices</title><script>var x = '<p>no</p>';</script></head>\
         <body><nav>Menu</nav><main><h1>Slices</h1><p>A slice &amp; a range.</p></main></body></html>",
    )
    .unwrap();
    std::fs::write(dir.join("binary.txt"), b"\x7fELF\0\0\x01binary").unwrap();
    std::fs::write(dir.join("latin1.md"), b"caf\xe9").unwrap();
    std::fs::write(dir.join("picture.png"), b"\x89PNG").unwrap();
    std::os::unix::fs::symlink(dir.join("missing.txt"), dir.join("dangling.txt")).unwrap();
    std::fs::create_dir(dir.join(".hidden")).unwrap();
    std::fs::write(dir.join(".hidden/secret.txt"), "not ingested").unwrap();

    let data = scratch();
    let collection = open_collection(data.path(), "docs", embedder.dimension(), true).unwrap();
    let report = ingest(embedder.as_ref(), dir, &collection);
    assert_eq!(
        (report.files, report.added, report.ignored),
        (5, 3, 1),
        "{report:?}"
    );
    let mut skipped: Vec<(String, &str)> = report
        .skipped
        .iter()
        .map(|s| {
            let name = s.path.file_name().unwrap().to_string_lossy().into_owned();
            (name, s.reason.split(':').next().unwrap())
        })
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            ("binary.txt".to_string(), "binary (not UTF-8 text)"),
            ("dangling.txt".to_string(), "unreadable"),
            ("latin1.md".to_string(), "binary (not UTF-8 text)"),
        ]
    );
    let texts = stored(&collection);
    let root = std::fs::canonicalize(dir).unwrap();
    let source = |name: &str| root.join(name).to_string_lossy().into_owned();
    assert_eq!(
        texts,
        [
            (
                source("a.txt"),
                "Ferris is a crab.\n\nFerris likes Rust.".to_string()
            ),
            (
                source("b.md"),
                "# Borrowing\n\nReferences borrow values.".to_string()
            ),
            (source("c.html"), "Slices\n\nA slice & a range.".to_string()),
        ]
    );
    let titles: Vec<Value> = collection
        .collection()
        .scroll(None, 10)
        .iter()
        .map(|p| p.payload["title"].clone())
        .collect();
    assert_eq!(titles, ["a", "Borrowing", "Slices"]);

    // Again, unchanged: nothing is embedded or written.
    let report = ingest(embedder.as_ref(), dir, &collection);
    assert_eq!(
        (
            report.unchanged,
            report.chunks_written,
            report.chunks_deleted
        ),
        (3, 0, 0)
    );

    // One file changed, one removed: the first's chunks are replaced, the second's deleted.
    std::fs::write(dir.join("a.txt"), "Ferris is an orange crab.").unwrap();
    std::fs::remove_file(dir.join("b.md")).unwrap();
    let report = ingest(embedder.as_ref(), dir, &collection);
    assert_eq!(
        (
            report.replaced,
            report.removed,
            report.unchanged,
            report.chunks_written,
            report.chunks_deleted
        ),
        (1, 1, 1, 1, 2),
        "{report:?}"
    );
    // Another chunking is another ingestion: every file is embedded again.
    let options = ChunkOptions {
        max_tokens: 100,
        overlap_tokens: 10,
    };
    let report = Ingestor::new(embedder.as_ref(), options)
        .unwrap()
        .ingest(dir, &collection, &mut |_| {})
        .unwrap();
    assert_eq!((report.replaced, report.unchanged), (2, 0), "{report:?}");
    drop(collection);
    // What was written survives reopening.
    let collection = open_collection(data.path(), "docs", embedder.dimension(), false).unwrap();
    assert_eq!(
        stored(&collection),
        [
            (source("a.txt"), "Ferris is an orange crab.".to_string()),
            (source("c.html"), "Slices\n\nA slice & a range.".to_string()),
        ]
    );
}

#[test]
fn bad_collections_and_questions_are_refused() {
    let Some(embedder) = embedder() else { return };
    let data = scratch();
    // A collection built with 8-dimensional vectors.
    DurableCollection::create(
        data.path().join("small"),
        CollectionConfig::new(8, Metric::Cosine),
    )
    .unwrap();
    match open_collection(data.path(), "small", embedder.dimension(), false) {
        Err(Error::DimensionMismatch {
            collection_dim: 8,
            embedder_dim: 384,
            ..
        }) => {}
        other => panic!("expected a dimension mismatch, got {:?}", other.err()),
    }
    let (small, _) = DurableCollection::open(data.path().join("small")).unwrap();
    let docs = scratch();
    std::fs::write(docs.path().join("a.txt"), "text").unwrap();
    let err = Ingestor::new(embedder.as_ref(), ChunkOptions::default())
        .unwrap()
        .ingest(docs.path(), &small, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::DimensionMismatch { .. }), "{err}");
    assert_eq!(small.collection().count(), 0);

    assert!(matches!(
        open_collection(data.path(), "missing", 384, false),
        Err(Error::Index(moera::index::StoreError::NotFound(_)))
    ));
    for name in ["", "../up", "a/b", ".hidden"] {
        assert!(matches!(
            open_collection(data.path(), name, 384, true),
            Err(Error::InvalidArgument(_))
        ));
    }
    let chunks_too_long = ChunkOptions {
        max_tokens: 1000,
        overlap_tokens: 0,
    };
    assert!(Ingestor::new(embedder.as_ref(), chunks_too_long).is_err());

    let collection = open_collection(data.path(), "docs", embedder.dimension(), true).unwrap();
    let pipeline = RagPipeline::new(embedder.clone(), Arc::new(collection));
    for question in ["", "  \n "] {
        assert!(matches!(
            pipeline.search(question, &QueryOptions::default()),
            Err(Error::EmptyQuestion)
        ));
    }
    // An empty collection answers a search with no passages.
    assert!(
        pipeline
            .search("anything?", &QueryOptions::default())
            .unwrap()
            .sources
            .is_empty()
    );
    // A pipeline without a generator cannot answer.
    assert!(pipeline.ask("anything?", &QueryOptions::default()).is_err());
}

/// A generator that counts its calls and fails while `failing` is set.
struct ScriptedGenerator {
    calls: AtomicUsize,
    failing: Mutex<bool>,
}

impl Generator for ScriptedGenerator {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn generate(&self, request: &GenerationRequest) -> Result<String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // As a model refuses what does not fit its context.
        if request.max_tokens > 8192 {
            return Err(Error::PromptTooLong {
                prompt: 100,
                max_new: request.max_tokens,
                context: 8192,
            });
        }
        if *self.failing.lock().unwrap() {
            return Err(Error::Io {
                path: "backend".into(),
                source: std::io::Error::other("down"),
            });
        }
        let moera::engine::Prompt::Chat(messages) = &request.prompt else {
            unreachable!()
        };
        Ok(format!(
            "answer from {} characters [1]",
            messages[1].content.len()
        ))
    }
}

fn small_collection(
    embedder: &dyn Embedder,
) -> (tempfile::TempDir, tempfile::TempDir, Arc<DurableCollection>) {
    let docs = scratch();
    for (name, text) in [
        (
            "ownership.md",
            "# Ownership\n\nEach value in Rust has an owner. When the owner goes out of scope, the value is dropped.",
        ),
        (
            "threads.md",
            "# Threads\n\nUse thread::spawn to run code in a new thread and join to wait for it.",
        ),
        (
            "vectors.md",
            "# Vectors\n\nA Vec<T> stores values of one type next to each other in memory.",
        ),
    ] {
        std::fs::write(docs.path().join(name), text).unwrap();
    }
    let data = scratch();
    let collection = open_collection(data.path(), "small", embedder.dimension(), true).unwrap();
    ingest(embedder, docs.path(), &collection);
    (docs, data, Arc::new(collection))
}

#[test]
fn ask_cites_retrieved_passages_caches_answers_and_breaks_the_circuit() {
    let Some(embedder) = embedder() else { return };
    let (_docs, _data, collection) = small_collection(embedder.as_ref());
    let generator = Arc::new(ScriptedGenerator {
        calls: AtomicUsize::new(0),
        failing: Mutex::new(false),
    });
    let breaker = Arc::new(CircuitBreaker::new(BreakerConfig {
        failure_threshold: 2,
        cooldown: Duration::from_secs(3600),
    }));
    let pipeline = RagPipeline::new(embedder.clone(), collection)
        .with_generator(generator.clone(), breaker.clone())
        .with_cache(Arc::new(MemoryResultCache::new(
            16,
            Duration::from_secs(3600),
        )));
    let options = QueryOptions {
        k: 2,
        ..QueryOptions::default()
    };

    let answer = pipeline.ask("Who owns a value in Rust?", &options).unwrap();
    assert_eq!(answer.sources.len(), 2);
    assert!(
        answer.sources[0].source.ends_with("ownership.md"),
        "{:?}",
        answer.sources
    );
    assert!(answer.answer.as_deref().unwrap().starts_with("answer from"));
    let stages: Vec<&str> = answer.timings.iter().map(|t| t.stage.as_str()).collect();
    assert_eq!(stages, ["embed", "search", "rerank", "generate"]);
    assert!(!answer.cached);

    // The same question again: from the cache, the generator is not called.
    let again = pipeline.ask("Who owns a value in Rust?", &options).unwrap();
    assert!(again.cached);
    assert_eq!(
        (again.answer, again.sources),
        (answer.answer.clone(), answer.sources.clone())
    );
    assert_eq!(generator.calls.load(Ordering::SeqCst), 1);

    // A filter narrows the passages to one source.
    let root = std::fs::canonicalize(_docs.path()).unwrap();
    let threads = root.join("threads.md").to_string_lossy().into_owned();
    let filtered = QueryOptions {
        filter: Some(Filter::matches("source", threads.as_str())),
        ..options.clone()
    };
    let hits = pipeline
        .search("Who owns a value in Rust?", &filtered)
        .unwrap();
    assert_eq!(hits.sources.len(), 1);
    assert_eq!(hits.sources[0].source, threads);

    // A caller's mistake does not count against the backend.
    let too_long = QueryOptions {
        max_tokens: 1 << 30,
        ..options.clone()
    };
    *generator.failing.lock().unwrap() = false;
    let scripted_calls = generator.calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert!(matches!(
            pipeline.ask("A question that is not cached?", &too_long),
            Err(Error::PromptTooLong { .. })
        ));
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(generator.calls.load(Ordering::SeqCst), scripted_calls + 3);
    // The backend fails: two failures open the circuit, then calls are refused unseen.
    *generator.failing.lock().unwrap() = true;
    for question in ["What is a vector?", "How do threads work?"] {
        assert!(matches!(
            pipeline.ask(question, &options),
            Err(Error::Io { .. })
        ));
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let calls = generator.calls.load(Ordering::SeqCst);
    assert!(matches!(
        pipeline.ask("What is a Vec?", &options),
        Err(Error::ServiceUnavailable { .. })
    ));
    assert_eq!(generator.calls.load(Ordering::SeqCst), calls);
    // Retrieval does not go through the breaker.
    assert_eq!(
        pipeline
            .search("What is a Vec?", &options)
            .unwrap()
            .sources
            .len(),
        2
    );
}

/// An embedder that, on its first call, reports it and waits for the generator to start.
struct RendezvousEmbedder {
    inner: Arc<BertEmbedder>,
    embedding: Mutex<mpsc::Sender<()>>,
    generating: Mutex<mpsc::Receiver<()>>,
}

impl Embedder for RendezvousEmbedder {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let _ = self.embedding.lock().unwrap().send(());
        self.generating
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| Error::InvalidArgument("generation did not run alongside".into()))?;
        self.inner.embed(texts)
    }

    fn token_count(&self, text: &str) -> Result<usize> {
        self.inner.token_count(text)
    }

    fn max_tokens(&self) -> usize {
        self.inner.max_tokens()
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}

/// A generator that reports it started and waits for retrieval to start.
struct RendezvousGenerator {
    generating: Mutex<mpsc::Sender<()>>,
    embedding: Mutex<mpsc::Receiver<()>>,
}

impl Generator for RendezvousGenerator {
    fn name(&self) -> String {
        "rendezvous".into()
    }

    fn generate(&self, _: &GenerationRequest) -> Result<String> {
        let _ = self.generating.lock().unwrap().send(());
        self.embedding
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| Error::InvalidArgument("retrieval did not run alongside".into()))?;
        Ok("direct answer".into())
    }
}

#[test]
fn the_fused_query_runs_generation_and_retrieval_at_once() {
    let Some(embedder) = embedder() else { return };
    let (_docs, _data, collection) = small_collection(embedder.as_ref());
    // Each side waits for the other to start: run one after the other, both time out.
    let (embedding_tx, embedding_rx) = mpsc::channel();
    let (generating_tx, generating_rx) = mpsc::channel();
    let rendezvous = Arc::new(RendezvousEmbedder {
        inner: embedder,
        embedding: Mutex::new(embedding_tx),
        generating: Mutex::new(generating_rx),
    });
    let generator = Arc::new(RendezvousGenerator {
        generating: Mutex::new(generating_tx),
        embedding: Mutex::new(embedding_rx),
    });
    let breaker = Arc::new(CircuitBreaker::new(BreakerConfig::default()));
    let pipeline =
        Arc::new(RagPipeline::new(rendezvous, collection).with_generator(generator, breaker));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = QueryOptions {
        k: 1,
        ..QueryOptions::default()
    };
    let answer = runtime
        .block_on(pipeline.query("How do I start a thread?", &options))
        .unwrap();
    assert_eq!(answer.answer.as_deref(), Some("direct answer"));
    assert!(answer.sources[0].source.ends_with("threads.md"));
    let mut stages: Vec<&str> = answer.timings.iter().map(|t| t.stage.as_str()).collect();
    stages.sort();
    assert_eq!(stages, ["embed", "generate", "rerank", "search"]);
}

fn moera(args: &[&str]) -> String {
    String::from_utf8(crate::cli::moera(args).stdout).unwrap()
}

fn rust_book() -> Option<PathBuf> {
    let output = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(output.stdout).ok()?;
    let book = Path::new(sysroot.trim()).join("share/doc/rust/html/book");
    if book.join("ch04-01-what-is-ownership.html").exists() {
        Some(book)
    } else {
        assert!(
            std::env::var_os("MOERA_REQUIRE_RUST_BOOK").is_none(),
            "MOERA_REQUIRE_RUST_BOOK is set but {} is missing",
            book.display()
        );
        eprintln!(
            "SKIPPED: the Rust book is not installed ({}); rustup component add rust-docs",
            book.display()
        );
        None
    }
}

/// The Rust book through the CLI: `moera ingest`, recall@5 of the right chapter over the
/// committed questions, `moera search`, re-ingestion, and `moera ask` with SmolLM2 citing the
/// ownership chapter.
#[test]
fn rust_book_is_ingested_retrieved_and_answered_from() {
    let (Some(book), Some(embedder)) = (rust_book(), embedder()) else {
        return;
    };
    let data = scratch();
    let data_dir = data.path().to_str().unwrap();
    let book_str = book.to_str().unwrap();
    let report = moera(&[
        "ingest",
        book_str,
        "--data-dir",
        data_dir,
        "--collection",
        "book",
    ]);
    assert!(report.contains(" 0 unchanged"), "{report}");
    // print.html (noindex) and the redirect pages are skipped, the rest written.
    assert!(report.contains("print.html: marked noindex"), "{report}");

    let collection =
        Arc::new(open_collection(data.path(), "book", embedder.dimension(), false).unwrap());
    let pipeline = RagPipeline::new(embedder.clone(), collection);
    let questions: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("rust_book_questions.json")).unwrap(),
    )
    .unwrap();
    let questions = questions["questions"].as_array().unwrap();
    assert!(questions.len() >= 25);
    let mut found = 0;
    let mut misses = Vec::new();
    for q in questions {
        let question = q["question"].as_str().unwrap();
        let chapters: Vec<PathBuf> = q["chapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| book.join(c.as_str().unwrap()))
            .collect();
        let hits = pipeline.search(question, &QueryOptions::default()).unwrap();
        let sources: Vec<PathBuf> = hits
            .sources
            .iter()
            .map(|p| PathBuf::from(&p.source))
            .collect();
        let canonical: Vec<PathBuf> = chapters
            .iter()
            .map(|c| std::fs::canonicalize(c).unwrap())
            .collect();
        if sources.iter().any(|s| canonical.contains(s)) {
            found += 1;
        } else {
            misses.push(format!(
                "{question} → {:?}",
                hits.sources.iter().map(|p| &p.title).collect::<Vec<_>>()
            ));
        }
    }
    let recall = found as f64 / questions.len() as f64;
    eprintln!(
        "recall@5 = {recall:.3} ({found}/{}); misses: {misses:#?}",
        questions.len()
    );
    assert!(
        recall >= 0.8,
        "recall@5 {recall:.3} < 0.8; misses: {misses:#?}"
    );

    let search = moera(&[
        "search",
        "What is ownership in Rust?",
        "--data-dir",
        data_dir,
        "--collection",
        "book",
    ]);
    assert!(
        search.contains("ch04-01-what-is-ownership.html"),
        "{search}"
    );

    // Again: every file is unchanged.
    let report = moera(&[
        "ingest",
        book_str,
        "--data-dir",
        data_dir,
        "--collection",
        "book",
    ]);
    assert!(
        report.contains(" 0 added, 0 replaced") && report.contains("0 chunks written"),
        "{report}"
    );

    if smollm2_path().is_none() {
        return;
    }
    let answer = moera(&[
        "ask",
        "What is ownership in Rust?",
        "--data-dir",
        data_dir,
        "--collection",
        "book",
        "--max-tokens",
        "48",
    ]);
    let (text, sources) = answer.split_once("Sources:").expect("a Sources: list");
    assert!(text.trim().len() > 10, "{answer}");
    assert!(
        sources.contains("ch04-01-what-is-ownership.html"),
        "{answer}"
    );
}

/// The rerank stage with the tiny cross-encoder: each passage carries the cross-encoder's own
/// score for (question, passage), and with MMR off they come ordered by it.
#[test]
fn the_cross_encoder_reranks_retrieved_passages() {
    let Some(embedder) = embedder() else { return };
    let (_docs, _data, collection) = small_collection(embedder.as_ref());
    let dir = fixtures().join("tiny-cross-encoder");
    let reranker =
        Arc::new(moera::engine::rag::cross_encoder::CrossEncoder::load(&dir, &flex()).unwrap());
    let pipeline =
        RagPipeline::new(embedder.clone(), collection).with_reranker(reranker.clone(), "tiny");
    let question = "Who owns a value in Rust?";
    let options = QueryOptions {
        k: 3,
        mmr_lambda: 1.0,
        ..QueryOptions::default()
    };
    let hits = pipeline.search(question, &options).unwrap();
    assert_eq!(hits.sources.len(), 3);
    let texts: Vec<&str> = hits.sources.iter().map(|p| p.text.as_str()).collect();
    use moera::engine::rag::Reranker;
    let expected = reranker.score(question, &texts).unwrap();
    let scores: Vec<f32> = hits
        .sources
        .iter()
        .map(|p| p.rerank_score.unwrap())
        .collect();
    for (score, expected) in scores.iter().zip(&expected) {
        assert!(
            (score - expected).abs() < 1e-5,
            "{scores:?} vs {expected:?}"
        );
    }
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // A threshold on the reranker's score drops the passages below it.
    let threshold = QueryOptions {
        min_score: Some(scores[1]),
        ..options
    };
    let kept = pipeline.search(question, &threshold).unwrap();
    assert_eq!(kept.sources.len(), 2);
}

/// With Redis unreachable the result cache is a miss (and a warning): questions are still
/// answered, each by the generator.
#[cfg(feature = "redis")]
#[test]
fn an_unreachable_redis_cache_still_answers() {
    use moera::engine::rag::cache::RedisResultCache;
    let Some(embedder) = embedder() else { return };
    let (_docs, _data, collection) = small_collection(embedder.as_ref());
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = RedisResultCache::connect(
        &format!("redis://:secret@127.0.0.1:{port}/0"),
        Duration::from_secs(60),
        "moera-test:",
    )
    .unwrap();
    let generator = Arc::new(ScriptedGenerator {
        calls: AtomicUsize::new(0),
        failing: Mutex::new(false),
    });
    let pipeline = RagPipeline::new(embedder.clone(), collection)
        .with_generator(
            generator.clone(),
            Arc::new(CircuitBreaker::new(BreakerConfig::default())),
        )
        .with_cache(Arc::new(cache));
    let options = QueryOptions {
        k: 1,
        ..QueryOptions::default()
    };
    for _ in 0..2 {
        let answer = pipeline.ask("Who owns a value?", &options).unwrap();
        assert!(!answer.cached);
        assert!(answer.answer.unwrap().starts_with("answer from"));
    }
    assert_eq!(generator.calls.load(Ordering::SeqCst), 2);
}
