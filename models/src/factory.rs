//! One call builds the right architecture from a `config.json` or a GGUF header.

use burn::tensor::Device;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};

use crate::decoder::Decoder;
use crate::deepseek::{self, DeepseekVersion};
use crate::llama::{Llama, LlamaConfig};
use crate::qwen_moe::{self, QwenMoeVariant};
use crate::{Metadata, ModelError, WeightSource, gpt_oss, mixtral, olmoe};

/// The architectures moera runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
}

/// transformers class names and `model_type`s of every supported architecture.
pub const SUPPORTED_ARCHITECTURES: &[(&str, &str, Architecture)] = &[
    ("LlamaForCausalLM", "llama", Architecture::Llama),
    ("Qwen2ForCausalLM", "qwen2", Architecture::Qwen2),
    ("Qwen3ForCausalLM", "qwen3", Architecture::Qwen3),
    ("MixtralForCausalLM", "mixtral", Architecture::Mixtral),
    ("Qwen2MoeForCausalLM", "qwen2_moe", Architecture::Qwen2Moe),
    ("Qwen3MoeForCausalLM", "qwen3_moe", Architecture::Qwen3Moe),
    ("OlmoeForCausalLM", "olmoe", Architecture::Olmoe),
    (
        "DeepseekV2ForCausalLM",
        "deepseek_v2",
        Architecture::DeepseekV2,
    ),
    (
        "DeepseekV3ForCausalLM",
        "deepseek_v3",
        Architecture::DeepseekV3,
    ),
    ("GptOssForCausalLM", "gpt_oss", Architecture::GptOss),
];

/// GGUF `general.architecture` values moera reads (`llama` covers Mixtral: llama.cpp stores
/// it as llama with experts).
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama", "qwen2moe", "qwen3moe"];

fn unsupported(name: &str, supported: Vec<&str>) -> ModelError {
    ModelError::UnsupportedArchitecture {
        name: name.to_string(),
        supported: supported.join(", "),
    }
}

fn parse<T: DeserializeOwned>(config: &Json) -> Result<T, ModelError> {
    serde_json::from_value(config.clone()).map_err(|e| ModelError::ConfigJson(e.to_string()))
}

impl Architecture {
    /// The architecture a `config.json` names in `architectures[0]` or else `model_type`.
    pub fn from_hf_config(config: &Json) -> Result<Self, ModelError> {
        let class = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Json::as_str);
        let model_type = config.get("model_type").and_then(Json::as_str);
        SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(c, t, _)| Some(*c) == class || (class.is_none() && Some(*t) == model_type))
            .map(|&(_, _, arch)| arch)
            .ok_or_else(|| {
                unsupported(
                    class.or(model_type).unwrap_or("(none)"),
                    SUPPORTED_ARCHITECTURES.iter().map(|(c, _, _)| *c).collect(),
                )
            })
    }

    /// An error for a GGUF `general.architecture` moera does not read.
    pub fn unsupported_gguf(name: &str) -> ModelError {
        unsupported(name, SUPPORTED_GGUF_ARCHITECTURES.to_vec())
    }

    /// transformers' `model_type` of the architecture.
    pub fn model_type(self) -> &'static str {
        SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(_, _, a)| *a == self)
            .map(|(_, t, _)| *t)
            .expect("every architecture is listed")
    }

    /// Builds the model a `config.json` describes from HF-named weights.
    pub fn load(
        self,
        config: &Json,
        source: &dyn WeightSource,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Decoder, ModelError> {
        match self {
            Architecture::Llama => {
                Llama::load(&parse::<LlamaConfig>(config)?, source, device, progress)
            }
            Architecture::Mixtral => mixtral::load(&parse(config)?, source, device, progress),
            Architecture::Qwen2 | Architecture::Qwen2Moe => qwen_moe::load(
                QwenMoeVariant::Qwen2,
                &parse(config)?,
                source,
                device,
                progress,
            ),
            Architecture::Qwen3 | Architecture::Qwen3Moe => qwen_moe::load(
                QwenMoeVariant::Qwen3,
                &parse(config)?,
                source,
                device,
                progress,
            ),
            Architecture::Olmoe => olmoe::load(&parse(config)?, source, device, progress),
            Architecture::DeepseekV2 => deepseek::load(
                DeepseekVersion::V2,
                &parse(config)?,
                source,
                device,
                progress,
            ),
            Architecture::DeepseekV3 => deepseek::load(
                DeepseekVersion::V3,
                &parse(config)?,
                source,
                device,
                progress,
            ),
            Architecture::GptOss => gpt_oss::load(&parse(config)?, source, device, progress),
        }
    }
}

