//! moera's HTTP server: an OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/models`) over continuously batched generation,
//! retrieval-augmented answers (`/api/query`, `/api/documents`, `/api/collections`),
//! background training jobs (`/api/train`), WebSocket streams (`/ws/stream`,
//! `/ws/train/{id}`), a small web page, `/health` and Prometheus `/metrics`.
//!
//! ```no_run
//! use moera_engine::rag::settings::Secret;
//! use moera_server::{ModelSpec, ServerConfig, serve};
//!
//! # async fn run() -> Result<(), moera_server::ServerError> {
//! let mut config = ServerConfig::new(vec![ModelSpec::new("smollm2", "models/smollm2.gguf")]);
//! config.api_key = Some(Secret::new("secret"));
//! serve(config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

pub mod api;
pub mod auth;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod rag;
pub mod web;
pub mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use moera_engine::batch::{Scheduler, SchedulerConfig, SchedulerStats};
use moera_engine::embed::{BertEmbedder, Embedder};
use moera_engine::rag::breaker::{BreakerConfig, CircuitBreaker};
use moera_engine::rag::cache::MemoryResultCache;
use moera_engine::rag::settings::{Secret, Settings};
use moera_engine::{DeviceKind, LoadOptions, Model};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::ApiKey;
use crate::error::ApiError;
use crate::metrics::{Metrics, Snapshot};

/// A model to serve: its name in requests, its folder or `.gguf` file, and the PEFT
/// adapters loaded beside it (each a model name of its own in requests).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    pub adapters: Vec<(String, PathBuf)>,
}

impl ModelSpec {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            adapters: Vec::new(),
        }
    }

    pub fn adapter(mut self, name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.adapters.push((name.into(), dir.into()));
        self
    }
}

/// Everything the server is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The models; a request without `model` goes to the first.
    pub models: Vec<ModelSpec>,
    pub addr: SocketAddr,
    /// Clients must present this key (`None` leaves the API open).
    pub api_key: Option<Secret>,
    /// Listen on a non-loopback address without a key.
    pub insecure: bool,
    /// The backend; `None` picks the default one.
    pub device: Option<DeviceKind>,
    /// A sentence-transformers folder for `/v1/embeddings` and retrieval.
    pub embedder: Option<PathBuf>,
    /// The folder of the collections (and of uploaded documents and training output).
    pub data_dir: PathBuf,
    /// The collection of requests that name none.
    pub default_collection: String,
    /// Sequences decoded together per model.
    pub max_batch: usize,
    /// Requests waiting per model before new ones are refused with 503.
    pub max_waiting: usize,
    /// `max_tokens` of requests that give none (less where the context is shorter).
    pub default_max_tokens: usize,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Longest wait for a response's headers.
    pub request_timeout: Duration,
    /// Largest request body (413 beyond), and WebSocket message.
    pub max_request_bytes: usize,
    /// Time to live of cached `/api/query` answers (zero: no cache).
    pub cache_ttl: Duration,
    /// The circuit breaker around retrieval-augmented generation.
    pub breaker: BreakerConfig,
}

impl ServerConfig {
    /// Defaults from [`Settings::default`] for `models`.
    pub fn new(models: Vec<ModelSpec>) -> Self {
        Self::from_settings(&Settings::default(), models)
    }

    /// Address, key, data folder, collection, cache, breaker and body limit from `settings`.
    pub fn from_settings(settings: &Settings, models: Vec<ModelSpec>) -> Self {
        Self {
            models,
            addr: settings.bind,
            api_key: settings.api_key.clone(),
            insecure: false,
            device: settings.device_kind(),
            embedder: None,
            data_dir: settings.data_dir.clone(),
            default_collection: settings.collection.clone(),
            max_batch: 32,
            max_waiting: 256,
            default_max_tokens: 256,
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(300),
            max_request_bytes: settings.max_request_bytes,
            cache_ttl: settings.cache_ttl,
            breaker: settings.breaker_config(),
        }
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no model to serve: give at least one --model")]
    NoModels,
    #[error("the name {0:?} is given to more than one model or adapter")]
    DuplicateName(String),
    #[error("loading model {name} from {path}: {source}")]
    Load {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<moera_engine::Error>,
    },
    #[error("loading the embedder {path}: {source}")]
    Embedder {
        path: PathBuf,
        #[source]
        source: Box<moera_engine::Error>,
    },
    #[error(
        "refusing to listen on {0} without an API key: set --api-key (or MOERA_API_KEY), listen on \
         a loopback address, or pass --insecure"
    )]
    InsecureBind(SocketAddr),
    #[error("the API key is empty: give a key, or none to turn authentication off")]
    EmptyApiKey,
    #[error("CORS origin {0:?} is not a valid header value")]
    CorsOrigin(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Engine(Box<moera_engine::Error>),
}

