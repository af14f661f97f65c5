//! The pre-norm decoder every supported architecture shares:
//! embedding → layers [RMSNorm → attention → residual → RMSNorm → MLP or MoE → residual]
//! → RMSNorm → head. Architecture files build one from their config and weights.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor};

use crate::attention::{Attention, AttentionSpec};
use crate::config::BaseConfig;
use crate::deepseek::LatentAttention;
use crate::moe::{Routing, SparseMoe};
use crate::nn::{Embedding, GatedMlp, Linear, RmsNorm, checked_data, token_tensor};
use crate::rope::{RopeTables, RotaryEmbedding};
use crate::{CausalLm, KvCache, LinearWeight, LogitsMode, ModelError, RaggedKvCache, WeightSource};

/// The attention of a layer.
// One per layer and built once: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer {
    Standard(Attention),
    /// DeepSeek's multi-head latent attention.
    Latent(LatentAttention),
}

impl Mixer {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        match self {
            Mixer::Standard(attn) => attn.forward(x, rope, cache, layer),
            Mixer::Latent(attn) => attn.forward(x, rope, cache, layer),
        }
    }

    fn cache_layout(&self) -> (usize, [usize; 2]) {
        match self {
            Mixer::Standard(attn) => (attn.kv_heads(), attn.cache_dims()),
            Mixer::Latent(attn) => (1, attn.cache_dims()),
        }
    }
}

/// The feed-forward block of a layer.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FeedForward {
    Dense(GatedMlp),
    Sparse(SparseMoe),
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Mixer,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
}

/// Expert choices recorded during forward passes, per MoE layer, in token order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouterTrace {
    /// Layer index → routing of every token seen so far (prompt, then each decoded token).
    pub layers: BTreeMap<usize, Routing>,
}

impl RouterTrace {
    fn record(&mut self, layer: usize, routing: Routing) {
        match self.layers.get_mut(&layer) {
            Some(seen) => {
                seen.logits.extend(routing.logits);
                seen.ids.extend(routing.ids);
                seen.weights.extend(routing.weights);
            }
            None => {
                self.layers.insert(layer, routing);
            }
        }
    }

    /// Tokens routed to each expert, per MoE layer.
    pub fn expert_counts(&self) -> BTreeMap<usize, Vec<usize>> {
        self.layers
            .iter()
            .map(|(&layer, routing)| (layer, routing.expert_counts()))
            .collect()
    }

    pub fn clear(&mut self) {
        self.layers.clear();
    }

    /// A text table of expert load per MoE layer: token slots routed, experts used,
    /// the busiest expert's load over the mean, and the loads (all of them up to 16
    /// experts, else the 8 busiest).
    pub fn load_table(&self) -> String {
        let mut out = String::from("layer  tokens  experts used  max/mean  load (expert:slots)\n");
        for (layer, routing) in &self.layers {
            let counts = routing.expert_counts();
            let slots: usize = counts.iter().sum();
            let used = counts.iter().filter(|&&c| c > 0).count();
            let mean = slots as f64 / counts.len().max(1) as f64;
            let max = counts.iter().copied().max().unwrap_or(0);
            let mut shown: Vec<(usize, usize)> = counts.iter().copied().enumerate().collect();
            if shown.len() > 16 {
                shown.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                shown.truncate(8);
            }
            let loads: Vec<String> = shown.iter().map(|(e, c)| format!("{e}:{c}")).collect();
            out.push_str(&format!(
                "{layer:>5}  {:>6}  {:>12}  {:>8.2}  {}\n",
                routing.tokens(),
                format!("{used}/{}", counts.len()),
                if mean > 0.0 { max as f64 / mean } else { 0.0 },
                loads.join(" ")
            ));
        }
        out
    }
}

/// Settings of a decoder besides its weights.
#[derive(Debug, Clone)]
pub struct DecoderInfo {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_context: usize,
}

