//! Generation: prefill, then decode one token at a time over a preallocated KV cache,
//! streamed as [`TokenEvent`]s (an iterator, or an async stream).

use std::sync::Arc;

use moera_models::nn::token_tensor;
use moera_models::{CausalLm, KvCache, LogitsMode, RouterTrace};
use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::error::{Error, Result};
use crate::model::{Model, to_f32_vec};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::IncrementalDecoder;

/// What to continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Plain text, tokenized with the model's special tokens (BOS where the model adds it).
    Text(String),
    /// A conversation, rendered with the model's chat template and an open assistant turn.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// End at the model's end-of-sequence tokens (on by default).
    pub stop_at_eos: bool,
    /// Record each MoE layer's expert choices ([`Generation::router_trace`]).
    #[serde(default)]
    pub record_routing: bool,
    /// A named adapter to generate with ([`crate::LoadOptions::named_adapters`]); `None`
    /// keeps the calling thread's choice ([`Model::with_adapter`], else the adapter given at
    /// load, if any).
    #[serde(default)]
    pub adapter: Option<String>,
}

impl GenerationRequest {
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
            record_routing: false,
            adapter: None,
        }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Prompt::Text(text.into()))
    }

    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    pub fn ids(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Ids(ids))
    }

    /// Records the expert choices of every MoE layer for the prompt and each new token.
    pub fn record_routing(mut self, record: bool) -> Self {
        self.record_routing = record;
        self
    }

    pub fn max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    pub fn stop(mut self, stop: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.stop = stop.into_iter().map(Into::into).collect();
        self
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop(String),
    /// `max_tokens` were generated.
    Length,
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One step of a generation stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum TokenEvent {
    /// A generated token and the text it completes (empty while a UTF-8 character or a
    /// possible stop string is still incomplete).
    Token { id: u32, text: String },
    /// The end: why, and how many tokens.
    Done { reason: FinishReason, usage: Usage },
}

/// A running generation; iterate it for [`TokenEvent`]s.
pub struct Generation<'a> {
    model: &'a Model,
    cache: KvCache,
    sequence: Sequence,
    routing: Option<RouterTrace>,
    /// The adapter slot every forward pass applies, fixed when the generation starts.
    lora_slot: Option<usize>,
}

/// A sequence's decoding state apart from its KV cache: sampling, the tokens so far, and
/// the text handed out (incremental detokenization and stop strings). [`Generation`] and
/// the continuous-batching scheduler ([`crate::batch`]) both drive one.
pub(crate) struct Sequence {
    sampler: Sampler,
    decoder: IncrementalDecoder,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    stop: Vec<String>,
    stop_at_eos: bool,
    /// Generated text, and how much of it was handed out.
    text: String,
    emitted: usize,
    finished: bool,
    pending_done: Option<TokenEvent>,
}

impl Model {
    /// Token ids of a prompt, checked against the vocabulary.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(text) => self.encode(text, true)?,
            // The template writes its special tokens itself, as transformers does.
            Prompt::Chat(messages) => {
                self.encode(&self.apply_chat_template(messages, true)?, false)?
            }
            Prompt::Ids(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_ids(&ids)?;
        Ok(ids)
    }

    /// Starts a generation; tokens come as the iterator is advanced.
    pub fn generate(&self, request: &GenerationRequest) -> Result<Generation<'_>> {
        let (sequence, lora_slot) = self.start_sequence(request)?;
        Ok(Generation {
            model: self,
            cache: self.inner.new_cache(1, sequence.capacity()),
            sequence,
            routing: request.record_routing.then(RouterTrace::default),
            lora_slot,
        })
    }

    /// Checks a request (prompt, adapter, sampling, context window) and returns its
    /// sequence and the adapter slot it runs with.
    pub(crate) fn start_sequence(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Sequence, Option<usize>)> {
        let lora_slot = match &request.adapter {
            Some(name) => Some(self.adapter_slot(name)?),
            None => moera_models::nn::active_lora_slot(),
        };
        let sampler = Sampler::new(request.sampling.clone())?;
        let ids = self.prompt_ids(&request.prompt)?;
        let context = self.max_context();
        if ids
            .len()
            .checked_add(request.max_tokens)
            .is_none_or(|total| total > context)
        {
            return Err(Error::PromptTooLong {
                prompt: ids.len(),
                max_new: request.max_tokens,
                context,
            });
        }
        let sequence = Sequence {
            sampler,
            decoder: IncrementalDecoder::new(),
            prompt_len: ids.len(),
            tokens: ids,
            max_tokens: request.max_tokens,
            stop: request
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            stop_at_eos: request.stop_at_eos,
            text: String::new(),
            emitted: 0,
            finished: false,
            pending_done: None,
        };
        Ok((sequence, lora_slot))
    }

    /// Generates to the end and returns the text and the finish reason.
    pub fn generate_text(&self, request: &GenerationRequest) -> Result<(String, FinishReason)> {
        let mut text = String::new();
        for event in self.generate(request)? {
            match event? {
                TokenEvent::Token { text: piece, .. } => text.push_str(&piece),
                TokenEvent::Done { reason, .. } => return Ok((text, reason)),
            }
        }
        unreachable!("a generation always ends with Done")
    }

    /// Streams a generation from a background thread, for async callers (the server).
    pub fn generate_stream(
        self: &Arc<Self>,
        request: GenerationRequest,
    ) -> futures_channel::mpsc::UnboundedReceiver<Result<TokenEvent>> {
        let (sender, receiver) = futures_channel::mpsc::unbounded();
        let model = Arc::clone(self);
        // The caller's adapter choice, for the generating thread.
        let slot = moera_models::nn::active_lora_slot();
        std::thread::spawn(move || {
            moera_models::nn::with_lora_slot(slot, || match model.generate(&request) {
                Ok(generation) => {
                    for event in generation {
                        // A dropped receiver cancels the generation.
                        if sender.unbounded_send(event).is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    let _ = sender.unbounded_send(Err(e));
                }
            })
        });
        receiver
    }
}

