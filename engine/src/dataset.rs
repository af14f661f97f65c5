//! Fine-tuning data: JSONL examples tokenized with the model's tokenizer and chat template,
//! with labels only on what the model should learn to write.
//!
//! Each line is `{"prompt": ..., "completion": ...}` (the completion is learned, then EOS)
//! or `{"messages": [{"role": ..., "content": ...}, ...]}` (the assistant turns are learned,
//! as the chat template renders them). Other tokens get the label −100 ([`IGNORED_LABEL`]).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::chat::ChatMessage;
use crate::error::{Error, Result};
use crate::model::{IGNORED_LABEL, Model};

/// One training example as a JSONL line gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Example {
    Completion { prompt: String, completion: String },
    Chat { messages: Vec<ChatMessage> },
}

/// A tokenized example: `labels[t]` is `ids[t]` where the token is learned, else −100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// Tokens the loss scores: labelled positions after the first (position 0 is never
    /// predicted).
    pub fn learned_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORED_LABEL)
            .count()
    }
}

/// How a JSONL file becomes training and validation examples.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    /// Longest example in tokens; longer ones are truncated (with a warning).
    pub max_len: usize,
    /// Skip (and count) malformed lines instead of failing on the first one.
    pub skip_malformed: bool,
    /// Share of the examples held out for validation (after shuffling).
    pub validation_fraction: f64,
    /// Seed of the shuffle.
    pub seed: u64,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            max_len: 1024,
            skip_malformed: false,
            validation_fraction: 0.0,
            seed: 0,
        }
    }
}

/// Tokenized training and validation examples, and what loading them dropped or cut.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<TokenizedExample>,
    pub validation: Vec<TokenizedExample>,
    /// Malformed lines skipped (`skip_malformed`).
    pub skipped_lines: usize,
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Examples left with no token to learn (e.g. the prompt filled `max_len`), dropped.
    pub unscored: usize,
}

/// The examples of a JSONL text with their line numbers (1-based); blank lines are ignored.
/// A malformed line is an [`Error::Dataset`] naming it, or skipped and counted when
/// `skip_malformed`.
pub fn parse_jsonl(
    text: &str,
    path: &Path,
    skip_malformed: bool,
) -> Result<(Vec<(usize, Example)>, usize)> {
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Example>(line) {
            Ok(example) => examples.push((index + 1, example)),
            Err(_) if skip_malformed => skipped += 1,
            Err(e) => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    line: Some(index + 1),
                    reason: format!(
                        "expected {{\"prompt\", \"completion\"}} or {{\"messages\": [...]}} ({e})"
                    ),
                });
            }
        }
    }
    Ok((examples, skipped))
}