/// The transformers `config.json` equivalent of a GGUF header, so GGUF files load through
/// the same code as HF folders. `has_tensor` asks whether the file holds a GGUF tensor.
pub fn hf_config_from_gguf(
    meta: &dyn Metadata,
    arch: &str,
    vocab_size: usize,
    has_tensor: &dyn Fn(&str) -> bool,
) -> Result<(Architecture, Json), ModelError> {
    if !SUPPORTED_GGUF_ARCHITECTURES.contains(&arch) {
        return Err(Architecture::unsupported_gguf(arch));
    }
    let int = |key: &str| meta.get_u64(&format!("{arch}.{key}")).map(|v| v as usize);
    let need = |key: &str| {
        int(key).ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks `{arch}.{key}`")))
    };
    let float = |key: &str| meta.get_f64(&format!("{arch}.{key}"));
    let layers = need("block_count")?;
    let mut config = json!({
        "vocab_size": vocab_size,
        "hidden_size": need("embedding_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": need("attention.head_count")?,
        "num_key_value_heads": int("attention.head_count_kv"),
        "head_dim": int("attention.key_length"),
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": float("rope.freq_base").unwrap_or(10_000.0),
        "max_position_embeddings": int("context_length").unwrap_or(2048),
        "intermediate_size": int("feed_forward_length").unwrap_or(0),
    });
    match meta.get_str(&format!("{arch}.rope.scaling.type")) {
        None | Some("none") => {}
        Some("linear") => {
            config["rope_scaling"] =
                json!({"rope_type": "linear", "factor": float("rope.scaling.factor")});
        }
        Some("yarn") => {
            config["rope_scaling"] = json!({
                "rope_type": "yarn",
                "factor": float("rope.scaling.factor"),
                "original_max_position_embeddings": int("rope.scaling.original_context_length"),
                "beta_fast": float("rope.scaling.yarn_beta_fast"),
                "beta_slow": float("rope.scaling.yarn_beta_slow"),
                "attention_factor": float("rope.scaling.yarn_attn_factor"),
            });
        }
        Some(other) => {
            return Err(ModelError::Config(format!(
                "GGUF rope scaling `{other}` is not supported (none, linear, yarn)"
            )));
        }
    }
    let experts = int("expert_count").unwrap_or(0);
    let top_k = int("expert_used_count").unwrap_or(0);
    let architecture = match arch {
        "llama" if experts == 0 => Architecture::Llama,
        "llama" => {
            config["num_local_experts"] = json!(experts);
            config["num_experts_per_tok"] = json!(top_k);
            Architecture::Mixtral
        }
        "qwen2moe" | "qwen3moe" => {
            config["num_experts"] = json!(experts);
            config["num_experts_per_tok"] = json!(top_k);
            // llama.cpp's fallbacks for files written before these keys existed.
            let dense_width = int("feed_forward_length").unwrap_or(0);
            let expert_width =
                int("expert_feed_forward_length").unwrap_or(dense_width / top_k.max(1));
            let has_shared =
                (0..layers).any(|i| has_tensor(&format!("blk.{i}.ffn_up_shexp.weight")));
            let shared_width = match int("expert_shared_feed_forward_length") {
                Some(width) => width,
                None if has_shared => dense_width,
                None => 0,
            };
            config["moe_intermediate_size"] = json!(expert_width);
            config["shared_expert_intermediate_size"] = json!(shared_width);
            // Layers without a router are dense.
            let dense: Vec<usize> = (0..layers)
                .filter(|i| !has_tensor(&format!("blk.{i}.ffn_gate_inp.weight")))
                .collect();
            config["mlp_only_layers"] = json!(dense);
            let biased = has_tensor("blk.0.attn_q.bias");
            if arch == "qwen2moe" {
                // llama.cpp never renormalizes Qwen2-MoE's top-k weights.
                config["norm_topk_prob"] = json!(false);
                config["qkv_bias"] = json!(biased);
                Architecture::Qwen2Moe
            } else {
                let normalize = meta
                    .get_u64(&format!("{arch}.expert_weights_norm"))
                    .map(|v| v != 0)
                    .unwrap_or(true);
                config["norm_topk_prob"] = json!(normalize);
                config["attention_bias"] = json!(biased);
                Architecture::Qwen3Moe
            }
        }
        other => return Err(Architecture::unsupported_gguf(other)),
    };
    Ok((architecture, config))
}

/// llama.cpp's name for an HF tensor name (the names are shared by the llama, qwen2moe
/// and qwen3moe GGUF architectures). Stacked experts use the names transformers gives
/// separate stacked tensors: `mlp.experts.{gate,up,down}_proj`.
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
    let tail = tail.replace("block_sparse_moe.", "mlp.");
    let stacked = match tail.as_str() {
        "mlp.experts.gate_proj" => Some("ffn_gate_exps.weight"),
        "mlp.experts.up_proj" => Some("ffn_up_exps.weight"),
        "mlp.experts.down_proj" => Some("ffn_down_exps.weight"),
        _ => None,
    };
    if let Some(name) = stacked {
        return Some(format!("blk.{layer}.{name}"));
    }
    let (module, suffix) = tail.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct Meta(HashMap<String, String>);

    impl Metadata for Meta {
        fn get_u64(&self, key: &str) -> Option<u64> {
            self.0.get(key)?.parse().ok()
        }
        fn get_f64(&self, key: &str) -> Option<f64> {
            self.0.get(key)?.parse().ok()
        }
        fn get_str(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
    }

    fn qwen2moe(extra: &[(&str, &str)]) -> Meta {
        let mut meta = Meta::default();
        for (k, v) in [
            ("block_count", "2"),
            ("embedding_length", "64"),
            ("attention.head_count", "4"),
            ("feed_forward_length", "128"),
            ("expert_count", "8"),
            ("expert_used_count", "2"),
        ]
        .iter()
        .chain(extra)
        {
            meta.0.insert(format!("qwen2moe.{k}"), v.to_string());
        }
        meta
    }

    #[test]
    fn gguf_keys_missing_from_older_files_fall_back_as_llama_cpp_does() {
        let has = |name: &str| name.contains("ffn_up_shexp") || name.contains("ffn_gate_inp");
        let (arch, config) = hf_config_from_gguf(&qwen2moe(&[]), "qwen2moe", 512, &has).unwrap();
        assert_eq!(arch, Architecture::Qwen2Moe);
        // n_ff_exp = n_ff / n_expert_used; n_ff_shexp = n_ff.
        assert_eq!(config["moe_intermediate_size"], 64);
        assert_eq!(config["shared_expert_intermediate_size"], 128);
        let none = |_: &str| false;
        let (_, config) = hf_config_from_gguf(&qwen2moe(&[]), "qwen2moe", 512, &none).unwrap();
        assert_eq!(config["shared_expert_intermediate_size"], 0);
    }

    #[test]
    fn gguf_yarn_becomes_rope_scaling_and_unknown_scaling_is_an_error() {
        let has = |_: &str| true;
        let meta = qwen2moe(&[
            ("rope.scaling.type", "yarn"),
            ("rope.scaling.factor", "4"),
            ("rope.scaling.original_context_length", "32768"),
        ]);
        let (_, config) = hf_config_from_gguf(&meta, "qwen2moe", 512, &has).unwrap();
        assert_eq!(config["rope_scaling"]["rope_type"], "yarn");
        assert_eq!(config["rope_scaling"]["factor"], 4.0);
        assert_eq!(
            config["rope_scaling"]["original_max_position_embeddings"],
            32768
        );
        let meta = qwen2moe(&[("rope.scaling.type", "longrope")]);
        let err = hf_config_from_gguf(&meta, "qwen2moe", 512, &has).unwrap_err();
        assert!(err.to_string().contains("longrope"), "{err}");
        let err = hf_config_from_gguf(&meta, "gemma3", 512, &has).unwrap_err();
        assert!(err.to_string().contains("qwen3moe"), "{err}");
    }
}