impl Generation<'_> {
    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        self.sequence.generated()
    }

    /// Expert choices so far (prompt, then each token fed back), when the request asked
    /// for them with [`GenerationRequest::record_routing`].
    pub fn router_trace(&self) -> Option<&RouterTrace> {
        self.routing.as_ref()
    }

    /// Logits of the next token: the tokens not yet in the cache (the prompt at first,
    /// then the last token) run through the model.
    fn next_logits(&mut self) -> Result<Vec<f32>> {
        let new = self.sequence.pending_tokens(self.cache.len());
        let input = token_tensor(new, 1, &self.model.device());
        let logits = moera_models::nn::with_lora_slot(self.lora_slot, || {
            self.model.inner.forward_traced(
                input,
                &mut self.cache,
                LogitsMode::Last,
                self.routing.as_mut(),
            )
        })?;
        Ok(to_f32_vec(logits.into_data())?)
    }
}

impl Sequence {
    /// Positions its KV cache needs: the prompt and every token it may generate.
    pub(crate) fn capacity(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    /// Tokens in the prompt.
    pub(crate) fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub(crate) fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The tokens after the first `cached` ones: what the next forward pass runs.
    pub(crate) fn pending_tokens(&self, cached: usize) -> &[u32] {
        &self.tokens[cached..]
    }

    /// The event to hand out without running the model, if any: `Some(None)` once the
    /// sequence is over, `Some(Some(done))` for its final event.
    pub(crate) fn event_without_step(&mut self) -> Option<Option<TokenEvent>> {
        if let Some(done) = self.pending_done.take() {
            return Some(Some(done));
        }
        if self.finished {
            return Some(None);
        }
        if self.max_tokens == 0 {
            self.finished = true;
            return Some(Some(self.done_event(FinishReason::Length)));
        }
        None
    }

    /// Whether the last event was handed out.
    pub(crate) fn is_over(&self) -> bool {
        self.finished && self.pending_done.is_none()
    }

    /// Samples the next token from `logits`, takes it, and returns its event. A final
    /// token also queues the `Done` event ([`Sequence::event_without_step`] hands it out).
    pub(crate) fn accept_logits(&mut self, model: &Model, logits: &mut [f32]) -> TokenEvent {
        let id = self.sampler.sample(logits, &self.tokens);
        self.tokens.push(id);
        let is_eos = self.stop_at_eos && model.eos_ids.contains(&id);
        let piece = match model.tokenizer() {
            Some(tokenizer) if !is_eos => self.decoder.push(tokenizer, id).unwrap_or_default(),
            _ => String::new(),
        };
        let (mut text, stop) = self.accept_text(&piece);
        let reason = match stop {
            Some(stop) => Some(FinishReason::Stop(stop)),
            None if is_eos => Some(FinishReason::Eos),
            None if self.generated().len() >= self.max_tokens => Some(FinishReason::Length),
            None => None,
        };
        if let Some(mut reason) = reason {
            if !matches!(reason, FinishReason::Stop(_)) {
                let (rest, stop) = self.flush_text(model);
                text.push_str(&rest);
                if let Some(stop) = stop {
                    reason = FinishReason::Stop(stop);
                }
            }
            self.finished = true;
            self.pending_done = Some(self.done_event(reason));
        }
        TokenEvent::Token { id, text }
    }

    /// Ends the sequence after an error.
    pub(crate) fn fail(&mut self) {
        self.finished = true;
        self.pending_done = None;
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.tokens.len() - self.prompt_len,
        }
    }

    fn done_event(&self, reason: FinishReason) -> TokenEvent {
        TokenEvent::Done {
            reason,
            usage: self.usage(),
        }
    }

    /// At the end: the decoder's held-back bytes and any text held for stop strings.
    fn flush_text(&mut self, model: &Model) -> (String, Option<String>) {
        let piece = match model.tokenizer() {
            Some(tokenizer) => self.decoder.flush(tokenizer).unwrap_or_default(),
            None => String::new(),
        };
        let (mut out, stop) = self.accept_text(&piece);
        if stop.is_none() {
            out.push_str(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
        (out, stop)
    }
    /// Appends a piece of decoded text and returns what can be handed out, or the stop
    /// string that ended the generation.
    fn accept_text(&mut self, piece: &str) -> (String, Option<String>) {
        self.text.push_str(piece);
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let search_from = floor_char_boundary(&self.text, self.emitted.saturating_sub(longest));
        let hit = self
            .stop
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|at| (search_from + at, s))
            })
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = hit {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.emitted = at;
            return (out, Some(stop.clone()));
        }
        // Hold back a tail that could still grow into a stop string.
        let held = self
            .stop
            .iter()
            .map(|s| longest_suffix_prefix(&self.text, s))
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        let out = self.text[self.emitted.min(safe)..safe].to_string();
        self.emitted = self.emitted.max(safe);
        (out, None)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&n| stop.is_char_boundary(n) && n <= text.len())
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

impl Iterator for Generation<'_> {
    type Item = Result<TokenEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(event) = self.sequence.event_without_step() {
            return event.map(Ok);
        }
        match self.next_logits() {
            Ok(mut logits) => Some(Ok(self.sequence.accept_logits(self.model, &mut logits))),
            Err(e) => {
                self.sequence.fail();
                Some(Err(e))
            }
        }
    }
}
