//! moera's own API: `/api/query` (retrieval and generation together), `/api/documents`
//! and `/api/collections` (ingestion), `/api/train` (background training jobs).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moera_engine::embed::Embedder;
use moera_engine::rag::cache::{ResultCache, result_cache_key};
use moera_engine::rag::chunk::ChunkOptions;
use moera_engine::rag::ingest::{IngestReport, Ingestor};
use moera_engine::rag::pipeline::{QueryOptions, RagAnswer, RagPipeline};
use moera_engine::train::{TrainingConfig, TrainingStrategy};
use moera_index::DurableCollection;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiJson};
use crate::jobs::{JobSpec, lora_spec, write_examples};
use crate::rag::SchedulerGenerator;
use crate::{AppState, ServedEmbedder, lock, new_id};

/// Passages a query may ask for at most.
const MAX_K: usize = 50;

/// The embedder, which retrieval and ingestion need.
pub(crate) fn require_embedder(state: &AppState) -> Result<&ServedEmbedder, ApiError> {
    state.embedder().ok_or_else(|| {
        ApiError::bad_request(
            "this server has no embedder for retrieval (start it with --embedder)",
        )
    })
}

/// Collection `name` (the default one when `None`), opened on a blocking thread; a
/// collection that does not exist is a 404 unless `create`.
pub(crate) async fn collection(
    state: &AppState,
    name: Option<&str>,
    create: bool,
) -> Result<(String, Arc<DurableCollection>), ApiError> {
    let embedder = require_embedder(state)?;
    let name = name
        .filter(|n| !n.is_empty())
        .unwrap_or(&state.config().default_collection)
        .to_string();
    let dimension = embedder.embedder.dimension();
    let task_state = state.clone();
    let task_name = name.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let data_dir = &task_state.config().data_dir;
        task_state
            .inner
            .collections
            .get(data_dir, &task_name, dimension, create)
    })
    .await
    .map_err(|e| ApiError::internal(format!("collection task: {e}")))?;
    match opened {
        Ok(collection) => Ok((name, collection)),
        Err(moera_engine::Error::Index(moera_index::StoreError::NotFound(_))) => Err(ApiError {
            param: Some("collection".into()),
            ..ApiError::not_found(format!("the collection `{name}` does not exist"))
        }),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
pub struct QueryRequest {
    pub question: String,
    pub collection: Option<String>,
    pub k: Option<usize>,
    pub max_tokens: Option<usize>,
    pub model: Option<String>,
}

/// Retrieval of `k` passages: four times as many candidates (at least 20) to rerank.
pub(crate) fn query_options(k: usize) -> QueryOptions {
    QueryOptions {
        k,
        candidates: (k * 4).max(20),
        ..QueryOptions::default()
    }
}

pub(crate) fn check_k(k: Option<usize>) -> Result<usize, ApiError> {
    match k.unwrap_or(5) {
        k @ 1..=MAX_K => Ok(k),
        k => Err(ApiError::invalid_param(
            "k",
            format!("k must be between 1 and {MAX_K}, got {k}"),
        )),
    }
}

/// `POST /api/query`: the model answers the bare question while retrieval runs; the
/// answer comes with the passages found and the timings of both.
pub async fn query(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<QueryRequest>,
) -> Result<Json<RagAnswer>, ApiError> {
    let question = request.question.trim().to_string();
    if question.is_empty() {
        return Err(ApiError::invalid_param("question", "the question is empty"));
    }
    let k = check_k(request.k)?;
    let max_tokens = match request.max_tokens {
        Some(0) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(n) => n,
        None => state.config().default_max_tokens,
    };
    let (served, adapter) = state.resolve_model(request.model.as_deref())?;
    let embedder = require_embedder(&state)?.embedder.clone();
    let (name, collection) = collection(&state, request.collection.as_deref(), false).await?;
    let generator = SchedulerGenerator {
        scheduler: served.scheduler.clone(),
        name: served.name.clone(),
        adapter,
    };
    // Only greedy answers are worth caching: sampled ones differ on purpose.
    let cache = state
        .inner
        .cache
        .clone()
        .filter(|_| served.model().default_sampling.is_greedy());
    let key = {
        let inner = collection.collection();
        let version = format!("{} {}", inner.count(), inner.nodes());
        result_cache_key(&[
            "query",
            &question,
            &name,
            &version,
            &k.to_string(),
            &max_tokens.to_string(),
            &moera_engine::rag::pipeline::Generator::name(&generator),
        ])
    };
    if let Some(cache) = &cache
        && let Some(hit) = cache
            .get(&key)
            .and_then(|json| serde_json::from_str::<RagAnswer>(&json).ok())
    {
        return Ok(Json(RagAnswer {
            cached: true,
            ..hit
        }));
    }
    let pipeline = Arc::new(
        RagPipeline::new(embedder, collection)
            .with_generator(Arc::new(generator), state.inner.breaker.clone()),
    );
    let options = QueryOptions {
        max_tokens,
        ..query_options(k)
    };
    let answer = pipeline.query(&question, &options).await?;
    if let Some(cache) = &cache
        && let Ok(json) = serde_json::to_string(&answer)
    {
        cache.put(&key, &json);
    }
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
pub struct DocumentsRequest {
    pub collection: Option<String>,
    pub documents: Vec<Document>,
}

#[derive(Debug, Deserialize)]
pub struct Document {
    pub name: String,
    pub text: String,
}

/// A document's file name: one path component of safe characters, with an extension the
/// ingestor reads (`.txt` added otherwise).
pub fn sanitize_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // File names longer than the file system allows would fail the write.
    let cleaned: String = cleaned
        .trim()
        .trim_start_matches('.')
        .chars()
        .take(120)
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.' || c == '_') {
        return None;
    }
    let lower = cleaned.to_ascii_lowercase();
    let known = [".txt", ".md", ".markdown", ".html", ".htm"];
    Some(if known.iter().any(|ext| lower.ends_with(ext)) {
        cleaned
    } else {
        format!("{cleaned}.txt")
    })
}

