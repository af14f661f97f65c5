//! Llama (and Llama-shaped dense models such as SmolLM2): RMSNorm, RoPE, grouped-query
//! attention with a causal mask, SwiGLU MLP, tied or untied output head.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;

use crate::nn::{Embedding, Linear, RmsNorm, checked_data};
use crate::rope::{RopeParameters, RopeScaling, RotaryEmbedding};
use crate::{CausalLm, KvCache, LogitsMode, Metadata, ModelError, WeightSource};

/// `config.json` of a Llama-family model, as transformers writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Older configs: `rope_scaling` beside a top-level `rope_theta`.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Newer configs: one `rope_parameters` object holding `rope_theta` and the scaling.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn rope_source(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    pub fn rope_scaling(&self) -> Result<RopeScaling, ModelError> {
        self.rope_source()
            .map(|p| p.scaling())
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(ModelError::Config)
    }

    /// Checks the dimensions fit together before any weight is read.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |msg: String| Err(ModelError::Config(msg));
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 || self.hidden_size == 0 {
            return fail(
                "hidden_size, num_hidden_layers and num_attention_heads must be > 0".into(),
            );
        }
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return fail(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return fail(format!(
                "head_dim ({}) must be even and > 0",
                self.head_dim()
            ));
        }
        if let Some(act) = self.hidden_act.as_deref()
            && act != "silu"
        {
            return fail(format!(
                "hidden_act `{act}` is not supported (expected silu)"
            ));
        }
        self.rope_scaling().map(|_| ())
    }

    /// Builds the config from GGUF metadata of architecture `arch` (`llama`).
    pub fn from_gguf(
        meta: &dyn Metadata,
        arch: &str,
        vocab_size: usize,
    ) -> Result<Self, ModelError> {
        let int = |key: &str| {
            meta.get_u64(&format!("{arch}.{key}"))
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks `{arch}.{key}`")))
        };
        let float = |key: &str| meta.get_f64(&format!("{arch}.{key}"));
        let heads = int("attention.head_count")?;
        let hidden = int("embedding_length")?;
        let rope_scaling = match meta.get_str(&format!("{arch}.rope.scaling.type")) {
            Some("linear") => Some(RopeParameters {
                rope_type: Some("linear".into()),
                factor: float("rope.scaling.factor"),
                ..Default::default()
            }),
            _ => None,
        };
        Ok(Self {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv").ok(),
            head_dim: int("attention.key_length").ok(),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base"),
            rope_scaling,
            rope_parameters: None,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: None,
        })
    }
}

/// llama.cpp's name for an HF tensor name, for loading GGUF files.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, suffix) = tail.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RotaryEmbedding,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let start = cache.len();
        let split_heads = |t: Tensor<3>, heads: usize| {
            t.reshape([batch, seq, heads, self.head_dim])
                .swap_dims(1, 2)
        };
        let q = rope.apply(
            split_heads(self.q_proj.forward(x.clone()), self.heads),
            start,
        );
        let k = rope.apply(
            split_heads(self.k_proj.forward(x.clone()), self.kv_heads),
            start,
        );
        let v = split_heads(self.v_proj.forward(x), self.kv_heads);
        let (keys, values) = cache.append(layer, k, v);
        let context = grouped_attention(q, keys, values, start);
        let context = context
            .swap_dims(1, 2)
            .reshape([batch, seq, self.heads * self.head_dim]);
        self.o_proj.forward(context)
    }
}

/// Causal grouped-query attention without repeating keys: the `g` query heads that share a
/// key/value head are stacked along the sequence axis, so each KV head is read once.
/// `q`: `[b, heads, t, d]`, `keys`/`values`: `[b, kv_heads, s, d]`, query `i` at `start + i`.
fn grouped_attention(q: Tensor<4>, keys: Tensor<4>, values: Tensor<4>, start: usize) -> Tensor<4> {
    let [batch, heads, seq, head_dim] = q.dims();
    let [_, kv_heads, total, _] = keys.dims();
    let group = heads / kv_heads;
    let q = q.reshape([batch, kv_heads, group * seq, head_dim]);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut scores = q.matmul(keys.swap_dims(2, 3)).mul_scalar(scale);
    if seq > 1 {
        scores = scores + causal_bias(group, seq, start, total, &values.device());
    }
    let probs = softmax(scores, 3);
    probs.matmul(values).reshape([batch, heads, seq, head_dim])
}

