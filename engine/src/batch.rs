//! Continuous batching: concurrent generations share decode steps.
//!
//! A [`Scheduler`] owns a model on a thread of its own. Requests queue until the running
//! batch has room; between two decode steps the scheduler prefills newly admitted sequences
//! (each alone, so its first token comes at once) and retires those that ended or whose
//! receiver was dropped. Every decode step then runs one token of every running sequence
//! through the model together ([`moera_models::CausalLm::forward_ragged`]), each over its own
//! cached positions. Sequences with different adapters run in separate groups, since an
//! adapter applies to a whole forward pass.
//!
//! ```no_run
//! # fn main() -> moera_engine::Result<()> {
//! use std::sync::Arc;
//! use moera_engine::batch::{Scheduler, SchedulerConfig};
//! use moera_engine::{GenerationRequest, Model, TokenEvent};
//!
//! let model = Arc::new(Model::load("smollm2")?);
//! let scheduler = Scheduler::start(model, SchedulerConfig::default());
//! let request = GenerationRequest::text("Once upon a time").max_tokens(16);
//! let mut stream = scheduler.submit(request)?;
//! let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
//! runtime.block_on(async {
//!     while let Some(event) = stream.next_event().await {
//!         if let TokenEvent::Token { text, .. } = event? {
//!             print!("{text}");
//!         }
//!     }
//!     Ok(())
//! })
//! # }
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures_core::Stream;
use moera_models::nn::{token_tensor, with_lora_slot};
use moera_models::{LogitsMode, RaggedKvCache};

use crate::error::{Error, Result};
use crate::generate::{GenerationRequest, Sequence, TokenEvent};
use crate::model::{Model, to_f32_vec};

/// Limits of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most; more wait in the queue.
    pub max_batch: usize,
    /// Requests waiting at most; beyond it [`Scheduler::submit`] refuses with
    /// [`Error::Overloaded`].
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_waiting: 256,
        }
    }
}

/// Counters of a [`Scheduler`], read with [`Scheduler::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests waiting for a place in the batch.
    pub waiting: usize,
    /// Sequences being decoded.
    pub running: usize,
    /// Requests accepted since the start.
    pub submitted: u64,
    /// Sequences that ended (finished, failed or cancelled).
    pub finished: u64,
    /// Sequences whose receiver hung up before the end.
    pub cancelled: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Shared decode steps run, and the sequences they carried in all: their ratio is the
    /// mean batch size.
    pub decode_steps: u64,
    pub decoded_rows: u64,
}

#[derive(Default)]
struct Counters {
    waiting: AtomicUsize,
    running: AtomicUsize,
    submitted: AtomicU64,
    finished: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    decode_steps: AtomicU64,
    decoded_rows: AtomicU64,
}

/// A request checked and handed to the scheduler thread.
struct Job {
    sequence: Sequence,
    lora_slot: Option<usize>,
    events: UnboundedSender<Result<TokenEvent>>,
}

