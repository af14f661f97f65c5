//! The query pipeline: stages that each read and extend one [`QueryState`].
//!
//! [`RagPipeline::ask`] runs question embedding → document retrieval → reranking → answer
//! generation, the answer citing the numbered passages it was given. [`RagPipeline::search`]
//! stops before generation. [`RagPipeline::query`] runs the model on the bare question and
//! the retrieval stages concurrently and returns both, as the design's `/api/query` does.
//! Every stage's time is recorded; a result cache (TTL) sits in front of `ask`, and
//! generation runs behind a circuit breaker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use moera_index::{DurableCollection, Filter, Metric};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::ChatMessage;
use crate::embed::Embedder;
use crate::error::{Error, Result};
use crate::generate::{GenerationRequest, Prompt};
use crate::model::Model;
use crate::rag::Reranker;
use crate::rag::breaker::CircuitBreaker;
use crate::rag::cache::{InferenceCache, InferenceKey, ResultCache, result_cache_key};
use crate::sampler::SamplingParams;

/// Produces the text of a generation request: the model, or anything standing in for it.
pub trait Generator: Send + Sync {
    /// What generates (model and adapter), part of cache keys.
    fn name(&self) -> String;

    fn generate(&self, request: &GenerationRequest) -> Result<String>;
}

/// A loaded model as a [`Generator`]: its own sampling parameters and adapter apply to every
/// request, and deterministic requests are answered from an inference cache when given one.
pub struct ModelGenerator {
    model: Arc<Model>,
    name: String,
    sampling: SamplingParams,
    adapter: Option<String>,
    cache: Option<Arc<InferenceCache>>,
}

impl ModelGenerator {
    /// `model`, known in cache keys as `name`, sampling with its default parameters.
    pub fn new(model: Arc<Model>, name: impl Into<String>) -> Self {
        Self {
            sampling: model.default_sampling.clone(),
            model,
            name: name.into(),
            adapter: None,
            cache: None,
        }
    }

    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// Generates with the named adapter ([`crate::LoadOptions::named_adapters`]).
    pub fn with_adapter(mut self, adapter: impl Into<String>) -> Self {
        self.adapter = Some(adapter.into());
        self
    }

    pub fn with_cache(mut self, cache: Arc<InferenceCache>) -> Self {
        self.cache = Some(cache);
        self
    }
}

impl Generator for ModelGenerator {
    fn name(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("{}+{adapter}", self.name),
            None => self.name.clone(),
        }
    }

    fn generate(&self, request: &GenerationRequest) -> Result<String> {
        let mut request = request.clone();
        request.sampling = self.sampling.clone();
        request.adapter = self.adapter.clone();
        let prompt = match &request.prompt {
            Prompt::Chat(messages) => {
                format!("chat:{}", self.model.apply_chat_template(messages, true)?)
            }
            Prompt::Text(text) => format!("text:{text}"),
            Prompt::Ids(ids) => format!("ids:{ids:?}"),
        };
        let key = InferenceKey::new(
            self.name.clone(),
            self.adapter.clone(),
            prompt,
            request.sampling.clone(),
            request.max_tokens,
            request.stop.clone(),
        );
        if let Some(hit) = self.cache.as_ref().and_then(|cache| cache.get(&key)) {
            return Ok(hit);
        }
        let (text, _) = self.model.generate_text(&request)?;
        if let Some(cache) = &self.cache {
            cache.put(key, text.clone());
        }
        Ok(text)
    }
}

/// A retrieved chunk of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    pub id: u64,
    /// The file it comes from.
    pub source: String,
    pub title: String,
    /// Its index among the file's chunks.
    pub chunk: usize,
    pub text: String,
    /// Cosine similarity to the question.
    pub similarity: f32,
    /// The reranker's score, when one ran.
    pub rerank_score: Option<f32>,
}

impl Passage {
    /// What ranking uses: the reranker's score where there is one, else the similarity.
    pub fn relevance(&self) -> f32 {
        self.rerank_score.unwrap_or(self.similarity)
    }
}

/// How long a stage took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
}