/// Additive mask `[1, 1, group·seq, total]`: `-inf` where a key lies after its query.
fn causal_bias(group: usize, seq: usize, start: usize, total: usize, device: &Device) -> Tensor<4> {
    let mut bias = Vec::with_capacity(group * seq * total);
    for _ in 0..group {
        for query in 0..seq {
            bias.extend((0..total).map(|key| {
                if key > start + query {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
    }
    Tensor::from_data(TensorData::new(bias, [1, 1, group * seq, total]), device)
}

#[derive(Module, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

#[derive(Module, Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama decoder with its output head.
#[derive(Module, Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    #[module(skip)]
    rope: RotaryEmbedding,
    #[module(skip)]
    config: LlamaConfig,
}

impl Llama {
    /// Builds the model from HF-named weights; `progress` is called after each layer.
    pub fn load(
        config: &LlamaConfig,
        source: &dyn WeightSource,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let (hidden, heads, kv_heads, head_dim) = (
            config.hidden_size,
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        let eps = config.rms_norm_eps;
        let embed_name = "model.embed_tokens.weight";
        let embed = checked_data(source, embed_name, &[config.vocab_size, hidden])?;
        let lm_head = if !config.tie_word_embeddings && source.contains("lm_head.weight") {
            Linear::load(source, "lm_head", hidden, config.vocab_size, false, device)?
        } else {
            Linear::from_hf_weight(&embed, None, device)
        };
        let embed_tokens = Embedding {
            weight: Param::from_tensor(Tensor::from_data(embed, device)),
        };
        let total = config.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        for i in 0..total {
            let p = format!("model.layers.{i}");
            let linear = |name: &str, inp: usize, out: usize, bias: bool| {
                Linear::load(source, &format!("{p}.{name}"), inp, out, bias, device)
            };
            let attn_bias = config.attention_bias;
            let mlp_bias = config.mlp_bias;
            let inter = config.intermediate_size;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    source,
                    &format!("{p}.input_layernorm.weight"),
                    hidden,
                    eps,
                    device,
                )?,
                self_attn: Attention {
                    q_proj: linear("self_attn.q_proj", hidden, heads * head_dim, attn_bias)?,
                    k_proj: linear("self_attn.k_proj", hidden, kv_heads * head_dim, attn_bias)?,
                    v_proj: linear("self_attn.v_proj", hidden, kv_heads * head_dim, attn_bias)?,
                    o_proj: linear("self_attn.o_proj", heads * head_dim, hidden, attn_bias)?,
                    heads,
                    kv_heads,
                    head_dim,
                },
                post_attention_layernorm: RmsNorm::load(
                    source,
                    &format!("{p}.post_attention_layernorm.weight"),
                    hidden,
                    eps,
                    device,
                )?,
                mlp: Mlp {
                    gate_proj: linear("mlp.gate_proj", hidden, inter, mlp_bias)?,
                    up_proj: linear("mlp.up_proj", hidden, inter, mlp_bias)?,
                    down_proj: linear("mlp.down_proj", inter, hidden, mlp_bias)?,
                },
            });
            progress(i + 1, total);
        }
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(source, "model.norm.weight", hidden, eps, device)?,
            lm_head,
            rope: RotaryEmbedding::new(
                head_dim,
                config.max_position_embeddings,
                config.rope_theta(),
                &config.rope_scaling()?,
                device,
            ),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl CausalLm for Llama {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let capacity = capacity.min(self.rope.max_positions());
        KvCache::new(
            self.layers.len(),
            batch,
            self.config.kv_heads(),
            self.config.head_dim(),
            capacity,
            &self.device(),
        )
    }

    fn forward(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut KvCache,
        mode: LogitsMode,
    ) -> Result<Tensor<3>, ModelError> {
        let [batch, seq] = tokens.dims();
        let requested = cache.len() + seq;
        if requested > cache.capacity() {
            return Err(ModelError::ContextOverflow {
                requested,
                capacity: cache.capacity(),
            });
        }
        let mut x = self.embed_tokens.forward(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &self.rope,
                cache,
                i,
            );
            x = x + attn;
            x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
        }
        cache.advance(seq);
        if mode == LogitsMode::Last && seq > 1 {
            x = x.slice([0..batch, seq - 1..seq, 0..self.config.hidden_size]);
        }
        Ok(self.lm_head.forward(self.norm.forward(x)))
    }

    fn device(&self) -> Device {
        self.norm.weight.val().device()
    }
}
