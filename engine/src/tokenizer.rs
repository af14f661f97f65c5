//! Tokenizers: `tokenizer.json` files, and GGUF vocabularies (`tokenizer.ggml.*`) turned into
//! a [`tokenizers::Tokenizer`]; plus an incremental, UTF-8-safe detokenizer for streaming.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::{GgufFile, Value};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Split regexes of llama.cpp's pre-tokenizer types (GPT-2's own is ByteLevel's built-in one).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, String> {
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or("no tokenizer.ggml.model in metadata")?;
    let tokens: Vec<String> = string_array(file, "tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match file
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        Some(values) => values.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut tokenizer = match model {
        "gpt2" => {
            let merges = string_array(file, "tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| format!("malformed merge `{m}`"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let pre = file
                .get("tokenizer.ggml.pre")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(pre == "llama3" || pre == "llama-bpe")
                .build()
                .map_err(|e| e.to_string())?;
            let mut tokenizer = Tokenizer::new(bpe);
            tokenizer.with_pre_tokenizer(Some(gpt2_pre_tokenizer(pre)?));
            tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
            tokenizer
        }
        "llama" => {
            let scores: Vec<f32> = match file.get("tokenizer.ggml.scores").and_then(Value::as_array)
            {
                Some(values) => values
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                    .collect(),
                None => vec![0.0; tokens.len()],
            };
            let merges = merges_from_scores(&tokens, &scores, &vocab);
            let unk = file
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(Value::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned());
            let mut builder = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(unk) = unk {
                builder = builder.unk_token(unk);
            }
            let bpe = builder.build().map_err(|e| e.to_string())?;
            let add_space_prefix = file
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let mut tokenizer = Tokenizer::new(bpe);
            let replace = Replace::new(" ", "▁").map_err(|e| e.to_string())?;
            let mut normalizers = vec![];
            if add_space_prefix {
                normalizers.push(Prepend::new("▁".into()).into());
            }
            normalizers.push(replace.into());
            tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
            let mut decoders = vec![
                Replace::new("▁", " ").map_err(|e| e.to_string())?.into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space_prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
            tokenizer
        }
        other => return Err(format!("tokenizer model `{other}` is not supported")),
    };
    // Control and user-defined tokens are matched whole in the text, before the model runs.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, t)| AddedToken::from(tok.clone(), *t == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer.add_special_tokens(&added);

    let token_id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
    let flag = |key: &str, default: bool| file.get(key).and_then(Value::as_bool).unwrap_or(default);
    let mut single = Vec::new();
    let mut specials = Vec::new();
    let default_bos = model == "llama";
    if flag("tokenizer.ggml.add_bos_token", default_bos)
        && let Some(bos) = token_id("tokenizer.ggml.bos_token_id")
    {
        let bos_text = tokens
            .get(bos as usize)
            .cloned()
            .ok_or("bos id outside the vocabulary")?;
        single.push(bos_text.clone());
        specials.push((bos_text, bos));
    }
    single.push("$A".to_string());
    if flag("tokenizer.ggml.add_eos_token", false)
        && let Some(eos) = token_id("tokenizer.ggml.eos_token_id")
    {
        let eos_text = tokens
            .get(eos as usize)
            .cloned()
            .ok_or("eos id outside the vocabulary")?;
        single.push(eos_text.clone());
        specials.push((eos_text, eos));
    }
    if !specials.is_empty() {
        let processor = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .map_err(|e| e.to_string())?
            .special_tokens(specials)
            .build()
            .map_err(|e| e.to_string())?;
        tokenizer.with_post_processor(Some(processor));
    }
    Ok(tokenizer)
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>, String> {
    let values = file
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no `{key}` array in metadata"))?;
    values
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{key}` holds a non-string"))
        })
        .collect()
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` name.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreSequence, String> {
    let split = |regex: &str| -> Result<_, String> {
        let pattern = SplitPattern::Regex(regex.to_string());
        Ok(Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| e.to_string())?
            .into())
    };
    let steps = match pre {
        // GPT-2's regex, applied by ByteLevel itself.
        "default" | "gpt2" | "gpt-2" => vec![ByteLevel::new(false, true, true).into()],
        // Single digits first, then GPT-2's regex (StarCoder, SmolLM, Refact).
        "smollm" | "starcoder" | "refact" | "codeshell" => vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ],
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => {
            vec![
                split(LLAMA3_REGEX)?,
                ByteLevel::new(false, true, false).into(),
            ]
        }
        "qwen2" | "deepseek-r1-qwen" => {
            vec![
                split(QWEN2_REGEX)?,
                ByteLevel::new(false, true, false).into(),
            ]
        }
        other => {
            tracing::warn!("pre-tokenizer `{other}` unknown: using GPT-2's regex");
            vec![ByteLevel::new(false, true, true).into()]
        }
    };
    Ok(PreSequence::new(steps))
}

/// BPE merges equivalent to SentencePiece's score-ordered merging: every split of a vocabulary
/// piece into two pieces is a merge, ranked by the score of the merged piece.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((score, l, r, left, right));
            }
        }
    }
    // Highest score first; among equal scores, by the ids of the two halves.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// Turns a stream of token ids into text pieces without ever splitting a UTF-8 character.
///
/// Each step decodes a short window twice, with and without the new tokens, and emits the
/// difference once it no longer ends in an incomplete character (U+FFFD). Decoding a window
/// rather than one token keeps the spaces and byte-fallback sequences that depend on
/// neighbouring tokens right, at a constant cost per token.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let text = self.decode(tokenizer, self.prefix_offset, self.ids.len());
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return None;
        }
        let new = text.get(prefix.len()..)?.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Some(new)
    }

    /// Text held back so far (an incomplete character at the end of generation).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Option<String> {
        let prefix = self.decode(tokenizer, self.prefix_offset, self.read_offset);
        let text = self.decode(tokenizer, self.prefix_offset, self.ids.len());
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        let new = text.get(prefix.len()..)?;
        (!new.is_empty()).then(|| new.to_string())
    }

    fn decode(&self, tokenizer: &Tokenizer, from: usize, to: usize) -> String {
        tokenizer
            .decode(&self.ids[from..to], false)
            .unwrap_or_default()
    }
}
