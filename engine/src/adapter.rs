//! LoRA adapters in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
//! with keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use moera_models::nn::LoraWeights;
use moera_models::{LinearWeight, ModelError, WeightSource};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::safetensors_source::SafetensorsWeights;

/// The fields of `adapter_config.json` moera reads.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// A list of module names, or one regular expression over module paths.
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
}

fn lora() -> String {
    "LORA".into()
}

impl AdapterConfig {
    /// The factor of `B·A`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        let divisor = if self.use_rslora { r.sqrt() } else { r };
        (self.lora_alpha / divisor) as f32
    }
}

/// A PEFT LoRA adapter read from its folder.
pub struct PeftAdapter {
    dir: PathBuf,
    pub config: AdapterConfig,
    weights: SafetensorsWeights,
    /// Keys the model asked for (the rest are reported as not matching the base model).
    used: RefCell<BTreeSet<String>>,
}

/// PEFT's prefix of every key.
const KEY_PREFIX: &str = "base_model.model.";

impl PeftAdapter {
    /// Opens `dir/adapter_config.json` and `dir/adapter_model.safetensors`, rejecting what
    /// moera does not run (other PEFT methods, DoRA, per-module ranks or alphas, extra
    /// trained modules).
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let invalid = |reason: String| Error::Adapter {
            path: config_path.clone(),
            reason,
        };
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if !config.peft_type.eq_ignore_ascii_case("lora") {
            return Err(invalid(format!(
                "PEFT type {} (moera runs LORA adapters)",
                config.peft_type
            )));
        }
        if config.use_dora {
            return Err(invalid("DoRA adapters are not supported".into()));
        }
        if config.r == 0 {
            return Err(invalid("rank r is 0".into()));
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return Err(invalid(
                "per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported".into(),
            ));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(invalid(
                "modules_to_save (fully trained extra modules) are not supported".into(),
            ));
        }
        let weights = SafetensorsWeights::open_files(&[dir.join("adapter_model.safetensors")])?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// The factors for linear layer `prefix` (HF module path), if the adapter has them.
    fn lora(&self, prefix: &str) -> std::result::Result<Option<LoraWeights>, ModelError> {
        let key = |factor: &str| format!("{KEY_PREFIX}{prefix}.{factor}.weight");
        let (a, b) = (key("lora_A"), key("lora_B"));
        if !self.weights.contains(&a) && !self.weights.contains(&b) {
            return Ok(None);
        }
        let weights = LoraWeights {
            a: self.weights.tensor(&a)?,
            b: self.weights.tensor(&b)?,
            scale: self.config.scale(),
        };
        self.used.borrow_mut().extend([a, b]);
        Ok(Some(weights))
    }

    /// Fails when some of the adapter's tensors were not asked for by the model: the
    /// adapter was trained on another base model (or targets modules moera does not adapt).
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<&str> = self
            .weights
            .names()
            .filter(|n| !used.contains(*n))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(3).copied().collect();
        Err(Error::Adapter {
            path: self.dir.clone(),
            reason: format!(
                "{} tensors match no layer of the model (e.g. {}); was it trained on {}?",
                unused.len(),
                shown.join(", "),
                self.config
                    .base_model_name_or_path
                    .as_deref()
                    .unwrap_or("another base model")
            ),
        })
    }
}

/// A weight source with an adapter's LoRA factors on top.
pub(crate) struct Adapted<'a> {
    pub inner: &'a dyn WeightSource,
    pub adapter: Option<&'a PeftAdapter>,
}

impl WeightSource for Adapted<'_> {
    fn tensor(&self, name: &str) -> std::result::Result<TensorData, ModelError> {
        self.inner.tensor(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn linear_weight(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> std::result::Result<LinearWeight, ModelError> {
        self.inner.linear_weight(name, out_features, in_features)
    }

    fn expert_weight(
        &self,
        name: &str,
        shape: [usize; 3],
    ) -> std::result::Result<LinearWeight, ModelError> {
        self.inner.expert_weight(name, shape)
    }

    fn lora(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
    ) -> std::result::Result<Option<LoraWeights>, ModelError> {
        match self.adapter {
            Some(adapter) => adapter.lora(prefix),
            None => self.inner.lora(prefix, in_features, out_features),
        }
    }
}

/// Writes `adapters` (with `config`'s rank and alpha) as a PEFT adapter folder.
pub(crate) fn save(
    dir: &Path,
    config: &AdapterConfig,
    adapters: &[&moera_models::nn::LoraAdapter],
    base_model: &Path,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = Vec::new();
    let mut targets = BTreeSet::new();
    for adapter in adapters {
        for (factor, param) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            // moera holds `[in, r]` / `[r, out]`; PEFT stores the transposes.
            let value = param.val().transpose();
            let shape = value.dims().to_vec();
            let values = value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| Error::InvalidArgument(format!("{e:?}")))?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let key = format!("{KEY_PREFIX}{}.{factor}.weight", adapter.path);
            tensors.push((key, shape, bytes));
        }
        if let Some(module) = adapter.path.rsplit('.').next() {
            targets.insert(module.to_string());
        }
    }
    let views = tensors
        .iter()
        .map(|(key, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (key.as_str(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let weights_path = dir.join("adapter_model.safetensors");
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(&weights_path, bytes).map_err(io(&weights_path))?;
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "target_modules": targets,
        "base_model_name_or_path": config
            .base_model_name_or_path
            .clone()
            .unwrap_or_else(|| base_model.display().to_string()),
    });
    let config_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Config {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&config_path, text).map_err(io(&config_path))?;
    Ok(())
}
