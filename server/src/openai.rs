//! The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` (streamed as
//! server-sent events ending with `data: [DONE]`, or whole), `/v1/embeddings` and
//! `/v1/models`. The `model` field names a served model or one of its adapters, as vLLM
//! serves LoRA adapters.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use moera_engine::batch::GenerationStream;
use moera_engine::embed::Embedder;
use moera_engine::{ChatMessage, FinishReason, GenerationRequest, Prompt, TokenEvent, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiJson};
use crate::rag::prompt_and_budget;
use crate::{AppState, new_id};

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The sampling and length fields shared by chat, completion and WebSocket requests.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationOptions {
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Go on past end-of-sequence tokens until `max_tokens` (vLLM's extension, for
    /// benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// [`GenerationOptions`] checked.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl GenerationOptions {
    pub fn check(&self) -> Result<Checked, ApiError> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    "max_tokens must be at least 1",
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {t}"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} is not supported (only 0)"),
                ));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) if list.len() > 4 => {
                return Err(ApiError::invalid_param(
                    "stop",
                    "at most 4 stop sequences are supported",
                ));
            }
            Some(Stop::Many(list)) => list.clone(),
        };
        Ok(Checked {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|s| s as u64),
            stop,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// A chat message as clients send it: `content` a string or text parts.
#[derive(Debug, Clone, Deserialize)]
pub struct InputMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl InputMessage {
    pub fn into_chat(self) -> Result<ChatMessage, ApiError> {
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(piece)) => text.push_str(&piece),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!(
                                    "content parts of type {kind:?} are not supported (only text)"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(ChatMessage::new(self.role, content))
    }
}

/// Checks a conversation and turns it into the engine's messages.
pub fn chat_messages(messages: Vec<InputMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    messages.into_iter().map(InputMessage::into_chat).collect()
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InputMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// `prompt` of a completion: a string or a list of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    List(Vec<Value>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: CompletionPrompt,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// A generation accepted by a scheduler.
pub struct Started {
    /// The `model` it answers as (the adapter's name when it names one).
    pub model: String,
    pub prompt_tokens: usize,
    pub tokens: TimedStream,
}

/// A generation's events, timed into the latency histograms.
pub struct TimedStream {
    stream: GenerationStream,
    state: AppState,
    started: Instant,
    last: Option<Instant>,
}

impl TimedStream {
    pub async fn next(&mut self) -> Option<moera_engine::Result<TokenEvent>> {
        let event = self.stream.next_event().await;
        if let Some(Ok(TokenEvent::Token { .. })) = &event {
            let now = Instant::now();
            let metrics = self.state.metrics();
            match self.last {
                None => metrics.observe_time_to_first_token(now - self.started),
                Some(last) => metrics.observe_inter_token(now - last),
            }
            self.last = Some(now);
        }
        event
    }
}

/// Tokenizes `prompt` (on a blocking thread), sizes `max_tokens` and submits to the
/// scheduler of the model `model` names. Every refusal comes here, before any token.
pub async fn start(
    state: &AppState,
    model: Option<&str>,
    prompt: Prompt,
    options: Checked,
) -> Result<Started, ApiError> {
    let started = Instant::now();
    let (served, adapter) = state.resolve_model(model)?;
    let name = adapter.clone().unwrap_or_else(|| served.name.clone());
    let scheduler = served.scheduler.clone();
    let default_max = state.config().default_max_tokens;
    let stream = tokio::task::spawn_blocking(move || {
        let model = scheduler.model();
        let (ids, budget) = prompt_and_budget(model, &prompt, options.max_tokens, default_max)?;
        let mut sampling = model.default_sampling.clone();
        if let Some(t) = options.temperature {
            sampling.temperature = t;
        }
        if let Some(p) = options.top_p {
            sampling.top_p = p;
        }
        if options.seed.is_some() {
            sampling.seed = options.seed;
        }
        let mut request = GenerationRequest::ids(ids)
            .max_tokens(budget)
            .sampling(sampling)
            .stop(options.stop);
        request.adapter = adapter;
        request.stop_at_eos = !options.ignore_eos;
        scheduler.submit(request)
    })
    .await
    .map_err(|e| ApiError::internal(format!("generation task: {e}")))??;
    Ok(Started {
        model: name,
        prompt_tokens: stream.prompt_tokens(),
        tokens: TimedStream {
            stream,
            state: state.clone(),
            started,
            last: None,
        },
    })
}

pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop(_) => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Chat or plain completion: how chunks and responses are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn new(kind: Kind, model: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Self {
            kind,
            id: new_id(prefix),
            created: unix_now(),
            model,
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A chunk carrying `text` (chat: a delta) and, at the end, a finish reason.
    fn piece(&self, delta: Value, text: &str, finish: Option<&str>) -> Event {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        };
        data(&self.chunk(json!([choice])))
    }

    fn usage(&self, usage: &Usage) -> Event {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage_json(usage);
        data(&chunk)
    }

    fn whole(&self, text: String, reason: &FinishReason, usage: &Usage) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_reason(reason),
                }),
            ),
            Kind::Completion => (
                "text_completion",
                json!({
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish_reason(reason),
                }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": usage_json(usage),
        })
    }
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