/// What a query asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryOptions {
    /// Passages in the result.
    pub k: usize,
    /// Candidates retrieved for reranking (at least `k`).
    pub candidates: usize,
    /// Search breadth of the graph walk.
    pub ef: usize,
    /// Only passages whose payload passes this filter.
    pub filter: Option<Filter>,
    /// Maximal marginal relevance: 1 ranks by relevance alone, lower values favour passages
    /// unlike those already chosen.
    pub mmr_lambda: f32,
    /// Passages whose relevance (the reranker's score, else the similarity) is below this
    /// are dropped.
    pub min_score: Option<f32>,
    /// Tokens of the answer.
    pub max_tokens: usize,
}

impl Default for QueryOptions {
    fn default() -> Self {
        Self {
            k: 5,
            candidates: 20,
            ef: 64,
            filter: None,
            mmr_lambda: 0.7,
            min_score: None,
            max_tokens: 256,
        }
    }
}

/// What the stages share: the question, what they found and how long they took.
#[derive(Debug, Clone)]
pub struct QueryState {
    pub question: String,
    pub options: QueryOptions,
    pub question_vector: Vec<f32>,
    pub passages: Vec<Passage>,
    /// The stored vectors of the passages, by id (for MMR).
    pub vectors: HashMap<u64, Vec<f32>>,
    pub answer: Option<String>,
    pub timings: Vec<StageTiming>,
}

/// One step of the pipeline.
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;

    fn run(&self, state: &mut QueryState) -> Result<()>;
}

/// The result of a query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RagAnswer {
    pub question: String,
    /// The generated answer (`None` for a search).
    pub answer: Option<String>,
    /// The passages, numbered from 1 in this order in the prompt.
    pub sources: Vec<Passage>,
    pub timings: Vec<StageTiming>,
    /// Whether it came from the result cache.
    #[serde(default)]
    pub cached: bool,
}

/// Embeds the question.
pub struct QuestionEmbedding {
    pub embedder: Arc<dyn Embedder>,
}

impl Stage for QuestionEmbedding {
    fn name(&self) -> &'static str {
        "embed"
    }

    fn run(&self, state: &mut QueryState) -> Result<()> {
        let mut vectors = self.embedder.embed(&[state.question.as_str()])?;
        state.question_vector = vectors.pop().unwrap_or_default();
        Ok(())
    }
}

/// Searches the collection for the question's nearest chunks.
pub struct DocumentRetrieval {
    pub collection: Arc<DurableCollection>,
}

impl Stage for DocumentRetrieval {
    fn name(&self) -> &'static str {
        "search"
    }

    fn run(&self, state: &mut QueryState) -> Result<()> {
        let options = &state.options;
        let collection = self.collection.collection();
        let dimension = collection.config().dim;
        if dimension != state.question_vector.len() {
            return Err(Error::DimensionMismatch {
                collection: self.collection.dir().to_path_buf(),
                collection_dim: dimension,
                embedder_dim: state.question_vector.len(),
            });
        }
        let cosine = collection.config().metric == Metric::Cosine;
        let wanted = options.candidates.max(options.k);
        let hits = collection
            .search(
                &state.question_vector,
                wanted,
                options.ef.max(wanted),
                options.filter.as_ref(),
            )
            .map_err(moera_index::StoreError::from)?;
        state.vectors = hits
            .iter()
            .filter_map(|hit| Some((hit.id, collection.get(hit.id)?.vector)))
            .collect();
        state.passages = hits
            .into_iter()
            .map(|hit| {
                let field = |key: &str| {
                    hit.payload
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                Passage {
                    id: hit.id,
                    source: field("source"),
                    title: field("title"),
                    chunk: hit
                        .payload
                        .get("chunk")
                        .and_then(Value::as_u64)
                        .unwrap_or(0) as usize,
                    text: field("text"),
                    similarity: if cosine {
                        1.0 - hit.distance
                    } else {
                        -hit.distance
                    },
                    rerank_score: None,
                }
            })
            .collect();
        Ok(())
    }
}

/// Orders the candidates: an optional cross-encoder scores them, a threshold drops the weak
/// ones, and maximal marginal relevance picks `k` that are relevant and unlike each other.
pub struct Reranking {
    pub reranker: Option<Arc<dyn Reranker>>,
}

