//! A loaded model: architecture, tokenizer, chat template and generation defaults.

use std::path::{Path, PathBuf};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moera_kernels::fused_linear_cross_entropy;
use moera_models::Architecture;
use moera_models::factory::{gguf_name, hf_config_from_gguf};
use moera_models::nn::token_tensor;
use moera_models::{CausalLm, Decoder, LogitsMode, ModelError, RouterTrace};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::adapter::{Adapted, AdapterConfig, AdapterWeights, FreshLora, LoraSpec, PeftAdapter};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufWeights, Value};
use crate::quantization::{Quantization, Quantizing, WeightMemory};
use crate::safetensors_source::SafetensorsWeights;
use crate::sampler::SamplingParams;

/// A checked batch for the loss: its tokens, and per scored position its target and weight.
pub(crate) struct LossTargets {
    /// `[batch · seq]` token ids.
    pub tokens: Vec<u32>,
    /// `[batch · (seq − 1)]` next-token targets (0 where not scored).
    targets: Vec<i64>,
    /// 1 where scored, else 0.
    weights: Vec<f32>,
    /// Positions scored.
    pub scored: usize,
    pub batch: usize,
    pub seq: usize,
    vocab: usize,
}

impl LossTargets {
    /// The mean cross-entropy of `logits` `[batch, seq, vocab]` over the scored positions.
    pub fn loss(&self, logits: Tensor<3>) -> Tensor<1> {
        let device = logits.device();
        let rows = self.batch * (self.seq - 1);
        let logits = logits
            .narrow(1, 0, self.seq - 1)
            .reshape([rows, self.vocab]);
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(self.targets.clone(), [rows]), &device);
        let weights =
            Tensor::<1>::from_data(TensorData::new(self.weights.clone(), [rows]), &device);
        let log_probs = log_softmax(logits, 1).gather(1, targets.reshape([rows, 1]));
        (log_probs.reshape([rows]) * weights)
            .sum()
            .div_scalar(-(self.scored as f32))
    }

    /// [`Self::loss`] of the logits `decoder` makes of its last layer's output `hidden`
    /// `[batch, seq, hidden]`: where the device has the fused kernel (flex) and the head is a
    /// plain product (f32, or quantized and decoded once for the call), the head and the
    /// cross-entropy run as one operation and the `[rows, vocab]` logits are never stored.
    pub fn loss_of_hidden(&self, decoder: &Decoder, hidden: Tensor<3>) -> Tensor<1> {
        let normed = decoder.final_norm(hidden);
        if let Some(weight) = decoder.plain_output_weight(&normed.device()) {
            let width = normed.dims()[2];
            let rows = self.batch * (self.seq - 1);
            let scored = normed
                .clone()
                .narrow(1, 0, self.seq - 1)
                .reshape([rows, width]);
            // Ignored positions have weight 0 (their target 0 is never read as a label).
            let targets: Vec<u32> = self.targets.iter().map(|&t| t.max(0) as u32).collect();
            let share = 1.0 / self.scored.max(1) as f32;
            let row_weights: Vec<f32> = self.weights.iter().map(|w| w * share).collect();
            if let Some(loss) = fused_linear_cross_entropy(&scored, &weight, &targets, &row_weights)
            {
                return loss;
            }
        }
        self.loss(decoder.output(normed))
    }
}

/// Progress of a load, reported per decoder layer.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub done: usize,
    pub total: usize,
}

/// The label of a position [`Model::loss`] does not score (transformers' `ignore_index`).
pub const IGNORED_LABEL: i64 = -100;

/// Options of [`Model::load_with`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Precision of the linear weights.
    pub quantization: Quantization,
    /// A PEFT LoRA adapter folder applied on top of the weights.
    pub adapter: Option<PathBuf>,
    /// A new LoRA adapter (PEFT's initialization) to train; excludes `adapter`.
    pub new_adapter: Option<LoraSpec>,
    /// Fold `adapter` into the weights (`W + s·B·A`, as PEFT's `merge_and_unload`): the
    /// adapted linear layers become f32 (or are quantized again by an in-situ
    /// `quantization`) and run without the extra low-rank product. Adapters on routers and
    /// experts fold into f32 weights only: into quantized experts they are refused.
    pub merge_adapter: bool,
    /// More PEFT adapters loaded beside the base by name, sharing its weights, each applied
    /// only where a request chooses it ([`Model::with_adapter`]), as vLLM serves several
    /// LoRA adapters over one base model.
    pub named_adapters: Vec<(String, PathBuf)>,
}

