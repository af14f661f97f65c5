//! `moera ingest`, `moera search` and `moera ask`: documents into a collection, and questions
//! answered from it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moera::engine::embed::{BertEmbedder, Embedder};
use moera::engine::rag::breaker::CircuitBreaker;
use moera::engine::rag::cache::{MemoryResultCache, ResultCache};
use moera::engine::rag::chunk::ChunkOptions;
use moera::engine::rag::cross_encoder::CrossEncoder;
use moera::engine::rag::ingest::{Ingestor, open_collection};
use moera::engine::rag::pipeline::{ModelGenerator, QueryOptions, RagAnswer, RagPipeline};
use moera::engine::rag::settings::Settings;
use moera::engine::{LoadOptions, Model};

use crate::device_and_model;

/// Where collections live and which embedder reads them.
#[derive(Args)]
pub struct CollectionArgs {
    /// The collection's name (default: MOERA_COLLECTION, else `default`).
    #[arg(long)]
    collection: Option<String>,
    /// Folder of the collections (default: MOERA_DATA_DIR, else $MOERA_HOME/collections).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Sentence-transformers folder or alias (default: MOERA_EMBEDDER, else minilm).
    #[arg(long)]
    embedder: Option<String>,
    /// Backend: flex (CPU), wgpu or cuda.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
pub struct IngestArgs {
    /// A folder (walked recursively) or a file: .txt, .md and .html are read.
    path: PathBuf,
    #[command(flatten)]
    collection: CollectionArgs,
    /// Tokens per chunk.
    #[arg(long, default_value_t = ChunkOptions::default().max_tokens)]
    chunk_tokens: usize,
    /// Tokens of whole sentences shared by consecutive chunks.
    #[arg(long, default_value_t = ChunkOptions::default().overlap_tokens)]
    overlap_tokens: usize,
}

#[derive(Args)]
pub struct SearchArgs {
    /// The question.
    question: String,
    #[command(flatten)]
    collection: CollectionArgs,
    #[command(flatten)]
    query: QueryArgs,
}

#[derive(Args)]
pub struct QueryArgs {
    /// Passages to return.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// Candidates retrieved before reranking.
    #[arg(long, default_value_t = 20)]
    candidates: usize,
    /// Maximal marginal relevance weight (1 = relevance only).
    #[arg(long, default_value_t = 0.7)]
    mmr_lambda: f32,
    /// Drop passages scoring below this (similarity, or the reranker's score).
    #[arg(long)]
    min_score: Option<f32>,
    /// Only passages from sources whose path is this (payload filter on `source`).
    #[arg(long)]
    source: Option<String>,
    /// A cross-encoder folder (BertForSequenceClassification) to rerank with.
    #[arg(long)]
    reranker: Option<PathBuf>,
}

#[derive(Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    #[command(flatten)]
    collection: CollectionArgs,
    #[command(flatten)]
    query: QueryArgs,
    /// The model that answers (default: MOERA_MODEL, else smollm2).
    #[arg(long, short)]
    model: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
}

struct Opened {
    settings: Settings,
    embedder: Arc<BertEmbedder>,
    collection_name: String,
    data_dir: PathBuf,
    device: moera::engine::Device,
}

fn open(args: &CollectionArgs) -> Result<Opened> {
    let settings = Settings::from_env()?;
    let embedder_name = args.embedder.as_deref().unwrap_or(&settings.embedder);
    let device_name = args.device.as_deref().or(settings.device.as_deref());
    let (_, device, path) = device_and_model(device_name, embedder_name)?;
    let embedder = BertEmbedder::load(&path, &device)
        .with_context(|| format!("loading the embedder {}", path.display()))?;
    Ok(Opened {
        collection_name: args
            .collection
            .clone()
            .unwrap_or_else(|| settings.collection.clone()),
        data_dir: args
            .data_dir
            .clone()
            .unwrap_or_else(|| settings.data_dir.clone()),
        embedder: Arc::new(embedder),
        device,
        settings,
    })
}

pub fn ingest(args: &IngestArgs) -> Result<()> {
    let opened = open(&args.collection)?;
    let collection = open_collection(
        &opened.data_dir,
        &opened.collection_name,
        opened.embedder.dimension(),
        true,
    )?;
    let options = ChunkOptions {
        max_tokens: args.chunk_tokens,
        overlap_tokens: args.overlap_tokens,
    };
    let ingestor = Ingestor::new(opened.embedder.as_ref(), options)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("ingesting [{bar:30}] {pos}/{len} files, {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let report = ingestor.ingest(&args.path, &collection, &mut |p| {
        bar.set_length(p.files_total as u64);
        bar.set_position(p.files_done as u64);
        bar.set_message(format!("{} chunks", p.chunks_written));
    })?;
    bar.finish_and_clear();
    println!(
        "{}: {} files: {} added, {} replaced, {} unchanged, {} removed, {} skipped, {} of other types; \
         {} chunks written, {} deleted; {} points in {:.1} s",
        collection.dir().display(),
        report.files,
        report.added,
        report.replaced,
        report.unchanged,
        report.removed,
        report.skipped.len(),
        report.ignored,
        report.chunks_written,
        report.chunks_deleted,
        collection.collection().count(),
        started.elapsed().as_secs_f64()
    );
    for skipped in &report.skipped {
        println!("skipped {}: {}", skipped.path.display(), skipped.reason);
    }
    Ok(())
}