impl Stage for Reranking {
    fn name(&self) -> &'static str {
        "rerank"
    }

    fn run(&self, state: &mut QueryState) -> Result<()> {
        if let Some(reranker) = &self.reranker {
            let texts: Vec<&str> = state.passages.iter().map(|p| p.text.as_str()).collect();
            let scores = reranker.score(&state.question, &texts)?;
            for (passage, score) in state.passages.iter_mut().zip(scores) {
                passage.rerank_score = Some(score);
            }
        }
        if let Some(min) = state.options.min_score {
            state.passages.retain(|p| p.relevance() >= min);
        }
        let candidates = std::mem::take(&mut state.passages);
        state.passages = mmr(
            candidates,
            &state.vectors,
            state.options.k,
            state.options.mmr_lambda,
        );
        Ok(())
    }
}

/// Maximal marginal relevance: repeatedly takes the candidate maximising
/// `λ·relevance − (1−λ)·max similarity to those taken`. Relevance is the similarity, or the
/// reranker's score scaled to 0..=1 over the candidates (whatever its activation), so both
/// terms share a scale.
fn mmr(
    mut candidates: Vec<Passage>,
    vectors: &HashMap<u64, Vec<f32>>,
    k: usize,
    lambda: f32,
) -> Vec<Passage> {
    let similarity = |a: &Passage, b: &Passage| match (vectors.get(&a.id), vectors.get(&b.id)) {
        (Some(a), Some(b)) => a.iter().zip(b).map(|(x, y)| x * y).sum(),
        _ => 0.0,
    };
    let scores = candidates.iter().filter_map(|p| p.rerank_score);
    let (low, high) = scores.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), s| {
        (lo.min(s), hi.max(s))
    });
    let relevance = |p: &Passage| match p.rerank_score {
        Some(_) if high <= low => 1.0,
        Some(score) => (score - low) / (high - low),
        None => p.similarity,
    };
    let mut chosen: Vec<Passage> = Vec::with_capacity(k);
    while chosen.len() < k && !candidates.is_empty() {
        let score = |p: &Passage| {
            let redundancy = chosen
                .iter()
                .map(|c| similarity(c, p))
                .fold(f32::NEG_INFINITY, f32::max);
            let redundancy = if chosen.is_empty() { 0.0 } else { redundancy };
            lambda * relevance(p) - (1.0 - lambda) * redundancy
        };
        let best = (0..candidates.len())
            .max_by(|&a, &b| score(&candidates[a]).total_cmp(&score(&candidates[b])))
            .unwrap_or(0);
        chosen.push(candidates.swap_remove(best));
    }
    chosen
}

/// Writes the answer from the numbered passages, behind a circuit breaker.
pub struct AnswerGeneration {
    pub generator: Arc<dyn Generator>,
    pub breaker: Arc<CircuitBreaker>,
}

/// The instructions the model answers under.
const SYSTEM_PROMPT: &str = "You answer questions using the numbered sources below. \
    Cite the sources you use by their numbers, like [1]. If the sources do not answer the \
    question, say so.";

/// The conversation asking `question` over `passages`, numbered from 1.
pub fn grounded_prompt(question: &str, passages: &[Passage]) -> Vec<ChatMessage> {
    let mut sources = String::new();
    for (i, passage) in passages.iter().enumerate() {
        sources.push_str(&format!(
            "[{}] {}\n{}\n\n",
            i + 1,
            passage.title,
            passage.text
        ));
    }
    vec![
        ChatMessage::system(SYSTEM_PROMPT),
        ChatMessage::user(format!("Sources:\n\n{sources}Question: {question}")),
    ]
}

impl Stage for AnswerGeneration {
    fn name(&self) -> &'static str {
        "generate"
    }

    fn run(&self, state: &mut QueryState) -> Result<()> {
        let request = GenerationRequest::chat(grounded_prompt(&state.question, &state.passages))
            .max_tokens(state.options.max_tokens);
        let answer = self.breaker.call(|| self.generator.generate(&request))?;
        state.answer = Some(answer.trim().to_string());
        Ok(())
    }
}