fn report_json(collection: &str, report: &IngestReport, points: usize) -> Value {
    json!({
        "collection": collection,
        "files": report.files,
        "added": report.added,
        "replaced": report.replaced,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "ignored": report.ignored,
        "skipped": report.skipped.iter().map(|s| json!({
            "path": s.path.display().to_string(),
            "reason": s.reason,
        })).collect::<Vec<_>>(),
        "chunks_written": report.chunks_written,
        "chunks_deleted": report.chunks_deleted,
        "points": points,
    })
}

/// `POST /api/documents`: writes the documents under `<data_dir>/documents/<collection>/`
/// and ingests that folder into the collection.
pub async fn documents(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<DocumentsRequest>,
) -> Result<Json<Value>, ApiError> {
    let embedder = require_embedder(&state)?.embedder.clone();
    if request.documents.is_empty() {
        return Err(ApiError::invalid_param("documents", "no documents given"));
    }
    let mut files = Vec::with_capacity(request.documents.len());
    for document in request.documents {
        let name = sanitize_name(&document.name).ok_or_else(|| {
            ApiError::invalid_param(
                "documents",
                format!("document name {:?} is not usable", document.name),
            )
        })?;
        if document.text.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "documents",
                format!("document {name:?} is empty"),
            ));
        }
        files.push((name, document.text));
    }
    let (name, collection) = collection(&state, request.collection.as_deref(), true).await?;
    let dir = state.config().data_dir.join("documents").join(&name);
    let task_state = state.clone();
    let task_name = name.clone();
    let report = tokio::task::spawn_blocking(move || {
        // One ingestion at a time: two would race on the same folder and collection.
        let _ingesting = lock(&task_state.inner.ingest_lock);
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| moera_engine::Error::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for (file, text) in &files {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let ingestor = Ingestor::new(embedder.as_ref(), ChunkOptions::default())?;
        let report = ingestor.ingest(&dir, &collection, &mut |_| {})?;
        let points = collection.collection().count();
        Ok::<_, moera_engine::Error>(report_json(&task_name, &report, points))
    })
    .await
    .map_err(|e| ApiError::internal(format!("ingestion task: {e}")))??;
    tracing::info!(collection = %name, report = %report, "documents ingested");
    Ok(Json(report))
}