fn pipeline(opened: &Opened, query: &QueryArgs) -> Result<RagPipeline> {
    let collection = open_collection(
        &opened.data_dir,
        &opened.collection_name,
        opened.embedder.dimension(),
        false,
    )?;
    let mut pipeline = RagPipeline::new(opened.embedder.clone(), Arc::new(collection));
    if let Some(dir) = &query.reranker {
        let reranker = CrossEncoder::load(dir, &opened.device)
            .with_context(|| format!("loading the reranker {}", dir.display()))?;
        pipeline = pipeline.with_reranker(Arc::new(reranker), &dir.display().to_string());
    }
    Ok(pipeline)
}

fn query_options(query: &QueryArgs, max_tokens: usize) -> Result<QueryOptions> {
    // Sources are stored as absolute paths.
    let source = match &query.source {
        Some(source) => Some(
            std::fs::canonicalize(source)
                .with_context(|| format!("--source {source}"))?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    Ok(QueryOptions {
        k: query.k,
        candidates: query.candidates,
        mmr_lambda: query.mmr_lambda,
        min_score: query.min_score,
        filter: source.map(|source| moera::index::Filter::matches("source", source)),
        max_tokens,
        ..QueryOptions::default()
    })
}

fn print_sources(answer: &RagAnswer) {
    for (i, passage) in answer.sources.iter().enumerate() {
        let start: String = passage.text.chars().take(160).collect();
        let score = match passage.rerank_score {
            Some(rerank) => format!("{:.3} (rerank {rerank:.3})", passage.similarity),
            None => format!("{:.3}", passage.similarity),
        };
        println!(
            "[{}] {score} {} — {}\n    {}",
            i + 1,
            passage.title,
            passage.source,
            start.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}

fn print_timings(answer: &RagAnswer) {
    let timings: Vec<String> = answer
        .timings
        .iter()
        .map(|t| format!("{} {:.0} ms", t.stage, t.seconds * 1e3))
        .collect();
    tracing::info!(
        timings = timings.join(", "),
        cached = answer.cached,
        "query finished"
    );
}

pub fn search(args: &SearchArgs) -> Result<()> {
    let opened = open(&args.collection)?;
    let answer =
        pipeline(&opened, &args.query)?.search(&args.question, &query_options(&args.query, 0)?)?;
    if answer.sources.is_empty() {
        println!("no passages found");
    }
    print_sources(&answer);
    print_timings(&answer);
    Ok(())
}

/// Redis when MOERA_REDIS_URL is set (and the `redis` feature built in), else in-process.
fn result_cache(settings: &Settings) -> Result<Arc<dyn ResultCache>> {
    #[cfg(feature = "redis")]
    if let Some(url) = &settings.redis_url {
        let cache = moera::engine::rag::cache::RedisResultCache::connect(
            url.expose(),
            settings.cache_ttl,
            "moera:rag:",
        )?;
        return Ok(Arc::new(cache));
    }
    #[cfg(not(feature = "redis"))]
    if settings.redis_url.is_some() {
        tracing::warn!(
            "MOERA_REDIS_URL is set but this build has no `redis` feature: caching in process"
        );
    }
    Ok(Arc::new(MemoryResultCache::new(256, settings.cache_ttl)))
}

pub fn ask(args: &AskArgs) -> Result<()> {
    let opened = open(&args.collection)?;
    let settings = &opened.settings;
    let model_name = args.model.as_deref().unwrap_or(&settings.model);
    let (_, device, path) = device_and_model(
        args.collection
            .device
            .as_deref()
            .or(settings.device.as_deref()),
        model_name,
    )?;
    let options = LoadOptions {
        adapter: settings.adapter.clone(),
        ..Default::default()
    };
    let model = Model::load_with(&path, &device, options, &mut |_| {})
        .with_context(|| format!("loading {}", path.display()))?;
    // The adapter is part of what answers, and so of cache keys.
    let generator_name = match &settings.adapter {
        Some(adapter) => format!("{} + {}", path.display(), adapter.display()),
        None => path.display().to_string(),
    };
    let breaker = CircuitBreaker::new(settings.breaker_config());
    let pipeline = pipeline(&opened, &args.query)?
        .with_generator(
            Arc::new(ModelGenerator::new(Arc::new(model), generator_name)),
            Arc::new(breaker),
        )
        .with_cache(result_cache(settings)?);
    let answer = pipeline.ask(
        &args.question,
        &query_options(&args.query, args.max_tokens)?,
    )?;
    println!("{}\n", answer.answer.as_deref().unwrap_or_default());
    println!("Sources:");
    print_sources(&answer);
    print_timings(&answer);
    Ok(())
}