/// The stages, the cache and the breaker of one collection.
pub struct RagPipeline {
    retrieval: Vec<Box<dyn Stage>>,
    generation: Option<AnswerGeneration>,
    cache: Option<Arc<dyn ResultCache>>,
    /// What identifies the collection, embedder and reranker in cache keys.
    retrieval_id: String,
    collection: Arc<DurableCollection>,
}

impl RagPipeline {
    /// Retrieval over `collection` with `embedder`; add a reranker, a generator and a cache
    /// with the `with_*` methods.
    pub fn new(embedder: Arc<dyn Embedder>, collection: Arc<DurableCollection>) -> Self {
        let retrieval_id = format!("{} {}", collection.dir().display(), embedder.name());
        Self {
            retrieval: vec![
                Box::new(QuestionEmbedding { embedder }),
                Box::new(DocumentRetrieval {
                    collection: collection.clone(),
                }),
                Box::new(Reranking { reranker: None }),
            ],
            generation: None,
            cache: None,
            retrieval_id,
            collection,
        }
    }

    /// Scores candidates with `reranker` (a cross-encoder, known in cache keys as `name`)
    /// before MMR.
    pub fn with_reranker(mut self, reranker: Arc<dyn Reranker>, name: &str) -> Self {
        self.retrieval_id.push_str(&format!(" reranked by {name}"));
        self.retrieval[2] = Box::new(Reranking {
            reranker: Some(reranker),
        });
        self
    }

    /// Answers with `generator`, behind `breaker`.
    pub fn with_generator(
        mut self,
        generator: Arc<dyn Generator>,
        breaker: Arc<CircuitBreaker>,
    ) -> Self {
        self.generation = Some(AnswerGeneration { generator, breaker });
        self
    }

    /// Keeps answers of [`ask`](Self::ask) in `cache`.
    pub fn with_cache(mut self, cache: Arc<dyn ResultCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    fn state(question: &str, options: &QueryOptions) -> Result<QueryState> {
        let question = question.trim();
        if question.is_empty() {
            return Err(Error::EmptyQuestion);
        }
        if options.k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&options.mmr_lambda) {
            return Err(Error::InvalidArgument(format!(
                "mmr_lambda {} is outside 0..=1",
                options.mmr_lambda
            )));
        }
        Ok(QueryState {
            question: question.to_string(),
            options: options.clone(),
            question_vector: Vec::new(),
            passages: Vec::new(),
            vectors: HashMap::new(),
            answer: None,
            timings: Vec::new(),
        })
    }