/// What the clones of a [`Scheduler`] share. The thread holds only the model and the
/// counters, so dropping the last clone closes the queue and ends the thread.
struct Shared {
    model: Arc<Model>,
    config: SchedulerConfig,
    jobs: Mutex<Option<Sender<Job>>>,
    counters: Arc<Counters>,
    draining: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Runs generations with continuous batching; cheap to clone (all clones share one thread).
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

/// The events of one generation, as [`Model::generate_stream`] gives them. Dropping it
/// cancels the generation at the next decode step.
pub struct GenerationStream {
    events: UnboundedReceiver<Result<TokenEvent>>,
    prompt_tokens: usize,
}

impl GenerationStream {
    /// Tokens in the prompt, as the model sees it (chat template applied).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event, or `None` after the last.
    pub async fn next_event(&mut self) -> Option<Result<TokenEvent>> {
        std::future::poll_fn(|cx| Pin::new(&mut self.events).poll_next(cx)).await
    }
}

impl Stream for GenerationStream {
    type Item = Result<TokenEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Scheduler {
    /// Starts the scheduler thread for `model`.
    pub fn start(model: Arc<Model>, config: SchedulerConfig) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel();
        let config = SchedulerConfig {
            max_batch: config.max_batch.max(1),
            ..config
        };
        let shared = Arc::new(Shared {
            model,
            config,
            jobs: Mutex::new(Some(jobs)),
            counters: Arc::default(),
            draining: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let (model, counters) = (Arc::clone(&shared.model), Arc::clone(&shared.counters));
        let thread = std::thread::Builder::new()
            .name("moera-scheduler".into())
            .spawn(move || run(&model, config, &counters, queue))
            .expect("spawning the scheduler thread");
        *lock(&shared.thread) = Some(thread);
        Self { shared }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    pub fn config(&self) -> SchedulerConfig {
        self.shared.config
    }

    /// Checks `request` (prompt, adapter, sampling, context window: errors come here, before
    /// any token) and queues it. The prompt is tokenized on the calling thread.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationStream> {
        let counters = &self.shared.counters;
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let (sequence, lora_slot) = self.shared.model.start_sequence(&request)?;
        let prompt_tokens = sequence.capacity() - request.max_tokens;
        // Reserve a place in the queue atomically: concurrent callers cannot overshoot it.
        let max_waiting = self.shared.config.max_waiting;
        if counters
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                (waiting < max_waiting).then_some(waiting + 1)
            })
            .is_err()
        {
            return Err(Error::Overloaded {
                waiting: max_waiting,
            });
        }
        let (events, receiver) = unbounded();
        let job = Job {
            sequence,
            lora_slot,
            events,
        };
        let sent = lock(&self.shared.jobs)
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            counters.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::ShuttingDown);
        }
        counters.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(GenerationStream {
            events: receiver,
            prompt_tokens,
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SchedulerStats {
        let c = &self.shared.counters;
        SchedulerStats {
            waiting: c.waiting.load(Ordering::SeqCst),
            running: c.running.load(Ordering::SeqCst),
            submitted: c.submitted.load(Ordering::Relaxed),
            finished: c.finished.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            decode_steps: c.decode_steps.load(Ordering::Relaxed),
            decoded_rows: c.decoded_rows.load(Ordering::Relaxed),
        }
    }

    /// Stops taking requests ([`Error::ShuttingDown`]); those already queued or running
    /// still end normally. [`Scheduler::join`] waits for them.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        lock(&self.shared.jobs).take();
    }

    /// Drains, then waits until every queued and running generation has ended.
    pub fn join(&self) {
        self.drain();
        if let Some(thread) = lock(&self.shared.thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running sequence of a group.
struct Row {
    sequence: Sequence,
    events: UnboundedSender<Result<TokenEvent>>,
}

/// Sequences with the same adapter, decoded together over one ragged cache.
struct Group {
    lora_slot: Option<usize>,
    cache: RaggedKvCache,
    rows: Vec<Row>,
}

/// The scheduler thread: admit, step, retire, until the queue closes and the batch is empty.
fn run(model: &Model, config: SchedulerConfig, counters: &Counters, queue: Receiver<Job>) {
    let ragged = model.causal_lm().supports_ragged();
    let mut groups: Vec<Group> = Vec::new();
    let mut open = true;
    loop {
        let running: usize = groups.iter().map(|g| g.rows.len()).sum();
        if running == 0 && !open {
            return;
        }
        // Admit between steps: wait when idle, else take what is queued.
        let mut room = config.max_batch.saturating_sub(running);
        let mut admitted = 0;
        while open && room > 0 {
            let job = if running + admitted == 0 {
                queue.recv().map_err(|_| ())
            } else {
                match queue.try_recv() {
                    Ok(job) => Ok(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Err(()),
                }
            };
            let Ok(job) = job else {
                open = false;
                break;
            };
            counters.waiting.fetch_sub(1, Ordering::SeqCst);
            // A panic in the model (a backend failure) must not take the scheduler down:
            // the sequences it hit end with an error, the others go on.
            let joined = catch_unwind(AssertUnwindSafe(|| {
                admit(model, job, ragged, &mut groups, counters)
            }));
            match joined {
                Ok(true) => {
                    room -= 1;
                    admitted += 1;
                }
                Ok(false) => {}
                Err(_) => {
                    tracing::error!("prefill panicked; its request ends without a result");
                    counters.finished.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for group in &mut groups {
            if catch_unwind(AssertUnwindSafe(|| step(model, group, counters))).is_err() {
                tracing::error!("a decode step panicked; its sequences end with an error");
                fail_all(
                    group,
                    counters,
                    "the model failed during a decode step".into(),
                );
            }
        }
        groups.retain(|g| !g.rows.is_empty());
    }
}

/// Prefills a job's prompt alone and hands out its first token; a sequence that goes on
/// joins the group of its adapter. Returns whether it joined.
fn admit(
    model: &Model,
    mut job: Job,
    ragged: bool,
    groups: &mut Vec<Group>,
    counters: &Counters,
) -> bool {
    let finish = |counters: &Counters| {
        counters.finished.fetch_add(1, Ordering::Relaxed);
    };
    if job.events.is_closed() {
        counters.cancelled.fetch_add(1, Ordering::Relaxed);
        finish(counters);
        return false;
    }
    if let Some(event) = job.sequence.event_without_step() {
        if let Some(event) = event {
            let _ = job.events.unbounded_send(Ok(event));
        }
        finish(counters);
        return false;
    }
    // A batch's cache grows with its sequences ([`decode`]): a request's `max_tokens` does
    // not size (and pad) every row up front. Models without batched decoding keep one
    // sequence per group, sized once.
    let (prompt_len, capacity) = (job.sequence.prompt_len(), job.sequence.capacity());
    let capacity = if ragged {
        prompt_len + (capacity - prompt_len).min(GROWTH)
    } else {
        capacity
    };
    let mut cache = model.causal_lm().new_cache(1, capacity);
    let prompt = job.sequence.pending_tokens(0);
    counters
        .prompt_tokens
        .fetch_add(prompt.len() as u64, Ordering::Relaxed);
    let logits = with_lora_slot(job.lora_slot, || {
        let input = token_tensor(prompt, 1, &model.device());
        model
            .causal_lm()
            .forward(input, &mut cache, LogitsMode::Last)
    })
    .map_err(Error::from)
    .and_then(|logits| Ok(to_f32_vec(logits.into_data())?));
    let mut logits = match logits {
        Ok(logits) => logits,
        Err(e) => {
            let _ = job.events.unbounded_send(Err(e));
            finish(counters);
            return false;
        }
    };
    let event = job.sequence.accept_logits(model, &mut logits);
    counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let mut row = Row {
        sequence: job.sequence,
        events: job.events,
    };
    if !hand_out(&mut row, event) {
        if row.events.is_closed() {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        finish(counters);
        return false;
    }
    let group = match groups
        .iter_mut()
        .position(|g| ragged && g.lora_slot == job.lora_slot)
    {
        Some(at) => &mut groups[at],
        None => {
            groups.push(Group {
                lora_slot: job.lora_slot,
                cache: RaggedKvCache::new(),
                rows: Vec::new(),
            });
            groups.last_mut().expect("just pushed")
        }
    };
    group.cache.push(cache);
    group.rows.push(row);
    counters.running.fetch_add(1, Ordering::SeqCst);
    true
}

/// Sends `event` and, after a sequence's last token, its `Done` event. Returns whether the
/// sequence goes on (not ended, receiver still there).
fn hand_out(row: &mut Row, event: TokenEvent) -> bool {
    if row.events.unbounded_send(Ok(event)).is_err() {
        return false;
    }
    match row.sequence.event_without_step() {
        Some(Some(done)) => {
            let _ = row.events.unbounded_send(Ok(done));
            false
        }
        Some(None) => false,
        None => true,
    }
}

/// One shared decode step of every row of `group`, then retires the rows that ended.
fn step(model: &Model, group: &mut Group, counters: &Counters) {
    // Rows whose receiver hung up leave before the step, so they cost nothing more.
    let keep: Vec<bool> = group.rows.iter().map(|r| !r.events.is_closed()).collect();
    retire(group, &keep, counters, true);
    if group.rows.is_empty() {
        return;
    }
    let tokens: Vec<u32> = group
        .rows
        .iter()
        .map(|r| {
            *r.sequence
                .pending_tokens(0)
                .last()
                .expect("a prompt is never empty")
        })
        .collect();
    let logits = decode(model, group, &tokens);
    counters.decode_steps.fetch_add(1, Ordering::Relaxed);
    counters
        .decoded_rows
        .fetch_add(tokens.len() as u64, Ordering::Relaxed);
    let logits = match logits {
        Ok(logits) => logits,
        Err(e) => {
            // The whole batch shared the failed step: each sequence gets the error.
            fail_all(group, counters, e.to_string());
            return;
        }
    };
    let mut logits = logits;
    let vocab = logits.len() / tokens.len();
    let mut keep = Vec::with_capacity(group.rows.len());
    for (row, logits) in group.rows.iter_mut().zip(logits.chunks_mut(vocab)) {
        let event = row.sequence.accept_logits(model, logits);
        counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
        keep.push(hand_out(row, event));
    }
    retire(group, &keep, counters, false);
}

/// Positions a batch's cache grows by at least, when a row needs room.
const GROWTH: usize = 128;

/// Logits `[rows × vocab]` of one new token per row of `group`.
fn decode(model: &Model, group: &mut Group, tokens: &[u32]) -> Result<Vec<f32>> {
    let lm = model.causal_lm();
    let logits = with_lora_slot(group.lora_slot, || {
        if !lm.supports_ragged() {
            // One row per group: decode it alone over its own cache.
            let mut cache = group.cache.take_single();
            let logits = lm.forward(
                token_tensor(tokens, 1, &model.device()),
                &mut cache,
                LogitsMode::Last,
            );
            group.cache.push(cache);
            return logits.map(|l| l.reshape([1, lm.vocab_size()]));
        }
        if !group.cache.has_room() {
            let needed = group
                .rows
                .iter()
                .map(|r| r.sequence.capacity())
                .max()
                .unwrap_or(0);
            let capacity = group.cache.capacity();
            group
                .cache
                .grow_to((capacity * 2).max(capacity + GROWTH).min(needed));
        }
        lm.forward_ragged(tokens, &mut group.cache)
    })?;
    Ok(to_f32_vec(logits.into_data())?)
}

/// Ends every sequence of `group` with `message` as their error.
fn fail_all(group: &mut Group, counters: &Counters, message: String) {
    for row in group.rows.drain(..) {
        let _ = row
            .events
            .unbounded_send(Err(Error::Generation(message.clone())));
        counters.finished.fetch_add(1, Ordering::Relaxed);
        counters.running.fetch_sub(1, Ordering::SeqCst);
    }
    // After a panic the cache may be half-written or hold other rows: start afresh.
    group.cache = RaggedKvCache::new();
}

/// Drops the rows whose `keep` flag is false (counted as cancelled when `hung_up`, or when
/// their receiver is gone before the end).
fn retire(group: &mut Group, keep: &[bool], counters: &Counters, hung_up: bool) {
    if keep.iter().all(|&k| k) {
        return;
    }
    for (row, _) in group.rows.iter().zip(keep).filter(|(_, k)| !**k) {
        counters.finished.fetch_add(1, Ordering::Relaxed);
        if hung_up || (!row.sequence.is_over() && row.events.is_closed()) {
            counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        counters.running.fetch_sub(1, Ordering::SeqCst);
    }
    group.cache.retain(keep);
    let mut flags = keep.iter();
    group
        .rows
        .retain(|_| *flags.next().expect("one flag per row"));
}