/// A streamed response: chunks as tokens come, then `data: [DONE]`. A client that goes
/// away drops the stream, which cancels the generation.
fn stream_response(started: Started, kind: Kind, include_usage: bool) -> Response {
    struct Run {
        tokens: TimedStream,
        shape: Shape,
        include_usage: bool,
        pending: VecDeque<Event>,
        finished: bool,
    }
    let shape = Shape::new(kind, started.model);
    let mut pending = VecDeque::new();
    if kind == Kind::Chat {
        pending.push_back(shape.piece(json!({"role": "assistant", "content": ""}), "", None));
    }
    let run = Run {
        tokens: started.tokens,
        shape,
        include_usage,
        pending,
        finished: false,
    };
    let events = futures_util::stream::unfold(run, |mut run| async move {
        loop {
            if let Some(event) = run.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), run));
            }
            if run.finished {
                return None;
            }
            let done = Event::default().data("[DONE]");
            match run.tokens.next().await {
                Some(Ok(TokenEvent::Token { text, .. })) => {
                    if !text.is_empty() {
                        let event = run.shape.piece(json!({"content": text}), &text, None);
                        run.pending.push_back(event);
                    }
                }
                Some(Ok(TokenEvent::Done { reason, usage })) => {
                    let reason = finish_reason(&reason);
                    let event = run.shape.piece(json!({}), "", Some(reason));
                    run.pending.push_back(event);
                    if run.include_usage {
                        let event = run.shape.usage(&usage);
                        run.pending.push_back(event);
                    }
                    run.pending.push_back(done);
                    run.finished = true;
                }
                Some(Err(e)) => {
                    let error = ApiError::from(e);
                    tracing::error!(error = %error, "generation failed mid-stream");
                    run.pending.push_back(data(&error.body()));
                    run.pending.push_back(done);
                    run.finished = true;
                }
                None => {
                    let error = ApiError::internal("the generation ended without finishing");
                    run.pending.push_back(data(&error.body()));
                    run.pending.push_back(done);
                    run.finished = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The whole text, finish reason and usage of a generation.
pub async fn collect(tokens: &mut TimedStream) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(event) = tokens.next().await {
        match event? {
            TokenEvent::Token { text: piece, .. } => text.push_str(&piece),
            TokenEvent::Done { reason, usage } => return Ok((text, reason, usage)),
        }
    }
    Err(ApiError::internal("the generation ended without finishing"))
}

async fn respond(
    mut started: Started,
    kind: Kind,
    stream: bool,
    include_usage: bool,
    echo: Option<String>,
) -> Result<Response, ApiError> {
    if stream {
        return Ok(stream_response(started, kind, include_usage));
    }
    let (text, reason, usage) = collect(&mut started.tokens).await?;
    let text = match echo {
        Some(prompt) => prompt + &text,
        None => text,
    };
    let shape = Shape::new(kind, started.model);
    Ok(Json(shape.whole(text, &reason, &usage)).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let options = request.options.check()?;
    let messages = chat_messages(request.messages)?;
    let include_usage = request.stream_options.unwrap_or_default().include_usage;
    let started = start(
        &state,
        request.model.as_deref(),
        Prompt::Chat(messages),
        options,
    )
    .await?;
    respond(started, Kind::Chat, request.stream, include_usage, None).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let options = request.options.check()?;
    let prompt = match request.prompt {
        CompletionPrompt::Text(text) => text,
        CompletionPrompt::List(mut list) if list.len() == 1 => match list.pop() {
            Some(Value::String(text)) => text,
            _ => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "prompt must be a string (token arrays are not supported)",
                ));
            }
        },
        CompletionPrompt::List(_) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "prompt must be one string or a list of exactly one",
            ));
        }
    };
    let include_usage = request.stream_options.unwrap_or_default().include_usage;
    let echo = request.echo.then(|| prompt.clone());
    if echo.is_some() && request.stream {
        return Err(ApiError::invalid_param(
            "echo",
            "echo is not supported with stream",
        ));
    }
    let started = start(
        &state,
        request.model.as_deref(),
        Prompt::Text(prompt),
        options,
    )
    .await?;
    respond(
        started,
        Kind::Completion,
        request.stream,
        include_usage,
        echo,
    )
    .await
}