/// `GET /api/collections`.
pub async fn collections(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let task_state = state.clone();
    let list = tokio::task::spawn_blocking(move || {
        task_state
            .inner
            .collections
            .list(&task_state.config().data_dir)
    })
    .await
    .map_err(|e| ApiError::internal(format!("collections task: {e}")))??;
    let collections: Vec<Value> = list
        .into_iter()
        .map(|(name, points, dimension)| {
            json!({"name": name, "points": points, "dimension": dimension})
        })
        .collect();
    Ok(Json(json!({
        "collections": collections,
        "default": state.config().default_collection,
    })))
}

#[derive(Debug, Deserialize)]
pub struct TrainRequest {
    pub model: Option<String>,
    pub data: Option<PathBuf>,
    pub examples: Option<Vec<Value>>,
    pub strategy: Option<String>,
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub learning_rate: Option<f64>,
    pub epochs: Option<usize>,
    pub max_steps: Option<usize>,
    pub seq_len: Option<usize>,
    pub batch_size: Option<usize>,
    /// A folder name under `<data_dir>/training/` (default: the job's id).
    pub out: Option<String>,
    pub seed: Option<u64>,
}

/// Bounds of a training request: beyond them a job would only exhaust the machine.
const MAX_LORA_RANK: usize = 256;
const MAX_BATCH_SIZE: usize = 64;
const MAX_EPOCHS: usize = 100;
/// Training jobs queued or running at most; one runs at a time.
const MAX_PENDING_JOBS: usize = 8;

