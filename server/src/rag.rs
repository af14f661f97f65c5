//! Retrieval for the server: the collections opened so far, and a [`Generator`] that runs
//! through a model's scheduler so that RAG answers are batched with everything else.

use std::path::Path;
use std::sync::Arc;

use moera_engine::batch::Scheduler;
use moera_engine::rag::ingest::{collection_dir, open_collection};
use moera_engine::rag::pipeline::{Generator, Passage, grounded_prompt};
use moera_engine::{ChatMessage, Error, GenerationRequest, Model, Prompt, Result, TokenEvent};
use moera_index::DurableCollection;

use crate::{Registry, lock};

/// Folders under the data folder that are not collections.
pub const RESERVED: &[&str] = &["documents", "training"];

/// Collections by name, each opened once: ingestion and queries share one handle, so a
/// query sees what was just ingested.
#[derive(Default)]
pub struct Collections {
    open: Registry<Arc<DurableCollection>>,
}

impl Collections {
    /// Collection `name` under `data_dir`, opened (or created, with `create`) on first use;
    /// its vectors must be `dimension` long. Blocks on I/O.
    pub fn get(
        &self,
        data_dir: &Path,
        name: &str,
        dimension: usize,
        create: bool,
    ) -> Result<Arc<DurableCollection>> {
        check_name(name)?;
        let mut open = lock(&self.open);
        if let Some(collection) = open.get(name) {
            let found = collection.collection().config().dim;
            if found != dimension {
                return Err(Error::DimensionMismatch {
                    collection: collection.dir().to_path_buf(),
                    collection_dim: found,
                    embedder_dim: dimension,
                });
            }
            return Ok(Arc::clone(collection));
        }
        let collection = Arc::new(open_collection(data_dir, name, dimension, create)?);
        open.insert(name.to_string(), Arc::clone(&collection));
        Ok(collection)
    }

    /// Every collection under `data_dir`: name, points and dimension. Blocks on I/O.
    pub fn list(&self, data_dir: &Path) -> Result<Vec<(String, usize, usize)>> {
        let entries = match std::fs::read_dir(data_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Io {
                    path: data_dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| check_name(name).is_ok())
            .collect();
        names.sort();
        let mut found = Vec::new();
        let mut open = lock(&self.open);
        for name in names {
            let collection = match open.get(&name) {
                Some(collection) => Arc::clone(collection),
                None => match DurableCollection::open(data_dir.join(&name)) {
                    Ok((collection, _)) => {
                        let collection = Arc::new(collection);
                        open.insert(name.clone(), Arc::clone(&collection));
                        collection
                    }
                    Err(moera_index::StoreError::NotFound(_)) => continue,
                    Err(e) => {
                        tracing::warn!(collection = %name, error = %e, "collection not readable");
                        continue;
                    }
                },
            };
            let inner = collection.collection();
            found.push((name, inner.count(), inner.config().dim));
        }
        Ok(found)
    }
}

/// A collection name: one path component (see [`collection_dir`]), not a reserved folder.
pub fn check_name(name: &str) -> Result<()> {
    collection_dir(Path::new("."), name)?;
    if RESERVED.contains(&name) {
        return Err(Error::InvalidArgument(format!(
            "collection name {name:?} is reserved"
        )));
    }
    Ok(())
}

/// A request's prompt as token ids, and the tokens it may generate: `max_tokens` when
/// given (the scheduler refuses it if the context is too short), else the server's default
/// cut to what the context leaves.
pub fn prompt_and_budget(
    model: &Model,
    prompt: &Prompt,
    max_tokens: Option<usize>,
    default_max_tokens: usize,
) -> Result<(Vec<u32>, usize)> {
    let ids = model.prompt_ids(prompt)?;
    let context = model.max_context();
    let budget = match max_tokens {
        Some(n) => n,
        None => default_max_tokens.min(context.saturating_sub(ids.len())),
    };
    if budget == 0 {
        return Err(Error::PromptTooLong {
            prompt: ids.len(),
            max_new: 1,
            context,
        });
    }
    Ok((ids, budget))
}

/// Generates through a model's scheduler, blocking the calling thread (the pipeline calls
/// it on a blocking thread) until the answer is complete.
pub struct SchedulerGenerator {
    pub scheduler: Scheduler,
    /// The served name, part of cache keys.
    pub name: String,
    pub adapter: Option<String>,
}

impl Generator for SchedulerGenerator {
    fn name(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("{}+{adapter}", self.name),
            None => self.name.clone(),
        }
    }

    fn generate(&self, request: &GenerationRequest) -> Result<String> {
        let model = self.scheduler.model();
        // The answer may be shorter than asked where the context leaves less room.
        let (ids, budget) = prompt_and_budget(model, &request.prompt, None, request.max_tokens)?;
        let mut generation = GenerationRequest::ids(ids)
            .max_tokens(budget)
            .sampling(model.default_sampling.clone())
            .stop(request.stop.clone());
        generation.adapter = self.adapter.clone();
        let mut stream = self.scheduler.submit(generation)?;
        futures_executor::block_on(async move {
            let mut text = String::new();
            while let Some(event) = stream.next_event().await {
                match event? {
                    TokenEvent::Token { text: piece, .. } => text.push_str(&piece),
                    TokenEvent::Done { .. } => return Ok(text),
                }
            }
            Err(Error::Generation(
                "the scheduler ended the stream without finishing".into(),
            ))
        })
    }
}

/// The grounded conversation for `question` over as many of `passages` (best first) as
/// fit in the context with `reserve` tokens left to answer; the passages kept.
pub fn fit_grounded_prompt(
    model: &Model,
    question: &str,
    mut passages: Vec<Passage>,
    reserve: usize,
) -> Result<(Vec<ChatMessage>, Vec<Passage>)> {
    let context = model.max_context();
    loop {
        let messages = grounded_prompt(question, &passages);
        let tokens = model.prompt_ids(&Prompt::Chat(messages.clone()))?.len();
        // `reserve` may be a client's max_tokens: any size must not overflow.
        if tokens.saturating_add(reserve) <= context || passages.is_empty() {
            return Ok((messages, passages));
        }
        passages.pop();
    }
}
