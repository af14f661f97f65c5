//! WebSockets: `/ws/stream` streams one generation (optionally grounded in a collection) as
//! JSON messages, and `/ws/train/{id}` a training job's events. A client that goes away
//! drops its generation, which the scheduler then cancels.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, State};
use axum::response::Response;
use moera_engine::rag::pipeline::{Passage, RagPipeline};
use moera_engine::{Prompt, TokenEvent};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::api::{check_k, collection, query_options, require_embedder};
use crate::error::ApiError;
use crate::jobs::{Job, is_terminal};
use crate::openai::{
    GenerationOptions, InputMessage, chat_messages, finish_reason, start, usage_json,
};
use crate::rag::fit_grounded_prompt;

/// The one message a `/ws/stream` client sends.
#[derive(Debug, Deserialize)]
pub struct StreamRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<InputMessage>>,
    pub prompt: Option<String>,
    pub collection: Option<String>,
    pub k: Option<usize>,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// How a session ended early.
enum Failure {
    /// The request was refused or the generation failed: the client is told.
    Api(ApiError),
    /// The client went away.
    Gone,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

fn upgrade_error(rejection: axum::extract::ws::rejection::WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(format!(
        "this endpoint is a WebSocket: {}",
        axum::response::IntoResponse::into_response(rejection).status()
    ))
}

/// `GET /ws/stream`.
pub async fn stream(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(upgrade_error)?;
    let guard = state.open_session();
    let max = state.config().max_request_bytes;
    Ok(upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _guard = guard;
            stream_session(state, socket).await;
        }))
}

async fn send(socket: &mut WebSocket, value: Value) -> Result<(), Failure> {
    socket
        .send(Message::text(value.to_string()))
        .await
        .map_err(|_| Failure::Gone)
}

/// Sends a close frame and waits briefly for the client's, so that it sees a clean close.
async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Completes when the server begins to shut down (the watch's guard is not held across an
/// await, so that sessions stay `Send`).
async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}

/// The first text message, `None` if the client leaves first.
async fn first_text(socket: &mut WebSocket) -> Option<Result<String, ApiError>> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => return Some(Ok(text.as_str().to_string())),
            Ok(Message::Binary(_)) => {
                return Some(Err(ApiError::bad_request(
                    "send the request as a JSON text message",
                )));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => return None,
        }
    }
}

async fn stream_session(state: AppState, mut socket: WebSocket) {
    let mut shutdown = state.inner.shutdown.subscribe();
    let timeout = state.config().request_timeout;
    let first = tokio::select! {
        first = tokio::time::timeout(timeout, first_text(&mut socket)) => first,
        _ = shutting_down(&mut shutdown) => {
            close(socket, close_code::AWAY, "the server is shutting down").await;
            return;
        }
    };
    let text = match first {
        Ok(Some(Ok(text))) => text,
        Ok(Some(Err(error))) => return fail(socket, error).await,
        Ok(None) => return,
        Err(_) => {
            let error = ApiError::timeout("no request message came in time");
            return fail(socket, error).await;
        }
    };
    match generate(&state, &mut socket, &text).await {
        Ok(()) => close(socket, close_code::NORMAL, "").await,
        Err(Failure::Api(error)) => fail(socket, error).await,
        Err(Failure::Gone) => {
            tracing::debug!("WebSocket client went away; its generation is cancelled");
        }
    }
}

/// Tells the client why, then closes.
async fn fail(mut socket: WebSocket, error: ApiError) {
    if error.status.is_server_error() {
        tracing::error!(status = error.status.as_u16(), error = %error.message, "stream failed");
    }
    let message = json!({
        "type": "error",
        "status": error.status.as_u16(),
        "message": error.message,
    });
    if send(&mut socket, message).await.is_ok() {
        let code = if error.status.is_server_error() {
            close_code::ERROR
        } else {
            close_code::POLICY
        };
        close(socket, code, "").await;
    }
}