/// A language model ready to score and generate.
pub struct Model {
    pub(crate) inner: Decoder,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    pub(crate) eos_ids: Vec<u32>,
    /// Sampling defaults from `generation_config.json`.
    pub default_sampling: SamplingParams,
    architecture: String,
    path: PathBuf,
    weight_memory: WeightMemory,
    /// The configuration of the adapter given at load (slot 0), if any.
    adapter_config: Option<AdapterConfig>,
    /// The named adapters and their slots.
    named_adapters: NamedSlots,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("architecture", &self.architecture)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a model folder or `.gguf` file on the default device.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let device = DeviceKind::default_kind()?.device()?;
        Self::load_on(path, &device, &mut |_| {})
    }

    /// Loads a model folder (config.json + safetensors) or a `.gguf` file onto `device`.
    pub fn load_on(
        path: impl AsRef<Path>,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        Self::load_with(path, device, LoadOptions::default(), progress)
    }

    /// Loads a model folder or `.gguf` file onto `device` with `options`.
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        options: LoadOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut layer_progress = |done, total| progress(LoadProgress { done, total });
        let model = if path.is_dir() {
            load_folder(path, device, options, &mut layer_progress)
        } else if path.is_file() {
            load_gguf(path, device, options, &mut layer_progress)
        } else {
            Err(Error::NotAModel(path.to_path_buf()))
        }?;
        tracing::info!("{}", model.weight_memory);
        Ok(model)
    }

    /// Memory of the linear weights before and after quantization.
    pub fn weight_memory(&self) -> WeightMemory {
        self.weight_memory
    }

    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    pub fn max_context(&self) -> usize {
        self.inner.max_context()
    }

    pub fn device(&self) -> Device {
        self.inner.device()
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    pub(crate) fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or(Error::NoTokenizer)
    }

    /// Token ids of `text`; `add_special_tokens` adds BOS/EOS where the model's tokenizer does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .require_tokenizer()?
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.require_tokenizer()?
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("the model has no chat template".into()))?;
        template.render(messages, add_generation_prompt)
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&id) => Err(Error::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// The architecture itself, for driving a [`moera_models::KvCache`] directly. Token ids
    /// given to it are not checked: keep them below [`Model::vocab_size`].
    pub fn causal_lm(&self) -> &dyn CausalLm {
        &self.inner
    }

    /// f32 logits `[ids.len(), vocab]` of every position of one sequence, row-major.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.logits_traced(ids, None)
    }

    /// [`Model::logits`] plus the routing of every position in each MoE layer: chosen
    /// experts, their weights and the router logits (empty for dense models).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), moera_engine::Error> {
    /// let model = moera_engine::Model::load("path/to/Qwen3-30B-A3B")?;
    /// let (_logits, trace) = model.logits_with_routing(&[9707, 11, 1879])?;
    /// for (layer, routing) in &trace.layers {
    ///     // Experts of the first token, best first, and their weights.
    ///     let k = routing.top_k;
    ///     println!("layer {layer}: {:?} {:?}", &routing.ids[..k], &routing.weights[..k]);
    /// }
    /// print!("{}", trace.load_table());
    /// # Ok(())
    /// # }
    /// ```
    pub fn logits_with_routing(&self, ids: &[u32]) -> Result<(Vec<f32>, RouterTrace)> {
        let mut trace = RouterTrace::default();
        let logits = self.logits_traced(ids, Some(&mut trace))?;
        Ok((logits, trace))
    }

    fn logits_traced(&self, ids: &[u32], trace: Option<&mut RouterTrace>) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_ids(ids)?;
        if ids.len() > self.max_context() {
            return Err(Error::PromptTooLong {
                prompt: ids.len(),
                max_new: 0,
                context: self.max_context(),
            });
        }
        let mut cache = self.inner.new_cache(1, ids.len());
        let tokens = token_tensor(ids, 1, &self.device());
        let logits = self
            .inner
            .forward_traced(tokens, &mut cache, LogitsMode::All, trace)?;
        Ok(to_f32_vec(logits.into_data())?)
    }

    /// The decoder itself (its parameters, its LoRA adapters).
    pub fn decoder(&self) -> &Decoder {
        &self.inner
    }

    /// Replaces the decoder by `f` of it: for updating parameters (an optimizer step maps
    /// the module).
    pub fn map_decoder(mut self, f: impl FnOnce(Decoder) -> Decoder) -> Self {
        self.inner = f(self.inner);
        self
    }

    /// The names of the adapters loaded beside the base ([`LoadOptions::named_adapters`]).
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.named_adapters.iter().map(|(name, _)| name.as_str())
    }

    /// Runs `f` with the named adapter applied to every forward pass this thread makes
    /// (`None`: the base model alone, without even the adapter given at load). Requests on
    /// other threads choose their own.
    ///
    /// ```no_run
    /// # fn main() -> moera_engine::Result<()> {
    /// use moera_engine::{LoadOptions, Model};
    /// let options = LoadOptions {
    ///     named_adapters: vec![("sql".into(), "adapters/sql".into())],
    ///     ..Default::default()
    /// };
    /// let model = Model::load_with("models/base", &moera_engine::Device::flex(), options, &mut |_| {})?;
    /// let logits = model.with_adapter(Some("sql"), |model| model.logits(&[1, 2, 3]))??;
    /// # Ok(()) }
    /// ```
    pub fn with_adapter<'a, R>(
        &'a self,
        name: Option<&str>,
        f: impl FnOnce(&'a Self) -> R,
    ) -> Result<R> {
        let slot = name.map(|name| self.adapter_slot(name)).transpose()?;
        Ok(moera_models::nn::with_lora_slot(slot, || f(self)))
    }

    /// The slot of the named adapter.
    pub(crate) fn adapter_slot(&self, name: &str) -> Result<usize> {
        self.named_adapters
            .iter()
            .find(|(known, _)| known == name)
            .map(|&(_, slot)| slot)
            .ok_or_else(|| Error::UnknownAdapter {
                name: name.to_string(),
                loaded: self.adapter_names().map(str::to_string).collect(),
            })
    }

    /// Writes the adapter given at load (or trained) in PEFT's format to `dir` (created if
    /// missing): `adapter_model.safetensors` with `base_model.model.{module}.lora_A.weight`
    /// `[r, in]` (`[r·E, in]` on `E` stacked experts) and `lora_B.weight` `[out, r]` in f32,
    /// and `adapter_config.json`. Named adapters are not saved (they are files already).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let config = self.adapter_config.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "the model has no adapter given at load or trained to save (named adapters \
                 are saved as they were loaded)"
                    .into(),
            )
        })?;
        let adapters: Vec<_> = self
            .inner
            .lora_adapters()
            .into_iter()
            .filter(|adapter| adapter.slot == 0)
            .collect();
        crate::adapter::save(dir, config, &adapters, &self.path)
    }

    /// The mean cross-entropy of next-token prediction over a batch of equally long
    /// sequences `ids` (`[batch][seq]`), scoring position `t`'s logits against
    /// `labels[b][t + 1]`; labels of −100 are not scored (prompt tokens, padding), as in
    /// transformers. A scalar tensor on the model's device: on an autodiff device,
    /// `backward()` gives the gradients of every trainable parameter.
    pub fn loss(&self, ids: &[Vec<u32>], labels: &[Vec<i64>]) -> Result<Tensor<1>> {
        let targets = self.loss_targets(ids, labels)?;
        Self::loss_on(&self.inner, &targets)
    }

    /// The loss of checked `targets` computed by `decoder`.
    pub(crate) fn loss_on(decoder: &Decoder, targets: &LossTargets) -> Result<Tensor<1>> {
        let device = decoder.device();
        let tokens = token_tensor(&targets.tokens, targets.batch, &device);
        let mut cache = decoder.new_cache(targets.batch, targets.seq);
        let hidden = decoder.final_hidden(tokens, &mut cache)?;
        Ok(targets.loss_of_hidden(decoder, hidden))
    }

    /// Checks a batch for [`Model::loss`] and lays out its targets.
    pub(crate) fn loss_targets(
        &self,
        ids: &[Vec<u32>],
        labels: &[Vec<i64>],
    ) -> Result<LossTargets> {
        let seq = ids.first().map_or(0, Vec::len);
        let vocab = self.vocab_size();
        if seq < 2 || ids.iter().any(|s| s.len() != seq) || labels.len() != ids.len() {
            return Err(Error::InvalidArgument(format!(
                "loss needs sequences of one length ≥ 2 with a label per token; got {} \
                 sequences of lengths {:?} and {} label rows",
                ids.len(),
                ids.iter().map(Vec::len).collect::<Vec<_>>(),
                labels.len()
            )));
        }
        if seq > self.max_context() {
            return Err(Error::PromptTooLong {
                prompt: seq,
                max_new: 0,
                context: self.max_context(),
            });
        }
        let (mut targets, mut weights) = (Vec::new(), Vec::new());
        for (row, label_row) in ids.iter().zip(labels) {
            self.check_ids(row)?;
            if label_row.len() != seq {
                return Err(Error::InvalidArgument(format!(
                    "{} labels for a sequence of {seq} tokens",
                    label_row.len()
                )));
            }
            for &label in &label_row[1..] {
                let scored = label != IGNORED_LABEL;
                if scored && label < 0 {
                    return Err(Error::InvalidArgument(format!(
                        "label {label}: labels are token ids or {IGNORED_LABEL} (not scored)"
                    )));
                }
                if scored && label >= vocab as i64 {
                    return Err(Error::TokenOutOfRange {
                        id: u32::try_from(label).unwrap_or(u32::MAX),
                        vocab,
                    });
                }
                targets.push(if scored { label } else { 0 });
                weights.push(if scored { 1f32 } else { 0.0 });
            }
        }
        let scored = weights.iter().sum::<f32>() as usize;
        if scored == 0 {
            return Err(Error::InvalidArgument("no label is scored".into()));
        }
        Ok(LossTargets {
            tokens: ids.iter().flatten().copied().collect(),
            targets,
            weights,
            scored,
            batch: ids.len(),
            seq,
            vocab,
        })
    }

    /// Perplexity over consecutive non-overlapping windows of `ctx` tokens, each scored on
    /// its tokens 1..n-1 given the earlier tokens of the same window (llama.cpp's definition).
    pub fn perplexity(&self, ids: &[u32], ctx: usize) -> Result<Perplexity> {
        if ctx < 2 {
            return Err(Error::InvalidArgument(format!(
                "perplexity context must be >= 2, got {ctx}"
            )));
        }
        let vocab = self.vocab_size();
        let mut nll = 0f64;
        let mut count = 0usize;
        for window in ids.chunks(ctx).filter(|w| w.len() >= 2) {
            let logits = self.logits(window)?;
            for (pos, target) in window.iter().enumerate().skip(1) {
                let row = &logits[(pos - 1) * vocab..pos * vocab];
                nll -= log_softmax_at(row, *target as usize);
                count += 1;
            }
        }
        if count == 0 {
            return Err(Error::EmptyPrompt);
        }
        Ok(Perplexity {
            perplexity: (nll / count as f64).exp(),
            mean_nll: nll / count as f64,
            tokens_scored: count,
        })
    }
}