/// A decoder-only transformer with its output head.
#[derive(Module, Debug)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    #[module(skip)]
    rope: RotaryEmbedding,
    #[module(skip)]
    info: DecoderInfo,
}

impl Decoder {
    /// Folds the adapters on parameters (routers, experts' stacked weights) into the
    /// weights: merging an adapter folds the linear layers' as they load, and these
    /// after, whatever layout the checkpoint stores the experts in.
    pub fn merge_parameter_adapters(mut self) -> Result<Self, ModelError> {
        for layer in &mut self.layers {
            if let FeedForward::Sparse(moe) = &mut layer.mlp {
                moe.merge_lora()?;
            }
        }
        Ok(self)
    }

    /// Every linear layer, in layer order, then the head.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut linears = Vec::new();
        for layer in &self.layers {
            linears.extend(match &layer.self_attn {
                Mixer::Standard(attention) => attention.linears(),
                Mixer::Latent(attention) => attention.linears(),
            });
            linears.extend(match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.linears(),
                FeedForward::Sparse(moe) => moe.linears(),
            });
        }
        linears.push(&self.lm_head);
        linears
    }

    /// Loads the embedding, final norm and head named as transformers does, and one layer
    /// per `load_layer(index, "model.layers.{index}")` call; `progress` follows the layers.
    pub fn load(
        base: &BaseConfig,
        rope: RotaryEmbedding,
        source: &dyn WeightSource,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
        mut load_layer: impl FnMut(usize, &str) -> Result<DecoderLayer, ModelError>,
    ) -> Result<Self, ModelError> {
        let hidden = base.hidden_size;
        let embed_name = "model.embed_tokens.weight";
        let (embed, lm_head) = if !base.tie_word_embeddings && source.contains("lm_head.weight") {
            let head = Linear::load(source, "lm_head", hidden, base.vocab_size, false, device)?;
            (
                checked_data(source, embed_name, &[base.vocab_size, hidden])?,
                head,
            )
        } else {
            // A tied head reads the embedding matrix, which the source may hand over quantized.
            match source.linear_weight(embed_name, base.vocab_size, hidden)? {
                LinearWeight::Dense(embed) => {
                    let head = Linear::from_hf_weight(&embed, None, device);
                    (embed, head)
                }
                quantized => {
                    let head = Linear::from_weight(quantized, None, device);
                    (
                        checked_data(source, embed_name, &[base.vocab_size, hidden])?,
                        head,
                    )
                }
            }
        };
        let embed_tokens = Embedding {
            weight: Param::from_tensor(Tensor::from_data(embed, device)),
        };
        let total = base.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        for i in 0..total {
            layers.push(load_layer(i, &format!("model.layers.{i}"))?);
            progress(i + 1, total);
        }
        let norm = RmsNorm::load(
            source,
            "model.norm.weight",
            hidden,
            base.rms_norm_eps,
            device,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            info: DecoderInfo {
                vocab_size: base.vocab_size,
                hidden_size: hidden,
                max_context: base.max_position_embeddings,
            },
        })
    }

    pub fn info(&self) -> &DecoderInfo {
        &self.info
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings `[batch, seq, hidden]` of `tokens` `[batch, seq]`.
    pub fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(tokens)
    }

    /// Logits of hidden states: the final norm, then the head.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        self.output(self.final_norm(x))
    }

    /// The final norm: the head's input from the last layer's output.
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
        self.norm.forward(x)
    }

    /// The output layer (`lm_head`) on final-normed hidden states.
    pub fn output(&self, normed: Tensor<3>) -> Tensor<3> {
        self.lm_head.forward(normed)
    }

    /// The output layer's weight `[hidden, vocab]` as f32 on `device` when the layer is that
    /// product alone (see [`Linear::plain_weight`]): a fused loss may then take it.
    pub fn plain_output_weight(&self, device: &Device) -> Option<Tensor<2>> {
        self.lm_head.plain_weight(device)
    }

    /// The last layer's output `[batch, seq, hidden]` for `tokens` after `cache`'s
    /// positions (before the final norm and the head), the cache filled.
    pub fn final_hidden(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>, ModelError> {
        self.hidden_traced(tokens, cache, None)
    }

    fn hidden_traced(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        mut trace: Option<&mut RouterTrace>,
    ) -> Result<Tensor<3>, ModelError> {
        let [batch, seq] = tokens.dims();
        if batch == 0 || seq == 0 {
            return Err(ModelError::EmptyInput);
        }
        let requested = cache.len() + seq;
        if requested > cache.capacity() {
            return Err(ModelError::ContextOverflow {
                requested,
                capacity: cache.capacity(),
            });
        }
        let rope = self.rope.tables(cache.len(), seq, &self.device());
        let mut x = self.embed(tokens);
        for i in 0..self.layers.len() {
            x = self.run_layer(i, x, &rope, cache, i, trace.as_deref_mut())?;
        }
        cache.advance(seq);
        Ok(x)
    }

    /// Layer `index` alone on hidden states `x` `[batch, seq, hidden]` of positions
    /// `0..seq`, with a cache of its own: training runs the layers one at a time this way
    /// to recompute a layer's activations in backward instead of keeping them.
    pub fn layer_forward(&self, index: usize, x: Tensor<3>) -> Result<Tensor<3>, ModelError> {
        let [batch, seq, _] = x.dims();
        let device = x.device();
        let (heads, dims) = self.layers[index].self_attn.cache_layout();
        let mut cache = KvCache::new(1, batch, heads, dims, seq, &device);
        let rope = self.rope.tables(0, seq, &device);
        self.run_layer(index, x, &rope, &mut cache, 0, None)
    }

    /// Layer `index` on `x`, caching its keys and values in `cache` layer `cache_layer`.
    fn run_layer(
        &self,
        index: usize,
        x: Tensor<3>,
        rope: &RopeTables,
        cache: &mut KvCache,
        cache_layer: usize,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Tensor<3>, ModelError> {
        self.run_layer_with(index, x, trace, |mixer, h| {
            mixer.forward(h, rope, cache, cache_layer)
        })
    }

    /// Layer `index` on `x`, its attention run by `attend(mixer, normed x)`.
    fn run_layer_with(
        &self,
        index: usize,
        x: Tensor<3>,
        trace: Option<&mut RouterTrace>,
        attend: impl FnOnce(&Mixer, Tensor<3>) -> Tensor<3>,
    ) -> Result<Tensor<3>, ModelError> {
        crate::nn::lora_dropout_layer(index);
        let layer = &self.layers[index];
        let attn = attend(&layer.self_attn, layer.input_layernorm.forward(x.clone()));
        let x = x + attn;
        let h = layer.post_attention_layernorm.forward(x.clone());
        let ff = match &layer.mlp {
            FeedForward::Dense(mlp) => mlp.forward(h),
            FeedForward::Sparse(moe) => {
                let (out, routing) = moe.forward(h, trace.is_some())?;
                if let (Some(trace), Some(routing)) = (trace, routing) {
                    trace.record(index, routing);
                }
                out
            }
        };
        Ok(x + ff)
    }

    /// A layer of standard attention (`{prefix}.self_attn`) and the given feed-forward
    /// block, with its two RMSNorms.
    pub fn standard_layer(
        source: &dyn WeightSource,
        prefix: &str,
        base: &BaseConfig,
        attention: &AttentionSpec,
        mlp: FeedForward,
        device: &Device,
    ) -> Result<DecoderLayer, ModelError> {
        let (input_layernorm, post_attention_layernorm) =
            Self::layer_norms(source, prefix, base, device)?;
        Ok(DecoderLayer {
            input_layernorm,
            self_attn: Mixer::Standard(Attention::load(
                source,
                &format!("{prefix}.self_attn"),
                attention,
                device,
            )?),
            post_attention_layernorm,
            mlp,
        })
    }

    /// The two RMSNorms of layer `prefix` (`input_layernorm`, `post_attention_layernorm`).
    pub fn layer_norms(
        source: &dyn WeightSource,
        prefix: &str,
        base: &BaseConfig,
        device: &Device,
    ) -> Result<(RmsNorm, RmsNorm), ModelError> {
        let norm = |name: &str| {
            RmsNorm::load(
                source,
                &format!("{prefix}.{name}.weight"),
                base.hidden_size,
                base.rms_norm_eps,
                device,
            )
        };
        Ok((norm("input_layernorm")?, norm("post_attention_layernorm")?))
    }
}

impl CausalLm for Decoder {
    fn lora_adapters(&self) -> Vec<&crate::nn::LoraAdapter> {
        let experts = self.layers.iter().flat_map(|layer| match &layer.mlp {
            FeedForward::Sparse(moe) => Some(moe.experts.lora_adapters()),
            FeedForward::Dense(_) => None,
        });
        self.linears()
            .into_iter()
            .flat_map(|linear| &linear.lora)
            .chain(experts.flatten())
            .collect()
    }

    fn vocab_size(&self) -> usize {
        self.info.vocab_size
    }

    fn max_context(&self) -> usize {
        self.info.max_context
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let capacity = capacity.min(self.info.max_context);
        // Every layer of one model caches the same shape.
        let (heads, dims) = self.layers[0].self_attn.cache_layout();
        KvCache::new(
            self.layers.len(),
            batch,
            heads,
            dims,
            capacity,
            &self.device(),
        )
    }

    fn forward_traced(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        mode: LogitsMode,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Tensor<3>, ModelError> {
        let mut x = self.hidden_traced(tokens, cache, trace)?;
        let [batch, seq, hidden] = x.dims();
        if mode == LogitsMode::Last && seq > 1 {
            x = x.slice([0..batch, seq - 1..seq, 0..hidden]);
        }
        Ok(self.head(x))
    }

    fn supports_ragged(&self) -> bool {
        self.layers
            .iter()
            .all(|layer| matches!(layer.self_attn, Mixer::Standard(_)))
    }

    fn forward_ragged(
        &self,
        tokens: &[u32],
        cache: &mut RaggedKvCache,
    ) -> Result<Tensor<2>, ModelError> {
        let rows = tokens.len();
        if rows == 0 {
            return Err(ModelError::EmptyInput);
        }
        if rows != cache.rows() {
            return Err(ModelError::BatchMismatch(rows, cache.rows()));
        }
        if !self.supports_ragged() {
            return Err(ModelError::RaggedUnsupported);
        }
        if !cache.has_room() {
            return Err(ModelError::ContextOverflow {
                requested: cache.lens().iter().max().map_or(0, |m| m + 1),
                capacity: cache.capacity(),
            });
        }
        let device = self.device();
        let rope = self.rope.tables_per_row(cache.lens(), &device);
        // One mask per distinct sliding window, shared by the layers that use it.
        let mut biases: Vec<(Option<usize>, Tensor<4>)> = Vec::new();
        let mut x = self.embed(token_tensor(tokens, rows, &device));
        for i in 0..self.layers.len() {
            let Mixer::Standard(attention) = &self.layers[i].self_attn else {
                unreachable!("checked by supports_ragged");
            };
            let window = attention.sliding_window();
            let bias = match biases.iter().find(|(w, _)| *w == window) {
                Some((_, bias)) => bias.clone(),
                None => {
                    let bias = cache.attention_bias(window, &device);
                    biases.push((window, bias.clone()));
                    bias
                }
            };
            x = self.run_layer_with(i, x, None, |_, h| {
                attention.forward_ragged(h, &rope, cache, i, bias)
            })?;
        }
        cache.advance();
        Ok(self.head(x).reshape([rows, self.info.vocab_size]))
    }

    fn device(&self) -> Device {
        self.norm.weight.val().device()
    }
}