/// `POST /api/train`: checks the request, queues the job and answers 202 at once.
pub async fn start_training(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TrainRequest>,
) -> Result<Response, ApiError> {
    let seed = request.seed.unwrap_or(42);
    let strategy = match request.strategy.as_deref().unwrap_or("lora") {
        "lora" => {
            let r = request.r.unwrap_or(8);
            let alpha = request.alpha.unwrap_or(16.0);
            if r == 0 || r > MAX_LORA_RANK || !alpha.is_finite() {
                return Err(ApiError::invalid_param(
                    "r",
                    format!("LoRA needs 1 ≤ r ≤ {MAX_LORA_RANK} and a finite alpha"),
                ));
            }
            TrainingStrategy::Lora(lora_spec(r, alpha, seed))
        }
        "full" => TrainingStrategy::Full,
        other => {
            return Err(ApiError::invalid_param(
                "strategy",
                format!("strategy must be \"lora\" or \"full\", got {other:?}"),
            ));
        }
    };
    let learning_rate = request.learning_rate.unwrap_or(2e-4);
    if !(learning_rate.is_finite() && learning_rate > 0.0) {
        return Err(ApiError::invalid_param(
            "learning_rate",
            "learning_rate must be positive",
        ));
    }
    let epochs = request.epochs.unwrap_or(1);
    let batch_size = request.batch_size.unwrap_or(1);
    let seq_len = request.seq_len.unwrap_or(256);
    // The model: a served one by name (clients cannot make the server load other files).
    let served = match request.model.as_deref() {
        None | Some("") => &state.models()[0],
        Some(name) => state
            .models()
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(format!("the model `{name}` is not served here"))
            })?,
    };
    let (model_name, model_path) = (served.name.clone(), served.path.clone());
    let context = served.model().max_context();
    if epochs == 0
        || epochs > MAX_EPOCHS
        || batch_size == 0
        || batch_size > MAX_BATCH_SIZE
        || request.max_steps == Some(0)
        || !(2..=context).contains(&seq_len)
    {
        return Err(ApiError::bad_request(format!(
            "need 1 ≤ epochs ≤ {MAX_EPOCHS}, 1 ≤ batch_size ≤ {MAX_BATCH_SIZE}, max_steps ≥ 1 \
             and 2 ≤ seq_len ≤ {context} (the model's context)"
        )));
    }
    if state.inner.jobs.pending() >= MAX_PENDING_JOBS {
        return Err(ApiError::unavailable(format!(
            "{MAX_PENDING_JOBS} training jobs are already queued or running"
        )));
    }
    let id = new_id("train");
    // Outputs and data files stay inside the data folder.
    let training_root = state.config().data_dir.join("training");
    let out = match request.out.as_deref() {
        None => training_root.join(&id),
        Some(name) if is_plain_name(name) => training_root.join(name),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "out",
                "out must be a plain folder name (it goes under the data folder's training/)",
            ));
        }
    };
    let data = match (request.data, request.examples) {
        (Some(data), None) => inside_data_dir(&state.config().data_dir, &data)
            .filter(|path| path.is_file())
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "data",
                    "data must name a JSONL file inside the server's data folder",
                )
            })?,
        (None, Some(examples)) => {
            if examples.is_empty() {
                return Err(ApiError::invalid_param("examples", "no examples given"));
            }
            for (i, example) in examples.iter().enumerate() {
                serde_json::from_value::<moera_engine::dataset::Example>(example.clone())
                    .map_err(|_| {
                        ApiError::invalid_param(
                            "examples",
                            format!(
                                "example {i}: expected {{\"prompt\", \"completion\"}} or {{\"messages\": [...]}}"
                            ),
                        )
                    })?;
            }
            let dir = out.clone();
            tokio::task::spawn_blocking(move || write_examples(&dir, &examples))
                .await
                .map_err(|e| ApiError::internal(format!("writing examples: {e}")))?
                .map_err(|e| ApiError::internal(format!("writing examples: {e}")))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either `data` (a JSONL file) or `examples`",
            ));
        }
    };
    let config = TrainingConfig {
        strategy,
        learning_rate,
        epochs,
        batch_size,
        max_steps: request.max_steps,
        output_dir: Some(out.clone()),
        seed,
        ..TrainingConfig::default()
    };
    let spec = JobSpec {
        model: model_path,
        data,
        config,
        seq_len,
        out: out.clone(),
    };
    let job = state
        .inner
        .jobs
        .start(id.clone(), model_name, spec, state.inner.device)
        .map_err(|e| ApiError::internal(format!("starting the training thread: {e}")))?;
    tracing::info!(job = %id, out = %out.display(), "training job queued");
    let report = job.report();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": report.id, "status": report.status, "out": report.out})),
    )
        .into_response())
}

/// A folder name of letters, digits, `-`, `_` and `.` (not leading), at most 100 bytes.
fn is_plain_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `path` (relative to `data_dir`, or absolute) resolved, if it lies inside `data_dir`.
fn inside_data_dir(data_dir: &std::path::Path, path: &std::path::Path) -> Option<PathBuf> {
    let root = data_dir.canonicalize().ok()?;
    let resolved = root.join(path).canonicalize().ok()?;
    resolved.starts_with(&root).then_some(resolved)
}

/// `GET /api/train/{id}`.
pub async fn training_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<crate::jobs::JobReport>, ApiError> {
    state
        .inner
        .jobs
        .get(&id)
        .map(|job| Json(job.report()))
        .ok_or_else(|| ApiError::not_found(format!("no training job `{id}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_names_are_one_safe_component() {
        assert_eq!(sanitize_name("notes.md").as_deref(), Some("notes.md"));
        assert_eq!(
            sanitize_name("../../etc/passwd").as_deref(),
            Some("passwd.txt")
        );
        assert_eq!(sanitize_name("a/b\\c.html").as_deref(), Some("c.html"));
        assert_eq!(sanitize_name(".hidden").as_deref(), Some("hidden.txt"));
        assert_eq!(sanitize_name("what?.txt").as_deref(), Some("what_.txt"));
        assert_eq!(sanitize_name(".."), None);
        assert_eq!(sanitize_name("dir/"), None);
        assert_eq!(sanitize_name(""), None);
    }
}