/// Result of [`Model::perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub tokens_scored: usize,
}

fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

pub(crate) fn to_f32_vec(data: TensorData) -> Result<Vec<f32>, ModelError> {
    data.try_into_vec::<f32>().map_err(|e| ModelError::Weights {
        name: "logits".into(),
        reason: format!("{e:?}"),
    })
}

pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Json>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Ids from a JSON number or array of numbers (`eos_token_id` takes both forms).
fn json_ids(value: Option<&Json>) -> Vec<u32> {
    match value {
        Some(Json::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Json::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => vec![],
    }
}

/// A token given as `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn json_token(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An unsupported architecture becomes [`Error::UnknownArchitecture`]; anything else
/// an error about `path`.
fn architecture_error(path: &Path, e: ModelError) -> Error {
    match e {
        ModelError::UnsupportedArchitecture { name, supported } => Error::UnknownArchitecture {
            path: path.to_path_buf(),
            architecture: name,
            supported,
        },
        other => model_error(path)(other),
    }
}

fn model_error(path: &Path) -> impl Fn(ModelError) -> Error + '_ {
    move |source| Error::Model {
        path: path.to_path_buf(),
        source,
    }
}

/// Named adapters and their slots.
type NamedSlots = Vec<(String, usize)>;

/// The adapters a load applies: the one given at load (slot 0; a PEFT adapter or fresh
/// factors to train) and the named ones (slots 1, 2, …).
struct LoadAdapters {
    adapters: Vec<(usize, AdapterWeights)>,
    names: NamedSlots,
    merge: bool,
}