/// The question to retrieve passages for: the last user message.
fn question_of(messages: &[moera_engine::ChatMessage]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .or(messages.last())
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

async fn generate(state: &AppState, socket: &mut WebSocket, text: &str) -> Result<(), Failure> {
    let request: StreamRequest = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON message: {e}")))?;
    let options = request.options.check()?;
    let (prompt, question) = match (request.messages, request.prompt) {
        (Some(messages), None) => {
            let messages = chat_messages(messages)?;
            let question = question_of(&messages);
            (Prompt::Chat(messages), question)
        }
        (None, Some(prompt)) if !prompt.is_empty() => (Prompt::Text(prompt.clone()), prompt),
        _ => {
            return Err(
                ApiError::bad_request("give either `messages` or a non-empty `prompt`").into(),
            );
        }
    };
    let mut sources: Vec<Passage> = Vec::new();
    let prompt = match request.collection.as_deref().filter(|c| !c.is_empty()) {
        None => prompt,
        Some(name) => {
            let k = check_k(request.k)?;
            let embedder = require_embedder(state)?.embedder.clone();
            let (_, collection) = collection(state, Some(name), false).await?;
            let (served, _) = state.resolve_model(request.model.as_deref())?;
            let model = served.model().clone();
            let reserve = options.max_tokens.unwrap_or_else(|| {
                state
                    .config()
                    .default_max_tokens
                    .min(model.max_context() / 4)
            });
            let (messages, passages) = tokio::task::spawn_blocking(move || {
                let pipeline = RagPipeline::new(embedder, collection);
                let found = pipeline.search(&question, &query_options(k))?;
                fit_grounded_prompt(&model, &question, found.sources, reserve)
            })
            .await
            .map_err(|e| ApiError::internal(format!("retrieval task: {e}")))?
            .map_err(ApiError::from)?;
            sources = passages;
            Prompt::Chat(messages)
        }
    };
    let mut started = start(state, request.model.as_deref(), prompt, options).await?;
    let sources = serde_json::to_value(&sources).unwrap_or_default();
    send(
        socket,
        json!({
            "type": "start",
            "model": started.model,
            "prompt_tokens": started.prompt_tokens,
            "sources": sources,
        }),
    )
    .await?;
    loop {
        tokio::select! {
            event = started.tokens.next() => match event {
                Some(Ok(TokenEvent::Token { text, .. })) => {
                    if !text.is_empty() {
                        send(socket, json!({"type": "token", "text": text})).await?;
                    }
                }
                Some(Ok(TokenEvent::Done { reason, usage })) => {
                    let done = json!({
                        "type": "done",
                        "finish_reason": finish_reason(&reason),
                        "usage": usage_json(&usage),
                        "sources": sources,
                    });
                    return send(socket, done).await;
                }
                Some(Err(e)) => return Err(ApiError::from(e).into()),
                None => {
                    return Err(ApiError::internal("the generation ended without finishing").into());
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(Failure::Gone),
                Some(Ok(_)) => {}
            },
        }
    }
}

/// `GET /ws/train/{id}`.
pub async fn train(
    State(state): State<AppState>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let job = state
        .inner
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no training job `{id}`")))?;
    let upgrade = upgrade.map_err(upgrade_error)?;
    let guard = state.open_session();
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _guard = guard;
        train_session(state, job, socket).await;
    }))
}

fn event_json(event: &moera_engine::train::TrainingEvent) -> Value {
    serde_json::to_value(event).unwrap_or_default()
}

/// Replays the job's events, then streams new ones until the last.
async fn train_session(state: AppState, job: std::sync::Arc<Job>, mut socket: WebSocket) {
    let (history, mut live) = job.subscribe();
    for event in history {
        let terminal = is_terminal(&event);
        if send(&mut socket, event_json(&event)).await.is_err() {
            return;
        }
        if terminal {
            return close(socket, close_code::NORMAL, "").await;
        }
    }
    let mut shutdown = state.inner.shutdown.subscribe();
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(event) => {
                    let terminal = is_terminal(&event);
                    if send(&mut socket, event_json(&event)).await.is_err() {
                        return;
                    }
                    if terminal {
                        return close(socket, close_code::NORMAL, "").await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(job = %job.id, missed, "a training subscriber lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return close(socket, close_code::NORMAL, "").await;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = shutting_down(&mut shutdown) => {
                return close(socket, close_code::AWAY, "the server is shutting down").await;
            }
        }
    }
}