/// The entries of `/v1/models`: models, their adapters and the embedder.
fn model_entries(state: &AppState) -> Vec<Value> {
    let created = state.inner.created;
    let mut data = Vec::new();
    for served in state.models() {
        let context = served.model().max_context();
        data.push(json!({
            "id": served.name,
            "object": "model",
            "created": created,
            "owned_by": "moera",
            "root": served.path.display().to_string(),
            "parent": null,
            "max_model_len": context,
        }));
        for adapter in &served.adapters {
            data.push(json!({
                "id": adapter,
                "object": "model",
                "created": created,
                "owned_by": "moera",
                "root": adapter,
                "parent": served.name,
                "max_model_len": context,
            }));
        }
    }
    if let Some(embedder) = state.embedder() {
        data.push(json!({
            "id": embedder.name,
            "object": "model",
            "created": created,
            "owned_by": "moera",
            "root": embedder.name,
            "parent": null,
            "max_model_len": embedder.embedder.max_tokens(),
        }));
    }
    data
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": model_entries(&state)}))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    model_entries(&state)
        .into_iter()
        .find(|entry| entry["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("the model `{id}` does not exist")))
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Value,
    pub encoding_format: Option<String>,
    pub dimensions: Option<usize>,
}

/// Inputs of one embeddings request at most.
const MAX_EMBEDDING_INPUTS: usize = 2048;

fn embedding_inputs(input: Value) -> Result<Vec<String>, ApiError> {
    let invalid = |message: &str| ApiError::invalid_param("input", message);
    let inputs = match input {
        Value::String(text) => vec![text],
        Value::Array(items) => {
            let mut texts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(text) => texts.push(text),
                    Value::Number(_) | Value::Array(_) => {
                        return Err(invalid(
                            "token arrays are not supported: send the input as text",
                        ));
                    }
                    _ => return Err(invalid("input must be a string or a list of strings")),
                }
            }
            texts
        }
        _ => return Err(invalid("input must be a string or a list of strings")),
    };
    if inputs.is_empty() {
        return Err(invalid("input must not be empty"));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid(&format!(
            "at most {MAX_EMBEDDING_INPUTS} inputs per request"
        )));
    }
    if inputs.iter().any(|text| text.is_empty()) {
        return Err(invalid("inputs must not be empty strings"));
    }
    Ok(inputs)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<EmbeddingRequest>,
) -> Result<Json<Value>, ApiError> {
    let Some(served) = state.embedder() else {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(
                "no embedding model is configured (start the server with --embedder)",
            )
        });
    };
    if let Some(name) = request.model.as_deref()
        && name != served.name
    {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(format!(
                "the embedding model `{name}` does not exist (this server has `{}`)",
                served.name
            ))
        });
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ));
        }
    };
    let embedder = served.embedder.clone();
    if let Some(dimensions) = request.dimensions
        && dimensions != embedder.dimension()
    {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!(
                "this model makes {}-dimensional embeddings only",
                embedder.dimension()
            ),
        ));
    }
    let inputs = embedding_inputs(request.input)?;
    let (vectors, tokens) = tokio::task::spawn_blocking(move || {
        let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let vectors = embedder.embed(&texts)?;
        let mut tokens = 0;
        for text in &texts {
            tokens += embedder.token_count(text)?.min(embedder.max_tokens());
        }
        Ok::<_, moera_engine::Error>((vectors, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("embedding task: {e}")))??;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": served.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: Value) -> Result<Checked, ApiError> {
        serde_json::from_value::<GenerationOptions>(json)
            .unwrap()
            .check()
    }

    #[test]
    fn options_are_checked() {
        assert!(options(json!({"temperature": 0.7, "top_p": 1, "stop": "x"})).is_ok());
        for bad in [
            json!({"temperature": 2.5}),
            json!({"top_p": 0}),
            json!({"n": 2}),
            json!({"max_tokens": 0}),
            json!({"frequency_penalty": 0.5}),
            json!({"stop": ["a", "b", "c", "d", "e"]}),
        ] {
            let error = options(bad.clone()).unwrap_err();
            assert_eq!(error.status, 400, "{bad}");
        }
        let checked = options(json!({"max_tokens": 5, "max_completion_tokens": 7})).unwrap();
        assert_eq!(checked.max_tokens, Some(7));
    }

    #[test]
    fn embedding_inputs_are_text() {
        assert_eq!(embedding_inputs(json!("a")).unwrap(), vec!["a"]);
        assert_eq!(embedding_inputs(json!(["a", "b"])).unwrap().len(), 2);
        for bad in [json!([1, 2]), json!([[1]]), json!([]), json!(""), json!(3)] {
            assert!(embedding_inputs(bad).is_err());
        }
    }

    #[test]
    fn parts_join_into_text() {
        let message: InputMessage = serde_json::from_value(json!({
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        }))
        .unwrap();
        assert_eq!(message.into_chat().unwrap().content, "ab");
        let image: InputMessage = serde_json::from_value(json!({
            "role": "user", "content": [{"type": "image_url"}],
        }))
        .unwrap();
        assert!(image.into_chat().is_err());
    }
}