impl LoadAdapters {
    fn open(options: &LoadOptions) -> Result<Self> {
        let invalid = |reason: &str| Err(Error::InvalidArgument(reason.into()));
        if options.merge_adapter && options.adapter.is_none() {
            return invalid("merge_adapter needs an adapter to merge");
        }
        if options.merge_adapter && !options.named_adapters.is_empty() {
            return invalid("merge_adapter folds one adapter: load named adapters unmerged");
        }
        let mut adapters = Vec::new();
        match (&options.adapter, &options.new_adapter) {
            (Some(_), Some(_)) => {
                return invalid("load either a PEFT adapter or a new one, not both");
            }
            (Some(dir), None) => {
                adapters.push((0, AdapterWeights::Peft(Box::new(PeftAdapter::open(dir)?))))
            }
            (None, Some(spec)) => adapters.push((0, AdapterWeights::Fresh(FreshLora::new(spec)?))),
            (None, None) => {}
        }
        let mut names = Vec::new();
        for (slot, (name, dir)) in (1..).zip(&options.named_adapters) {
            if name.is_empty() || names.iter().any(|(known, _)| known == name) {
                return Err(Error::InvalidArgument(format!(
                    "adapter names must be non-empty and distinct: {name:?}"
                )));
            }
            adapters.push((
                slot,
                AdapterWeights::Peft(Box::new(PeftAdapter::open(dir)?)),
            ));
            names.push((name.clone(), slot));
        }
        Ok(Self {
            adapters,
            names,
            merge: options.merge_adapter,
        })
    }

