//! Starting a server for a test, and small client helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use moera_engine::DeviceKind;
use moera_engine::rag::settings::Secret;
use moera_server::{AppState, ModelSpec, Server, ServerConfig, ServerError};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const KEY: &str = "test-key-0123";
pub const MODEL: &str = "tiny-chat";
/// The fixture's context window.
pub const CONTEXT: usize = 512;

pub fn tiny_chat() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/tiny-chat"
    ))
}

/// MiniLM from the model cache, or `None` (with a note) when it was not fetched.
pub fn minilm() -> Option<PathBuf> {
    let path = moera_engine::hub::resolve_model("minilm");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED (embeddings): minilm is not in the model cache ({}); run scripts/fetch-models.sh",
            path.display()
        );
        None
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _data_dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a free loopback port with the tiny chat model and [`KEY`]; `edit`
    /// changes the configuration first.
    pub async fn start_with(edit: impl FnOnce(&mut ServerConfig)) -> Self {
        let data_dir = tempfile::tempdir().expect("temporary folder");
        let mut config = ServerConfig::new(vec![ModelSpec::new(MODEL, tiny_chat())]);
        config.addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.api_key = Some(Secret::new(KEY));
        config.data_dir = data_dir.path().to_path_buf();
        config.device = cfg!(feature = "flex").then_some(DeviceKind::Flex);
        config.max_request_bytes = 64 * 1024;
        config.default_max_tokens = 32;
        edit(&mut config);
        let server = Server::bind(config).await.expect("the server starts");
        let addr = server.local_addr();
        let state = server.state().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
            _data_dir: data_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Starts the graceful shutdown; [`TestServer::stopped`] waits for its end.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits for `run` to return (within `within`).
    pub async fn stopped(&mut self, within: Duration) -> Result<(), ServerError> {
        self.trigger_shutdown();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(within, task)
            .await
            .expect("the server stops in time")
            .expect("the server task does not panic")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = client()
            .get(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = client()
            .post(self.url(path))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, name).unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    }

    /// Polls `/health` until `running` and `waiting` are 0.
    pub async fn wait_idle(&self, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (_, health) = self.get("/health").await;
            if health["running"] == 0 && health["waiting"] == 0 {
                return health;
            }
            assert!(
                start.elapsed() < within,
                "still busy after {within:?}: {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

/// The `data:` payloads of a server-sent event stream.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.trim_start().to_string())
        .collect()
}

/// Asserts an OpenAI error body of `kind` and returns its message.
pub fn error_message(body: &Value, kind: &str) -> String {
    assert_eq!(body["error"]["type"], kind, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "no message in {body}");
    message.to_string()
}