    fn run_stages<'s>(
        stages: impl IntoIterator<Item = &'s dyn Stage>,
        state: &mut QueryState,
    ) -> Result<()> {
        for stage in stages {
            let start = Instant::now();
            stage.run(state)?;
            state.timings.push(StageTiming {
                stage: stage.name().to_string(),
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        Ok(())
    }

    /// Retrieval and reranking only.
    pub fn search(&self, question: &str, options: &QueryOptions) -> Result<RagAnswer> {
        let mut state = Self::state(question, options)?;
        Self::run_stages(self.retrieval.iter().map(|s| s.as_ref()), &mut state)?;
        Ok(answer(state))
    }

    /// Retrieval, reranking and an answer citing the passages (served from the result
    /// cache when the same question was answered within its TTL).
    pub fn ask(&self, question: &str, options: &QueryOptions) -> Result<RagAnswer> {
        let generation = self.generation.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this pipeline has no generator to answer with".into())
        })?;
        let mut state = Self::state(question, options)?;
        let key = self.cache_key(&state, generation);
        if let Some(cache) = &self.cache {
            let start = Instant::now();
            let hit = cache
                .get(&key)
                .and_then(|json| serde_json::from_str::<RagAnswer>(&json).ok());
            if let Some(mut hit) = hit {
                hit.cached = true;
                hit.timings = vec![StageTiming {
                    stage: "cache".into(),
                    seconds: start.elapsed().as_secs_f64(),
                }];
                return Ok(hit);
            }
        }
        let stages = self.retrieval.iter().map(|s| s.as_ref());
        Self::run_stages(stages.chain([generation as &dyn Stage]), &mut state)?;
        let answer = answer(state);
        if let Some(cache) = &self.cache
            && let Ok(json) = serde_json::to_string(&answer)
        {
            cache.put(&key, &json);
        }
        Ok(answer)
    }

    fn cache_key(&self, state: &QueryState, generation: &AnswerGeneration) -> String {
        let options = &state.options;
        let filter = options
            .filter
            .as_ref()
            .and_then(|f| serde_json::to_string(f).ok())
            .unwrap_or_default();
        // The collection's size stands in for its version: answers from before an ingestion
        // that changed it are not served.
        let collection = self.collection.collection();
        let version = format!("{} {}", collection.count(), collection.nodes());
        let numbers = format!(
            "{} {} {} {} {:?} {}",
            options.k,
            options.candidates,
            options.ef,
            options.mmr_lambda,
            options.min_score,
            options.max_tokens
        );
        result_cache_key(&[
            &state.question,
            &self.retrieval_id,
            &version,
            &filter,
            &numbers,
            &generation.generator.name(),
        ])
    }

    /// The design's fused query: the model answers the bare question while retrieval and
    /// reranking run, concurrently; the result holds the answer, the passages and the timings
    /// of both paths (`generate` overlapping `embed`, `search` and `rerank`).
    pub async fn query(
        self: Arc<Self>,
        question: &str,
        options: &QueryOptions,
    ) -> Result<RagAnswer> {
        let generation_stage = self.generation.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this pipeline has no generator to answer with".into())
        })?;
        let state = Self::state(question, options)?;
        let request = GenerationRequest::chat(vec![ChatMessage::user(state.question.clone())])
            .max_tokens(options.max_tokens);
        let generator = generation_stage.generator.clone();
        let breaker = generation_stage.breaker.clone();
        let generation = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let answer = breaker.call(|| generator.generate(&request));
            (answer, start.elapsed().as_secs_f64())
        });
        let pipeline = self.clone();
        let mut retrieval_state = state;
        let retrieval = tokio::task::spawn_blocking(move || {
            let stages = pipeline.retrieval.iter().map(|s| s.as_ref());
            Self::run_stages(stages, &mut retrieval_state).map(|()| retrieval_state)
        });
        let (generated, retrieved) = tokio::join!(generation, retrieval);
        let joined = |e: tokio::task::JoinError| Error::InvalidArgument(format!("query task: {e}"));
        let (answer_text, generate_seconds) = generated.map_err(joined)?;
        let mut state = retrieved.map_err(joined)??;
        state.answer = Some(answer_text?.trim().to_string());
        state.timings.push(StageTiming {
            stage: "generate".into(),
            seconds: generate_seconds,
        });
        Ok(answer(state))
    }
}

fn answer(state: QueryState) -> RagAnswer {
    RagAnswer {
        question: state.question,
        answer: state.answer,
        sources: state.passages,
        timings: state.timings,
        cached: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(id: u64, similarity: f32) -> Passage {
        Passage {
            id,
            source: format!("doc{id}"),
            title: String::new(),
            chunk: 0,
            text: String::new(),
            similarity,
            rerank_score: None,
        }
    }

    #[test]
    fn mmr_prefers_a_different_passage_over_a_near_copy() {
        let candidates = vec![passage(0, 0.90), passage(1, 0.89), passage(2, 0.80)];
        let vectors = HashMap::from([
            (0, vec![1.0, 0.0]),
            (1, vec![1.0, 0.0]),
            (2, vec![0.0, 1.0]),
        ]);
        let ids = |v: Vec<Passage>| v.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(mmr(candidates.clone(), &vectors, 2, 1.0)), [0, 1]);
        assert_eq!(ids(mmr(candidates.clone(), &vectors, 2, 0.7)), [0, 2]);
        assert_eq!(ids(mmr(candidates, &vectors, 5, 0.7)).len(), 3);
    }

    #[test]
    fn the_prompt_numbers_the_passages() {
        let mut a = passage(0, 0.9);
        a.title = "What Is Ownership?".into();
        a.text = "Ownership is a set of rules.".into();
        let messages = grounded_prompt("What is ownership?", &[a.clone(), a]);
        let user = &messages[1].content;
        assert!(user.contains("[1] What Is Ownership?\nOwnership is a set of rules."));
        assert!(user.contains("[2] What Is Ownership?"));
        assert!(user.ends_with("Question: What is ownership?"));
    }
}