    fn source<'a>(&'a self, inner: &'a dyn moera_models::WeightSource) -> Adapted<'a> {
        Adapted {
            inner,
            adapters: &self.adapters,
            merge: self.merge,
        }
    }

    /// Checks every adapter fit the model, folds a merged adapter's factors on parameters
    /// (routers, experts' stacked weights: the linear layers' were folded as they loaded),
    /// and returns the model with the slot-0 adapter's configuration and the named slots.
    fn finish(
        self,
        model: Decoder,
        base: &Path,
    ) -> Result<(Decoder, Option<AdapterConfig>, NamedSlots)> {
        for (_, adapter) in &self.adapters {
            adapter.check_all_used()?;
        }
        let model = if self.merge {
            model
                .merge_parameter_adapters()
                .map_err(model_error(base))?
        } else {
            model
        };
        let config = self
            .adapters
            .into_iter()
            .find(|&(slot, _)| slot == 0 && !self.merge)
            .map(|(_, adapter)| adapter.config(base));
        Ok((model, config, self.names))
    }
}

fn load_folder(
    dir: &Path,
    device: &Device,
    options: LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Model> {
    let config_path = dir.join("config.json");
    let config_json = read_json(&config_path)?;
    let architecture = Architecture::from_hf_config(&config_json)
        .map_err(|e| architecture_error(&config_path, e))?;
    let weights = SafetensorsWeights::open_folder(dir)?;
    let format = options
        .quantization
        .in_situ_format(weights.parameter_count());
    let adapters = LoadAdapters::open(&options)?;
    let adapted = adapters.source(&weights);
    let quantizing = Quantizing::new(&adapted, format);
    let model = architecture
        .load(&config_json, &quantizing, device, progress)
        .map_err(|e| match e {
            ModelError::ConfigJson(reason) => Error::Config {
                path: config_path.clone(),
                reason,
            },
            ModelError::ShapeMismatch { ref name, .. }
            | ModelError::Weights { ref name, .. }
            | ModelError::ExpertCount { ref name, .. } => {
                model_error(weights.path_of(name).unwrap_or(dir))(e)
            }
            ModelError::Config(_) => model_error(&config_path)(e),
            _ => model_error(dir)(e),
        })?;
    let weight_memory = quantizing.memory.get();
    let (model, adapter_config, named_adapters) = adapters.finish(model, dir)?;
    let architecture = architecture.model_type().to_string();

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(
            Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Tokenizer {
                path: tokenizer_path.clone(),
                reason: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
    let get_tc = |key: &str| tokenizer_config.as_ref().and_then(|c| c.get(key));
    let chat_source = match get_tc("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
    .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let chat_template = chat_source
        .map(|source| {
            let bos = json_token(get_tc("bos_token")).unwrap_or_default();
            let eos = json_token(get_tc("eos_token")).unwrap_or_default();
            ChatTemplate::new(&source, &bos, &eos)
        })
        .transpose()?;

    let mut eos_ids = json_ids(
        generation_config
            .as_ref()
            .and_then(|g| g.get("eos_token_id")),
    );
    eos_ids.extend(json_ids(config_json.get("eos_token_id")));
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let default_sampling = generation_config
        .as_ref()
        .map(sampling_from_generation_config)
        .unwrap_or_default();
    Ok(Model {
        inner: model,
        tokenizer,
        chat_template,
        eos_ids,
        default_sampling,
        architecture,
        path: dir.to_path_buf(),
        weight_memory,
        adapter_config,
        named_adapters,
    })
}

/// transformers' defaults from `generation_config.json` (sampling only if `do_sample`).
fn sampling_from_generation_config(g: &Json) -> SamplingParams {
    let f = |key: &str| g.get(key).and_then(Json::as_f64);
    let mut params = SamplingParams::default();
    if g.get("do_sample").and_then(Json::as_bool) == Some(true) {
        params.temperature = f("temperature").unwrap_or(1.0) as f32;
        params.top_p = f("top_p").unwrap_or(1.0) as f32;
        params.top_k = f("top_k").unwrap_or(0.0) as usize;
        params.min_p = f("min_p").unwrap_or(0.0) as f32;
    }
    params.repetition_penalty = f("repetition_penalty").unwrap_or(1.0) as f32;
    params
}

fn load_gguf(
    path: &Path,
    device: &Device,
    options: LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Model> {
    let file = GgufFile::open(path)?;
    let architecture = file
        .architecture()
        .ok_or_else(|| file.config_error("GGUF metadata lacks general.architecture"))?
        .to_string();
    let vocab_size = file
        .tensor_info("token_embd.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| model_error(path)(ModelError::MissingTensor("token_embd.weight".into())))?;
    let has_tensor = |name: &str| file.tensor_info(name).is_some();
    let (kind, config) = hf_config_from_gguf(&file, &architecture, vocab_size, &has_tensor)
        .map_err(|e| architecture_error(path, e))?;
    // llama.cpp permutes Q/K rows for its rotary layout in `llama` files only.
    let unpermute_qk = (architecture == "llama").then(|| {
        let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
        let kv_heads = config["num_key_value_heads"]
            .as_u64()
            .map_or(heads, |v| v as usize);
        (heads, kv_heads)
    });
    let weights = GgufWeights {
        file: &file,
        name_map: gguf_name,
        unpermute_qk,
        keep_quantized: options.quantization.keeps_gguf_blocks(),
    };
    // GGUF files are quantized by their authors; an explicit int8/int4 re-quantizes them.
    let format = match options.quantization {
        Quantization::Auto => None,
        other => other.in_situ_format(0),
    };
    let adapters = LoadAdapters::open(&options)?;
    let adapted = adapters.source(&weights);
    let quantizing = Quantizing::new(&adapted, format);
    let model = kind
        .load(&config, &quantizing, device, progress)
        .map_err(model_error(path))?;
    let weight_memory = quantizing.memory.get();
    let (model, adapter_config, named_adapters) = adapters.finish(model, path)?;
    let architecture = kind.model_type().to_string();

    let tokenizer = if file.get("tokenizer.ggml.model").is_some() {
        Some(
            crate::tokenizer::from_gguf(&file).map_err(|reason| Error::Tokenizer {
                path: path.to_path_buf(),
                reason,
            })?,
        )
    } else {
        None
    };
    let token_text = |key: &str| {
        let id = file.get(key)?.as_u64()? as usize;
        file.get("tokenizer.ggml.tokens")?
            .as_array()?
            .get(id)?
            .as_str()
            .map(str::to_string)
    };
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(|source| {
            ChatTemplate::new(
                source,
                &token_text("tokenizer.ggml.bos_token_id").unwrap_or_default(),
                &token_text("tokenizer.ggml.eos_token_id").unwrap_or_default(),
            )
        })
        .transpose()?;
    let mut eos_ids: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| file.get(k).and_then(Value::as_u64))
        .map(|v| v as u32)
        .collect();
    eos_ids.sort_unstable();
    eos_ids.dedup();
    Ok(Model {
        inner: model,
        tokenizer,
        chat_template,
        eos_ids,
        default_sampling: SamplingParams::default(),
        architecture,
        path: path.to_path_buf(),
        weight_memory,
        adapter_config,
        named_adapters,
    })
}