impl Dataset {
    /// Reads, tokenizes, shuffles and splits a JSONL file for `model`.
    pub fn from_jsonl(path: &Path, model: &Model, options: &DatasetOptions) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (examples, skipped_lines) = parse_jsonl(&text, path, options.skip_malformed)?;
        let invalid = |line: Option<usize>, reason: String| Error::Dataset {
            path: PathBuf::from(path),
            line,
            reason,
        };
        if examples.is_empty() {
            return Err(invalid(None, "no examples".into()));
        }
        if options.max_len < 2 {
            return Err(invalid(None, format!("max_len {} < 2", options.max_len)));
        }
        if !(0.0..1.0).contains(&options.validation_fraction) {
            return Err(invalid(
                None,
                format!(
                    "validation fraction {} is not in [0, 1)",
                    options.validation_fraction
                ),
            ));
        }
        let mut tokenized = Vec::with_capacity(examples.len());
        let (mut truncated, mut unscored) = (0, 0);
        for (line, example) in &examples {
            let mut example = tokenize(model, example).map_err(|e| match e {
                Error::InvalidArgument(reason) => invalid(Some(*line), reason),
                other => other,
            })?;
            if example.ids.len() > options.max_len {
                example.ids.truncate(options.max_len);
                example.labels.truncate(options.max_len);
                truncated += 1;
                tracing::warn!(
                    "{}:{line}: example truncated to {} tokens",
                    path.display(),
                    options.max_len
                );
            }
            // Position 0 is never predicted: an example needs a learned token after it.
            if example.learned_tokens() == 0 {
                unscored += 1;
                tracing::warn!(
                    "{}:{line}: no completion token to learn; skipped",
                    path.display()
                );
                continue;
            }
            tokenized.push(example);
        }
        if tokenized.is_empty() {
            return Err(invalid(
                None,
                format!(
                    "none of the {} examples has a token to learn",
                    examples.len()
                ),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
        tokenized.shuffle(&mut rng);
        let held_out = (tokenized.len() as f64 * options.validation_fraction).round() as usize;
        let held_out = held_out.min(tokenized.len() - 1);
        let validation = tokenized.split_off(tokenized.len() - held_out);
        Ok(Self {
            train: tokenized,
            validation,
            skipped_lines,
            truncated,
            unscored,
        })
    }
}

/// Tokenizes one example for `model`: a completion after its prompt (prompt tokens with BOS
/// as the tokenizer adds it, completion tokens and EOS learned), or a conversation rendered
/// by the chat template with the tokens of each assistant turn learned.
pub fn tokenize(model: &Model, example: &Example) -> Result<TokenizedExample> {
    match example {
        Example::Completion { prompt, completion } => {
            let prompt_ids = model.encode(prompt, true)?;
            let mut completion_ids = model.encode(completion, false)?;
            if let Some(&eos) = model.eos_ids().first() {
                completion_ids.push(eos);
            }
            if completion_ids.is_empty() {
                return Err(Error::InvalidArgument("empty completion".into()));
            }
            let labels = std::iter::repeat_n(IGNORED_LABEL, prompt_ids.len())
                .chain(completion_ids.iter().map(|&id| id as i64))
                .collect();
            let mut ids = prompt_ids;
            ids.extend(completion_ids);
            Ok(TokenizedExample { ids, labels })
        }
        Example::Chat { messages } => tokenize_chat(model, messages),
    }
}

/// The conversation rendered whole; an assistant turn spans from the end of the render of
/// the messages before it (with the generation prompt) to the end of the render including
/// it, and the tokens whose text lies in a span are learned.
fn tokenize_chat(model: &Model, messages: &[ChatMessage]) -> Result<TokenizedExample> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(Error::InvalidArgument(
            "a conversation without an assistant message has nothing to learn".into(),
        ));
    }
    let text = model.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let before = model.apply_chat_template(&messages[..i], true)?;
        let through = model.apply_chat_template(&messages[..=i], false)?;
        if !text.starts_with(&before) || !text.starts_with(&through) {
            return Err(Error::ChatTemplate(
                "the chat template does not render a conversation's turns as prefixes of it, \
                 so the assistant's tokens cannot be located"
                    .into(),
            ));
        }
        spans.push(before.len()..through.len());
    }
    let encoding = model
        .require_tokenizer()?
        .encode(text.as_str(), false)
        .map_err(|e| Error::Tokenize(e.to_string()))?;
    let ids = encoding.get_ids().to_vec();
    let labels = ids
        .iter()
        .zip(encoding.get_offsets())
        .map(|(&id, &(start, end))| {
            let learned = end > start && spans.iter().any(|s| start >= s.start && end <= s.end);
            if learned { id as i64 } else { IGNORED_LABEL }
        })
        .collect();
    Ok(TokenizedExample { ids, labels })
}

/// Equally long sequences and their labels, as [`Model::loss`] takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
}

/// Batches of `batch_size` examples right-padded to their longest with `pad_id` (labels
/// −100): padding after a sequence changes nothing before it under causal attention.
pub fn batches(examples: &[TokenizedExample], batch_size: usize, pad_id: u32) -> Vec<Batch> {
    examples
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let len = chunk.iter().map(|e| e.ids.len()).max().unwrap_or(0);
            let (ids, labels) = chunk
                .iter()
                .map(|e| {
                    let pad = len - e.ids.len();
                    let mut ids = e.ids.clone();
                    ids.extend(std::iter::repeat_n(pad_id, pad));
                    let mut labels = e.labels.clone();
                    labels.extend(std::iter::repeat_n(IGNORED_LABEL, pad));
                    (ids, labels)
                })
                .unzip();
            Batch { ids, labels }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pad_on_the_right_without_labels() {
        let example = |n: u32| TokenizedExample {
            ids: (1..=n).collect(),
            labels: (1..=n).map(i64::from).collect(),
        };
        let batches = batches(&[example(3), example(1), example(2)], 2, 0);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].ids, vec![vec![1, 2, 3], vec![1, 0, 0]]);
        assert_eq!(batches[0].labels, vec![vec![1, 2, 3], vec![1, -100, -100]]);
        assert_eq!(batches[1].ids, vec![vec![1, 2]]);
    }

    #[test]
    fn lines_parse_as_completions_or_conversations() {
        let text = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n\
                    {\"messages\": [{\"role\": \"user\", \"content\": \"c\"}]}\n";
        let (examples, skipped) = parse_jsonl(text, Path::new("x.jsonl"), false).unwrap();
        assert_eq!(skipped, 0);
        assert_eq!(examples[0].0, 1);
        assert_eq!(examples[1].0, 3);
        assert!(matches!(&examples[1].1, Example::Chat { messages } if messages.len() == 1));
        let err = parse_jsonl("{\"prompt\": \"a\"}", Path::new("x.jsonl"), false).unwrap_err();
        assert!(err.to_string().starts_with("x.jsonl:1: expected"), "{err}");
    }
}