impl From<moera_engine::Error> for ServerError {
    fn from(error: moera_engine::Error) -> Self {
        Self::Engine(Box::new(error))
    }
}

/// A served model and its scheduler.
pub struct ServedModel {
    pub name: String,
    pub path: PathBuf,
    pub scheduler: Scheduler,
    pub adapters: Vec<String>,
}

impl ServedModel {
    pub fn model(&self) -> &Arc<Model> {
        self.scheduler.model()
    }
}

/// The embedder and the name requests give it.
pub struct ServedEmbedder {
    pub name: String,
    pub embedder: Arc<BertEmbedder>,
}

/// Open WebSocket sessions: axum's graceful shutdown waits for connections, and upgraded
/// ones are not connections to it any more.
#[derive(Default)]
pub(crate) struct Sessions {
    open: AtomicUsize,
    changed: Notify,
}

/// Counts a session while alive.
pub(crate) struct SessionGuard(Arc<Inner>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.open.fetch_sub(1, Ordering::SeqCst);
        self.0.sessions.changed.notify_waiters();
    }
}

impl Sessions {
    async fn wait_closed(&self) {
        loop {
            let changed = self.changed.notified();
            if self.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }
}

pub(crate) struct Inner {
    pub(crate) config: ServerConfig,
    pub(crate) models: Vec<ServedModel>,
    pub(crate) embedder: Option<ServedEmbedder>,
    api_key: Option<ApiKey>,
    pub(crate) metrics: Metrics,
    pub(crate) breaker: Arc<CircuitBreaker>,
    pub(crate) cache: Option<Arc<MemoryResultCache>>,
    pub(crate) collections: rag::Collections,
    /// Held by an ingestion: two would race on the same folders and collections.
    pub(crate) ingest_lock: Mutex<()>,
    pub(crate) jobs: jobs::Jobs,
    pub(crate) device: DeviceKind,
    /// Unix time of the start, the `created` of `/v1/models`.
    pub(crate) created: u64,
    shutting_down: AtomicBool,
    /// Turns true when shutdown begins: sessions that wait for something close.
    pub(crate) shutdown: watch::Sender<bool>,
    sessions: Sessions,
}

/// What the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

impl AppState {
    /// Loads the models (one scheduler each) and the embedder. Blocks while loading.
    pub fn load(config: ServerConfig) -> Result<Self, ServerError> {
        if config.models.is_empty() {
            return Err(ServerError::NoModels);
        }
        let mut names = std::collections::HashSet::new();
        let all_names = config.models.iter().flat_map(|spec| {
            std::iter::once(&spec.name).chain(spec.adapters.iter().map(|(name, _)| name))
        });
        for name in all_names {
            if !names.insert(name.clone()) {
                return Err(ServerError::DuplicateName(name.clone()));
            }
        }
        for origin in &config.cors_origins {
            if origin != "*" && HeaderValue::from_str(origin).is_err() {
                return Err(ServerError::CorsOrigin(origin.clone()));
            }
        }
        let kind = match config.device {
            Some(kind) => kind,
            None => DeviceKind::default_kind()?,
        };
        let device = kind.device()?;
        let scheduler_config = SchedulerConfig {
            max_batch: config.max_batch.max(1),
            max_waiting: config.max_waiting.max(1),
        };
        let mut models = Vec::new();
        for spec in &config.models {
            let started = Instant::now();
            let options = LoadOptions {
                named_adapters: spec.adapters.clone(),
                ..LoadOptions::default()
            };
            let model =
                Model::load_with(&spec.path, &device, options, &mut |_| {}).map_err(|source| {
                    ServerError::Load {
                        name: spec.name.clone(),
                        path: spec.path.clone(),
                        source: Box::new(source),
                    }
                })?;
            let adapters = model.adapter_names().map(str::to_string).collect();
            tracing::info!(
                model = %spec.name,
                path = %spec.path.display(),
                architecture = model.architecture(),
                context = model.max_context(),
                device = %kind,
                seconds = started.elapsed().as_secs_f32(),
                "model loaded"
            );
            models.push(ServedModel {
                name: spec.name.clone(),
                path: spec.path.clone(),
                scheduler: Scheduler::start(Arc::new(model), scheduler_config),
                adapters,
            });
        }
        let embedder = match &config.embedder {
            Some(path) => {
                let embedder =
                    BertEmbedder::load(path, &device).map_err(|source| ServerError::Embedder {
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
                let name = embedder_name(path);
                tracing::info!(embedder = %name, dimension = embedder.dimension(), "embedder loaded");
                Some(ServedEmbedder {
                    name,
                    embedder: Arc::new(embedder),
                })
            }
            None => None,
        };
        let cache = (!config.cache_ttl.is_zero())
            .then(|| Arc::new(MemoryResultCache::new(256, config.cache_ttl)));
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            inner: Arc::new(Inner {
                api_key: config.api_key.as_ref().map(|key| ApiKey::new(key.expose())),
                breaker: Arc::new(CircuitBreaker::new(config.breaker)),
                collections: rag::Collections::default(),
                ingest_lock: Mutex::new(()),
                jobs: jobs::Jobs::default(),
                metrics: Metrics::default(),
                shutdown: watch::channel(false).0,
                shutting_down: AtomicBool::new(false),
                sessions: Sessions::default(),
                device: kind,
                created,
                cache,
                embedder,
                models,
                config,
            }),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn models(&self) -> &[ServedModel] {
        &self.inner.models
    }

    pub fn embedder(&self) -> Option<&ServedEmbedder> {
        self.inner.embedder.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn api_key(&self) -> Option<&ApiKey> {
        self.inner.api_key.as_ref()
    }

    /// Every scheduler's counters, summed.
    pub fn scheduler_stats(&self) -> SchedulerStats {
        let mut total = SchedulerStats::default();
        for served in &self.inner.models {
            let s = served.scheduler.stats();
            total.waiting += s.waiting;
            total.running += s.running;
            total.submitted += s.submitted;
            total.finished += s.finished;
            total.cancelled += s.cancelled;
            total.prompt_tokens += s.prompt_tokens;
            total.generated_tokens += s.generated_tokens;
            total.decode_steps += s.decode_steps;
            total.decoded_rows += s.decoded_rows;
        }
        total
    }

    /// The model a request's `model` field names (the first when it names none), and the
    /// adapter when it names one.
    pub fn resolve_model(
        &self,
        requested: Option<&str>,
    ) -> Result<(&ServedModel, Option<String>), ApiError> {
        let models = &self.inner.models;
        let Some(name) = requested.filter(|name| !name.is_empty()) else {
            return Ok((&models[0], None));
        };
        if let Some(served) = models.iter().find(|m| m.name == name) {
            return Ok((served, None));
        }
        if let Some(served) = models.iter().find(|m| m.adapters.iter().any(|a| a == name)) {
            return Ok((served, Some(name.to_string())));
        }
        Err(ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(format!("the model `{name}` does not exist"))
        })
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Stops taking generations (those under way finish) and tells waiting sessions.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for served in &self.inner.models {
            served.scheduler.drain();
        }
        self.inner.shutdown.send_replace(true);
    }

    pub(crate) fn open_session(&self) -> SessionGuard {
        self.inner.sessions.open.fetch_add(1, Ordering::SeqCst);
        SessionGuard(Arc::clone(&self.inner))
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            scheduler: self.scheduler_stats(),
            cache: self
                .inner
                .cache
                .as_ref()
                .map(|cache| cache.stats())
                .unwrap_or_default(),
            breaker: Some(self.inner.breaker.state()),
            training_jobs_running: self.inner.jobs.running(),
        }
    }
}

/// The name the embedder is served under: its folder's name, or `all-MiniLM-L6-v2` for
/// the folder the model cache keeps it in.
fn embedder_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let minilm = moera_engine::hub::resolve_model("minilm");
    if name.is_empty() || name == "model" || path == minilm {
        "all-MiniLM-L6-v2".into()
    } else {
        name
    }
}

/// Every route, with authentication, limits, timeouts, metrics, logs and CORS.
pub fn router(state: AppState) -> Router {
    let config = state.config();
    let protected = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/api/query", post(api::query))
        .route("/api/documents", post(api::documents))
        .route("/api/collections", get(api::collections))
        .route("/api/train", post(api::start_training))
        .route("/api/train/{id}", get(api::training_status))
        .route("/ws/stream", get(ws::stream))
        .route("/ws/train/{id}", get(ws::train))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let mut app = Router::new()
        .route("/health", get(health))
        .merge(web::routes())
        .merge(protected)
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(config.max_request_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            time_and_count,
        ))
        .layer(
            TraceLayer::new_for_http()
                // The path only: a WebSocket's query may hold the key.
                .make_span_with(|request: &Request| {
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                    )
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        );
    if !config.cors_origins.is_empty() {
        let origins = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                config
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app.with_state(state)
}

/// Times out requests whose response does not start in time, and counts every request by
/// route and status.
async fn time_and_count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let timeout = state.config().request_timeout;
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(format!(
            "the request did not complete within {} s",
            timeout.as_secs_f64()
        ))
        .into_response(),
    };
    state
        .metrics()
        .record_request(&route, response.status().as_u16(), started.elapsed());
    response
}

/// `GET /health`: open, for load balancers.
async fn health(State(state): State<AppState>) -> Response {
    let stats = state.scheduler_stats();
    axum::Json(json!({
        "status": if state.is_shutting_down() { "shutting_down" } else { "ok" },
        "models": state.models().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        "embedder": state.embedder().map(|e| e.name.as_str()),
        "running": stats.running,
        "waiting": stats.waiting,
    }))
    .into_response()
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics_text(State(state): State<AppState>) -> Response {
    let text = state.metrics().render(&state.snapshot());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// A bound server, ready to [`run`](Self::run).
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    addr: SocketAddr,
}

impl Server {
    /// Checks the address, loads the models and binds (port 0 picks a free port; see
    /// [`local_addr`](Self::local_addr)).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        check_exposure(&config)?;
        let state = tokio::task::spawn_blocking(move || AppState::load(config))
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))??;
        Self::bind_state(state).await
    }

    /// Binds a server for models already loaded.
    pub async fn bind_state(state: AppState) -> Result<Self, ServerError> {
        let addr = state.config().addr;
        check_exposure(state.config())?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            state,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: stops accepting,
    /// refuses new generations, lets those under way (and their streams) finish, and waits
    /// for the schedulers to stop.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self {
            listener,
            state,
            addr,
        } = self;
        tracing::info!(
            %addr,
            auth = state.api_key().is_some(),
            models = ?state.models().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            "listening on http://{addr}"
        );
        let signal = {
            let state = state.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: finishing the requests under way");
                state.begin_shutdown();
            }
        };
        // Streams under way get the request timeout to end after the signal: a client that
        // stopped reading must not keep the server alive.
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let timeout = state.config().request_timeout;
        let signal = async move {
            signal.await;
            let _ = stop_tx.send(());
        };
        // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds each one
        // until the client's delayed ACK (about 40 ms), which streaming cannot afford.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        });
        let serving = axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(signal)
            .into_future();
        let deadline = async move {
            if stop_rx.await.is_ok() {
                tokio::time::sleep(timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            served = serving => served.map_err(ServerError::Serve)?,
            () = deadline => tracing::warn!(
                "connections still open {timeout:?} after the shutdown signal; closing anyway"
            ),
        }
        // WebSocket sessions outlive their connections in axum's eyes.
        let timeout = state.config().request_timeout;
        if tokio::time::timeout(timeout, state.inner.sessions.wait_closed())
            .await
            .is_err()
        {
            tracing::warn!("WebSocket sessions still open after {timeout:?}; closing anyway");
        }
        let schedulers: Vec<Scheduler> =
            state.models().iter().map(|m| m.scheduler.clone()).collect();
        let joined = tokio::task::spawn_blocking(move || {
            for scheduler in schedulers {
                scheduler.join();
            }
        });
        if tokio::time::timeout(timeout, joined).await.is_err() {
            tracing::warn!("generations still running after {timeout:?}; exiting anyway");
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Refuses a non-loopback address without a key, unless `insecure`.
fn check_exposure(config: &ServerConfig) -> Result<(), ServerError> {
    if config
        .api_key
        .as_ref()
        .is_some_and(|key| key.expose().trim().is_empty())
    {
        return Err(ServerError::EmptyApiKey);
    }
    if config.api_key.is_none() && !config.addr.ip().is_loopback() {
        if config.insecure {
            tracing::warn!(
                addr = %config.addr,
                "listening on a non-loopback address without an API key (--insecure)"
            );
        } else {
            return Err(ServerError::InsecureBind(config.addr));
        }
    }
    Ok(())
}

/// Loads, binds and serves until `shutdown` completes (see [`Server::run`]).
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}

/// Locks a mutex even if a panicking holder poisoned it (the data stays consistent: every
/// critical section here is a plain insert or read).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh identifier with `prefix`: time and a counter, unique within the process.
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{:04x}", nanos & 0xffff_ffff_ffff, n & 0xffff)
}

/// A map guarded by a mutex, shared by the modules that keep things by name.
pub(crate) type Registry<T> = Mutex<HashMap<String, T>>;
