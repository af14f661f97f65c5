//! Mixture-of-experts: the router (top-k gating in every variant the supported models use),
//! experts stored stacked `[E, ...]`, and the reference sparse dispatch in plain burn ops.
//!
//! The dispatch computes only the selected experts: token rows are sorted by expert, each
//! expert's MLP runs on its own rows, and the weighted results are scatter-added back.
//! It is the path every backend runs today and the oracle for fused kernels.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use moera_kernels::moe::StackedExperts;
pub use moera_kernels::moe::{ExpertActivation, ExpertMatrix, RoutingMethod};
use moera_kernels::{QuantLinear, QuantizedMatrix};

use crate::nn::{
    GatedMlp, Linear, LoraAdapter, active_lora, check_dims, checked_data, f32_values, load_checked,
    transformers_module_path, transpose_into,
};
use crate::{LinearWeight, ModelError, WeightSource};

/// The routing of one MoE layer for a batch of token rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub num_experts: usize,
    pub top_k: usize,
    /// Router logits `[tokens, num_experts]` (before softmax/sigmoid), row-major.
    pub logits: Vec<f32>,
    /// Chosen experts `[tokens, top_k]`, best first.
    pub ids: Vec<u32>,
    /// Weights applied to the chosen experts' outputs `[tokens, top_k]`.
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.ids.len() / self.top_k.max(1)
    }

    /// How many token slots each expert received.
    pub fn expert_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_experts];
        for &id in &self.ids {
            counts[id as usize] += 1;
        }
        counts
    }
}

/// Settings of a router besides its weights.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub method: RoutingMethod,
    /// Multiplies the final weights (`routed_scaling_factor`).
    pub scale: f32,
    /// A bias on the router logits (GPT-OSS).
    pub bias: bool,
}

impl RouterSpec {
    /// softmax → top-k (renormalized if `normalize`), no bias, no scaling: the router of
    /// Mixtral, the Qwen MoE models and OLMoE.
    pub fn softmax_top_k(num_experts: usize, top_k: usize, normalize: bool) -> Self {
        Self {
            num_experts,
            top_k,
            method: RoutingMethod::SoftmaxTopK { normalize },
            scale: 1.0,
            bias: false,
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |msg: String| Err(ModelError::Config(msg));
        if self.num_experts == 0 || self.top_k == 0 {
            return fail("the number of experts and experts per token must be > 0".into());
        }
        if self.top_k > self.num_experts {
            return fail(format!(
                "num_experts_per_tok ({}) exceeds the number of experts ({})",
                self.top_k, self.num_experts
            ));
        }
        let groups = match &self.method {
            RoutingMethod::SoftmaxGroupLimited { groups } => *groups,
            RoutingMethod::SigmoidGroupLimited {
                groups,
                correction_bias,
                ..
            } => {
                if correction_bias.len() != self.num_experts {
                    return fail(format!(
                        "e_score_correction_bias has {} entries for {} experts",
                        correction_bias.len(),
                        self.num_experts
                    ));
                }
                Some(*groups)
            }
            _ => None,
        };
        if let Some((n_group, topk_group)) = groups {
            let per_group = self.num_experts / n_group.max(1);
            if n_group == 0
                || !self.num_experts.is_multiple_of(n_group)
                || topk_group == 0
                || topk_group > n_group
                || topk_group * per_group < self.top_k
            {
                return fail(format!(
                    "n_group ({n_group}) and topk_group ({topk_group}) do not fit {} experts \
                     with {} per token",
                    self.num_experts, self.top_k
                ));
            }
        }
        Ok(())
    }
}

/// The gating network: a linear map to one logit per expert, then [`RoutingMethod`].
#[derive(Module, Debug)]
pub struct Router {
    gate: Linear,
    #[module(skip)]
    spec: RouterSpec,
    /// DeepSeek-V3's correction bias on the device, for the routing kernel.
    #[module(skip)]
    correction_bias: Option<Tensor<1>>,
}

/// Indices of the `k` largest values, best first (ties: the lower index).
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k);
    order
}

fn softmax_in_place(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in values.iter_mut() {
        *v /= sum;
    }
}

/// Keeps the scores of the `keep` best groups (ranked by `group_score`) and replaces the
/// others with `fill`.
fn limit_to_groups(
    scores: &[f32],
    groups: usize,
    keep: usize,
    group_score: impl Fn(&[f32]) -> f32,
    fill: f32,
) -> Vec<f32> {
    let per_group = scores.len() / groups;
    let ranked: Vec<f32> = scores.chunks(per_group).map(group_score).collect();
    let chosen = top_k_indices(&ranked, keep);
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if chosen.contains(&(i / per_group)) {
                s
            } else {
                fill
            }
        })
        .collect()
}

impl RouterSpec {
    /// Chooses experts and weights for one token from its router logits.
    pub fn route_token(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let k = self.top_k;
        let (ids, mut weights) = match &self.method {
            RoutingMethod::SoftmaxTopK { normalize } => {
                let mut probs = logits.to_vec();
                softmax_in_place(&mut probs);
                let ids = top_k_indices(&probs, k);
                let mut weights: Vec<f32> = ids.iter().map(|&i| probs[i]).collect();
                if *normalize {
                    let sum: f32 = weights.iter().sum();
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                (ids, weights)
            }
            RoutingMethod::SoftmaxGroupLimited { groups } => {
                let mut probs = logits.to_vec();
                softmax_in_place(&mut probs);
                let eligible = match groups {
                    Some((n_group, keep)) => limit_to_groups(
                        &probs,
                        *n_group,
                        *keep,
                        |g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                        0.0,
                    ),
                    None => probs,
                };
                let ids = top_k_indices(&eligible, k);
                let weights = ids.iter().map(|&i| eligible[i]).collect();
                (ids, weights)
            }
            RoutingMethod::SigmoidGroupLimited {
                groups: (n_group, keep),
                normalize,
                correction_bias,
            } => {
                let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
                let biased: Vec<f32> = scores
                    .iter()
                    .zip(correction_bias)
                    .map(|(s, b)| s + b)
                    .collect();
                let top_two_sum = |g: &[f32]| top_k_indices(g, 2).iter().map(|&i| g[i]).sum();
                let eligible =
                    limit_to_groups(&biased, *n_group, *keep, top_two_sum, f32::NEG_INFINITY);
                let ids = top_k_indices(&eligible, k);
                let mut weights: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
                if *normalize {
                    let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                (ids, weights)
            }
            RoutingMethod::TopKSoftmax => {
                let ids = top_k_indices(logits, k);
                let mut weights: Vec<f32> = ids.iter().map(|&i| logits[i]).collect();
                softmax_in_place(&mut weights);
                (ids, weights)
            }
        };
        if self.scale != 1.0 {
            weights.iter_mut().for_each(|w| *w *= self.scale);
        }
        (ids, weights)
    }
}

impl Router {
    /// Loads `{prefix}.weight` `[experts, hidden]` (and `{prefix}.bias` if the spec has one).
    /// A different number of rows than the config's experts is an
    /// [`ModelError::ExpertCount`] naming the tensor.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        spec: RouterSpec,
        device: &Device,
    ) -> Result<Self, ModelError> {
        spec.validate()?;
        let name = format!("{prefix}.weight");
        let weight = source.tensor(&name)?;
        let shape = weight.shape().as_slice().to_vec();
        if shape.len() == 2 && shape[1] == hidden && shape[0] != spec.num_experts {
            return Err(ModelError::ExpertCount {
                name,
                config: spec.num_experts,
                found: shape[0],
            });
        }
        let weight = checked_data(source, &name, &[spec.num_experts, hidden])?;
        let bias = if spec.bias {
            let b = load_checked(
                source,
                &format!("{prefix}.bias"),
                [spec.num_experts],
                device,
            )?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        let correction_bias = match &spec.method {
            RoutingMethod::SigmoidGroupLimited {
                correction_bias, ..
            } => Some(Tensor::from_data(correction_bias.as_slice(), device)),
            _ => None,
        };
        let mut gate = Linear::from_hf_weight(&weight, bias, device);
        // transformers' routers hold a bare `weight` parameter (not a linear module): PEFT
        // adapts it through `target_parameters`.
        let shape = [1, spec.num_experts, hidden];
        let module = transformers_module_path(prefix);
        for (key_path, lora) in source.parameter_lora(&module, "weight", &["weight"], shape)? {
            let path = format!("{module}.weight");
            let adapter = LoraAdapter::for_parameter(&key_path, &path, lora, shape, device)?;
            gate.lora.push(adapter);
        }
        Ok(Self {
            gate,
            spec,
            correction_bias,
        })
    }

    pub fn spec(&self) -> &RouterSpec {
        &self.spec
    }

    /// Router logits `[tokens, experts]` of token rows `x` `[tokens, hidden]`.
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.gate.forward(x)
    }

    /// Routes token rows `x` `[tokens, hidden]` on the host (the reference router).
    pub fn route(&self, x: Tensor<2>) -> Result<Routing, ModelError> {
        self.route_logits(self.logits(x))
    }

    /// Routes router logits on the host, one token at a time with
    /// [`RouterSpec::route_token`].
    pub fn route_logits(&self, logits: Tensor<2>) -> Result<Routing, ModelError> {
        let logits = f32_values(logits.into_data(), "router logits")?;
        let experts = self.spec.num_experts;
        let tokens = logits.len() / experts;
        let mut ids = Vec::with_capacity(tokens * self.spec.top_k);
        let mut weights = Vec::with_capacity(tokens * self.spec.top_k);
        for row in logits.chunks_exact(experts) {
            let (row_ids, row_weights) = self.spec.route_token(row);
            ids.extend(row_ids.into_iter().map(|i| i as u32));
            weights.extend(row_weights);
        }
        Ok(Routing {
            num_experts: experts,
            top_k: self.spec.top_k,
            logits,
            ids,
            weights,
        })
    }

    /// The weights of the experts `ids` (`[tokens · top_k]`, as routed) as tensor ops on
    /// `logits` `[tokens, experts]`: [`RouterSpec::route_token`]'s weights, differentiable.
    pub fn weights_of(&self, logits: Tensor<2>, ids: &[u32]) -> Tensor<1> {
        let [tokens, _] = logits.dims();
        let k = self.spec.top_k;
        let device = logits.device();
        let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [tokens, k]), &device);
        let normalized = |w: Tensor<2>, epsilon: f32| {
            let sum = w.clone().sum_dim(1).add_scalar(epsilon);
            w / sum
        };
        let weights = match &self.spec.method {
            RoutingMethod::SoftmaxTopK { normalize } => {
                let w = softmax(logits, 1).gather(1, ids);
                if *normalize { normalized(w, 0.0) } else { w }
            }
            RoutingMethod::SoftmaxGroupLimited { .. } => softmax(logits, 1).gather(1, ids),
            RoutingMethod::SigmoidGroupLimited { normalize, .. } => {
                let w = sigmoid(logits).gather(1, ids);
                if *normalize { normalized(w, 1e-20) } else { w }
            }
            RoutingMethod::TopKSoftmax => softmax(logits.gather(1, ids), 1),
        };
        weights.mul_scalar(self.spec.scale).reshape([tokens * k])
    }

    /// Routes router logits with the fused kernel, leaving ids and weights on the device;
    /// `None` where the kernel does not run (see [`moera_kernels::moe::fused_on`]).
    pub fn route_on_device(&self, logits: Tensor<2>) -> Option<(Tensor<2, Int>, Tensor<2>)> {
        moera_kernels::moe::route(
            logits,
            &self.spec.method,
            self.spec.top_k,
            self.spec.scale,
            self.correction_bias.as_ref(),
        )
    }
}

impl Routing {
    /// The ids (as i32) and weights `[tokens, top_k]` on `device`, as the fused dispatch
    /// takes them.
    pub fn to_device(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let shape = [self.tokens(), self.top_k];
        let ids: Vec<i32> = self.ids.iter().map(|&i| i as i32).collect();
        (
            Tensor::from_data(TensorData::new(ids, shape), device),
            Tensor::from_data(TensorData::new(self.weights.clone(), shape), device),
        )
    }

    /// Reads a routing computed on the device back to the host.
    pub fn from_device(
        logits: Tensor<2>,
        ids: Tensor<2, Int>,
        weights: Tensor<2>,
    ) -> Result<Self, ModelError> {
        let [_, num_experts] = logits.dims();
        let [_, top_k] = ids.dims();
        let ids = ids
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| ModelError::Weights {
                name: "expert ids".into(),
                reason: format!("{e:?}"),
            })?;
        Ok(Self {
            num_experts,
            top_k,
            logits: f32_values(logits.into_data(), "router logits")?,
            ids: ids.into_iter().map(|i| i as u32).collect(),
            weights: f32_values(weights.into_data(), "router weights")?,
        })
    }
}

/// How a checkpoint stores the experts of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// Per-expert linears `experts.N.{gate,up,down}` (with these module names: `gate_proj`/
    /// `up_proj`/`down_proj`, or Mixtral's `w1`/`w3`/`w2`), or transformers' fused
    /// `experts.gate_up_proj` `[E, 2I, H]` (gate rows first) and `experts.down_proj`
    /// `[E, H, I]`, or stacked `experts.{gate,up}_proj` `[E, I, H]` (GGUF files).
    Linear {
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// GPT-OSS: `experts.gate_up_proj` `[E, H, 2I]` with gate/up interleaved by column,
    /// `experts.down_proj` `[E, I, H]`, each with a bias.
    InterleavedWithBias,
}

impl ExpertLayout {
    pub const HF: Self = Self::Linear {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
    pub const MIXTRAL: Self = Self::Linear {
        gate: "w1",
        up: "w3",
        down: "w2",
    };
}

/// The routed experts of one layer, stacked so one kernel can take them all (see
/// [`ExpertMatrix`] for the two layouts).
#[derive(Module, Debug)]
pub struct Experts {
    gate_up: ExpertProjection,
    gate_up_bias: Option<Param<Tensor<2>>>,
    down: ExpertProjection,
    down_bias: Option<Param<Tensor<2>>>,
    /// LoRA on the stacked weights (PEFT's `target_parameters`
    /// `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`).
    gate_up_lora: Vec<LoraAdapter>,
    down_lora: Vec<LoraAdapter>,
    /// `[E, H, I]`.
    #[module(skip)]
    shape: [usize; 3],
    #[module(skip)]
    activation: ExpertActivation,
}

/// The experts' stacked parameters in transformers' declaration order, which PEFT's
/// nesting of parameter adapters (and so their keys) follows.
pub const EXPERT_PARAMETERS: [&str; 2] = ["gate_up_proj", "down_proj"];

/// One projection of every expert: f32 parameters `[E, in, out]`, or quantized codes
/// `[E·out, in]` that the kernels decode where they read them (frozen in training).
#[derive(Module, Debug)]
pub struct ExpertProjection {
    weight: Option<Param<Tensor<3>>>,
    #[module(skip)]
    quantized: Option<QuantLinear>,
}

impl ExpertProjection {
    fn dense(values: Vec<f32>, shape: [usize; 3], device: &Device) -> Self {
        let weight = Tensor::from_data(TensorData::new(values, shape), device);
        Self {
            weight: Some(Param::from_tensor(weight)),
            quantized: None,
        }
    }

    fn quantized(matrix: QuantizedMatrix, device: &Device) -> Self {
        Self {
            weight: None,
            quantized: Some(QuantLinear::new(matrix, device)),
        }
    }

    /// The stacked matrix the kernels and the reference read.
    pub fn matrix(&self) -> ExpertMatrix {
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => ExpertMatrix::Dense(weight.val()),
            (None, Some(quantized)) => ExpertMatrix::Quantized(quantized.clone()),
            (None, None) => unreachable!("an expert projection has dense or quantized weights"),
        }
    }

    /// Whether the weights are held quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }
}

/// Rows of `2·inter` interleaved columns (gate, up, gate, up, ...) written to `dst` as
/// `[gate × inter | up × inter]` rows (GPT-OSS's fused layout to ours).
fn split_interleaved(src: &[f32], dst: &mut [f32], inter: usize) {
    for (dst, src) in dst
        .chunks_exact_mut(2 * inter)
        .zip(src.chunks_exact(2 * inter))
    {
        for j in 0..inter {
            dst[j] = src[2 * j];
            dst[inter + j] = src[2 * j + 1];
        }
    }
}

/// Checks the shape of a stacked tensor `[experts, ...]` named `name`, reporting a
/// different expert count as [`ModelError::ExpertCount`] and any other difference as
/// [`ModelError::ShapeMismatch`].
pub fn check_stacked_shape(
    name: &str,
    found: &[usize],
    expected: &[usize],
) -> Result<(), ModelError> {
    if found.len() == expected.len() && found[1..] == expected[1..] && found[0] != expected[0] {
        return Err(ModelError::ExpertCount {
            name: name.to_string(),
            config: expected[0],
            found: found[0],
        });
    }
    check_dims(name, found, expected)
}

/// [`check_stacked_shape`] on data read as `name`.
pub(crate) fn check_stacked(
    name: &str,
    data: TensorData,
    expected: &[usize],
) -> Result<TensorData, ModelError> {
    check_stacked_shape(name, data.shape().as_slice(), expected)?;
    Ok(data)
}

/// Reads a stacked f32 tensor whose first dimension counts experts (see [`check_stacked`]).
fn stacked(
    source: &dyn WeightSource,
    name: &str,
    expected: &[usize],
) -> Result<Vec<f32>, ModelError> {
    f32_values(check_stacked(name, source.tensor(name)?, expected)?, name)
}

/// A projection of `experts` experts `[out, in]` each as a source handed it over: f32
/// `[E, out, in]` values, or quantized `[E·out, in]` codes.
enum Stacked {
    Dense(Vec<f32>),
    Quantized(QuantizedMatrix),
}

impl Stacked {
    fn from_weight(weight: LinearWeight, name: &str) -> Result<Self, ModelError> {
        Ok(match weight {
            LinearWeight::Dense(data) => Self::Dense(f32_values(data, name)?),
            LinearWeight::Quantized(matrix) => Self::Quantized(matrix),
        })
    }

    /// Every expert's weights one after the other (per-expert linears), quantized if all
    /// of them are in one format.
    fn concat(parts: Vec<LinearWeight>, name: &str) -> Result<Self, ModelError> {
        let matrices: Vec<&QuantizedMatrix> = parts
            .iter()
            .filter_map(|p| match p {
                LinearWeight::Quantized(m) => Some(m),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        if matrices.len() == parts.len()
            && let Ok(matrix) = QuantizedMatrix::stack_rows(&matrices)
        {
            return Ok(Self::Quantized(matrix));
        }
        let mut values = Vec::new();
        for part in parts {
            values.extend(Self::from_weight(part, name)?.into_values());
        }
        Ok(Self::Dense(values))
    }

    fn into_values(self) -> Vec<f32> {
        match self {
            Self::Dense(values) => values,
            Self::Quantized(matrix) => matrix.dequantize(),
        }
    }

    /// `[E, out, in]` (HF layout) to the f32 layout `[E, in, out]`.
    fn transposed(self, [experts, out, input]: [usize; 3]) -> Vec<f32> {
        let values = self.into_values();
        let mut transposed = vec![0f32; values.len()];
        for e in 0..experts {
            let block = e * out * input..(e + 1) * out * input;
            transpose_into(&values[block.clone()], input, &mut transposed[block], out);
        }
        transposed
    }
}

impl Experts {
    /// Loads the `experts` of `{prefix}` (e.g. `model.layers.3.mlp`) in any layout
    /// [`ExpertLayout`] describes, checking there are exactly `experts` of them. Weights a
    /// source hands over quantized (GGUF blocks, in-situ quantization) stay quantized when
    /// both gate and up are.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        layout: ExpertLayout,
        shape @ [experts, hidden, inter]: [usize; 3],
        activation: ExpertActivation,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (gate, up, down) = match layout {
            ExpertLayout::InterleavedWithBias => {
                let name = format!("{prefix}.experts.gate_up_proj");
                let fused = stacked(source, &name, &[experts, hidden, 2 * inter])?;
                // Column 2j is gate j, column 2j+1 is up j.
                let mut gate_up = vec![0f32; fused.len()];
                split_interleaved(&fused, &mut gate_up, inter);
                let name = format!("{prefix}.experts.down_proj");
                let down = stacked(source, &name, &[experts, inter, hidden])?;
                let name = format!("{prefix}.experts.gate_up_proj_bias");
                let fused_bias = stacked(source, &name, &[experts, 2 * inter])?;
                let mut gate_up_bias = vec![0f32; experts * 2 * inter];
                split_interleaved(&fused_bias, &mut gate_up_bias, inter);
                let name = format!("{prefix}.experts.down_proj_bias");
                let down_bias = stacked(source, &name, &[experts, hidden])?;
                let module = transformers_module_path(&format!("{prefix}.experts"));
                let shapes = [[experts, 2 * inter, hidden], [experts, hidden, inter]];
                for (parameter, shape) in EXPERT_PARAMETERS.into_iter().zip(shapes) {
                    if !source
                        .parameter_lora(&module, parameter, &EXPERT_PARAMETERS, shape)?
                        .is_empty()
                    {
                        return Err(ModelError::Weights {
                            name: format!("{module}.{parameter}"),
                            reason: "LoRA on interleaved (GPT-OSS) experts is not supported".into(),
                        });
                    }
                }
                return Self::from_stacked(
                    shape,
                    gate_up,
                    down,
                    Some((gate_up_bias, down_bias)),
                    activation,
                    device,
                );
            }
            ExpertLayout::Linear {
                gate: gate_name,
                up: up_name,
                down: down_name,
            } => {
                let fused = format!("{prefix}.experts.gate_up_proj");
                let separate = format!("{prefix}.experts.gate_proj");
                let down = format!("{prefix}.experts.down_proj");
                let stacked = |name: &str, shape: [usize; 3]| {
                    Stacked::from_weight(source.expert_weight(name, shape)?, name)
                };
                if source.contains(&fused) {
                    let gate_up = stacked(&fused, [experts, 2 * inter, hidden])?;
                    (gate_up, None, stacked(&down, [experts, hidden, inter])?)
                } else if source.contains(&separate) {
                    let up = format!("{prefix}.experts.up_proj");
                    (
                        stacked(&separate, [experts, inter, hidden])?,
                        Some(stacked(&up, [experts, inter, hidden])?),
                        stacked(&down, [experts, hidden, inter])?,
                    )
                } else {
                    // One linear per expert; a tensor for expert `experts` means the
                    // checkpoint has more experts than the config says.
                    let name =
                        |e: usize, module: &str| format!("{prefix}.experts.{e}.{module}.weight");
                    if source.contains(&name(experts, gate_name)) {
                        let found = (experts..)
                            .take_while(|&e| source.contains(&name(e, gate_name)))
                            .count()
                            + experts;
                        return Err(ModelError::ExpertCount {
                            name: name(experts, gate_name),
                            config: experts,
                            found,
                        });
                    }
                    let all = |module: &str, out: usize, input: usize| {
                        let parts = (0..experts)
                            .map(|e| source.linear_weight(&name(e, module), out, input))
                            .collect::<Result<Vec<_>, _>>()?;
                        Stacked::concat(parts, &name(0, module))
                    };
                    (
                        all(gate_name, inter, hidden)?,
                        Some(all(up_name, inter, hidden)?),
                        all(down_name, hidden, inter)?,
                    )
                }
            }
        };
        let gate_up = match (gate, up) {
            // Fused `[E, 2I, H]`: each expert's gate rows, then its up rows, as the kernels
            // read them.
            (Stacked::Quantized(gate_up), None) => ExpertProjection::quantized(gate_up, device),
            (Stacked::Quantized(gate), Some(Stacked::Quantized(up)))
                if let Ok(both) = QuantizedMatrix::stack_rows(&[&gate, &up]) =>
            {
                // Rows of expert e: its gate rows (block e of the first half), then its up
                // rows (block e of the second half).
                let order: Vec<usize> = (0..experts)
                    .flat_map(|e| {
                        let gate = e * inter..(e + 1) * inter;
                        let up = (experts + e) * inter..(experts + e + 1) * inter;
                        gate.chain(up)
                    })
                    .collect();
                ExpertProjection::quantized(both.permute_rows(&order), device)
            }
            (gate, up) => {
                let values = match up {
                    None => gate.into_values(),
                    Some(up) => {
                        let (gate, up) = (gate.into_values(), up.into_values());
                        let block = inter * hidden;
                        (0..experts)
                            .flat_map(|e| {
                                let rows = e * block..(e + 1) * block;
                                gate[rows.clone()].iter().chain(&up[rows]).copied()
                            })
                            .collect()
                    }
                };
                let shape = [experts, 2 * inter, hidden];
                let values = Stacked::Dense(values).transposed(shape);
                ExpertProjection::dense(values, [experts, hidden, 2 * inter], device)
            }
        };
        let down = match down {
            Stacked::Quantized(down) => ExpertProjection::quantized(down, device),
            dense => {
                let values = dense.transposed([experts, hidden, inter]);
                ExpertProjection::dense(values, [experts, inter, hidden], device)
            }
        };
        let module = transformers_module_path(&format!("{prefix}.experts"));
        let lora = |parameter: &str, shape: [usize; 3]| {
            source
                .parameter_lora(&module, parameter, &EXPERT_PARAMETERS, shape)?
                .into_iter()
                .map(|(key_path, weights)| {
                    let path = format!("{module}.{parameter}");
                    LoraAdapter::for_parameter(&key_path, &path, weights, shape, device)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            gate_up,
            gate_up_bias: None,
            down,
            down_bias: None,
            gate_up_lora: lora("gate_up_proj", [experts, 2 * inter, hidden])?,
            down_lora: lora("down_proj", [experts, hidden, inter])?,
            shape,
            activation,
        })
    }

    /// Builds experts from host data already in the stacked `[E, H, 2I]` / `[E, I, H]`
    /// layout, with optional biases `[E, 2I]` / `[E, H]`.
    pub fn from_stacked(
        shape @ [experts, hidden, inter]: [usize; 3],
        gate_up: Vec<f32>,
        down: Vec<f32>,
        biases: Option<(Vec<f32>, Vec<f32>)>,
        activation: ExpertActivation,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tensor2 = |v: Vec<f32>, shape: [usize; 2]| {
            Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), device))
        };
        let (gate_up_bias, down_bias) = match biases {
            Some((gu, d)) => (
                Some(tensor2(gu, [experts, 2 * inter])),
                Some(tensor2(d, [experts, hidden])),
            ),
            None => (None, None),
        };
        Ok(Self {
            gate_up: ExpertProjection::dense(gate_up, [experts, hidden, 2 * inter], device),
            gate_up_bias,
            down: ExpertProjection::dense(down, [experts, inter, hidden], device),
            down_bias,
            gate_up_lora: Vec::new(),
            down_lora: Vec::new(),
            shape,
            activation,
        })
    }

    /// Builds experts from quantized matrices in the kernels' layout: `gate_up`
    /// `[E·2I, H]` (each expert's gate rows, then its up rows) and `down` `[E·H, I]`.
    pub fn from_quantized(
        shape @ [experts, hidden, inter]: [usize; 3],
        gate_up: QuantizedMatrix,
        down: QuantizedMatrix,
        activation: ExpertActivation,
        device: &Device,
    ) -> Result<Self, ModelError> {
        for (name, matrix, rows, cols) in [
            ("gate_up", &gate_up, experts * 2 * inter, hidden),
            ("down", &down, experts * hidden, inter),
        ] {
            let found = [matrix.rows, matrix.cols];
            check_dims(&format!("experts.{name}"), &found, &[rows, cols])?;
        }
        Ok(Self {
            gate_up: ExpertProjection::quantized(gate_up, device),
            gate_up_bias: None,
            down: ExpertProjection::quantized(down, device),
            down_bias: None,
            gate_up_lora: Vec::new(),
            down_lora: Vec::new(),
            shape,
            activation,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.shape[0]
    }

    /// Whether gate/up and down are held quantized.
    pub fn is_quantized(&self) -> [bool; 2] {
        [self.gate_up.is_quantized(), self.down.is_quantized()]
    }

    /// The LoRA adapters on the stacked weights.
    pub fn lora_adapters(&self) -> impl Iterator<Item = &LoraAdapter> {
        self.gate_up_lora.iter().chain(&self.down_lora)
    }

    /// Folds the adapters into f32 weights (`W_e + s·A_e·B_e`) and drops them; quantized
    /// weights with an adapter are refused.
    pub fn merge_lora(&mut self) -> Result<(), ModelError> {
        for (projection, adapters) in [
            (&mut self.gate_up, std::mem::take(&mut self.gate_up_lora)),
            (&mut self.down, std::mem::take(&mut self.down_lora)),
        ] {
            for lora in adapters {
                let Some(weight) = &mut projection.weight else {
                    return Err(crate::nn::unmergeable(&lora));
                };
                *weight = Param::from_tensor(weight.val() + lora.stacked_delta());
            }
        }
        Ok(())
    }

    /// Expert `e`'s MLP on its token rows `[rows, H]`.
    fn expert_forward(&self, e: usize, rows: Tensor<2>) -> Tensor<2> {
        let [_, hidden, inter] = self.shape;
        let update =
            active_lora(&self.gate_up_lora).map(|lora| lora.expert_forward(e, rows.clone()));
        let mut h = self.gate_up.matrix().forward_expert(e, rows, 2 * inter);
        if let Some(update) = update {
            h = h + update;
        }
        if let Some(bias) = &self.gate_up_bias {
            h = h + bias.val().narrow(0, e, 1);
        }
        let gate = h.clone().narrow(1, 0, inter);
        let up = h.narrow(1, inter, inter);
        let activated = match self.activation {
            ExpertActivation::SwiGlu => moera_kernels::swiglu(gate, up),
            ExpertActivation::ClampedSwiGlu { alpha, limit } => {
                let gate = gate.clamp_max(limit);
                let up = up.clamp(-limit, limit);
                let glu = gate.clone() * sigmoid(gate.mul_scalar(alpha));
                up.add_scalar(1.0) * glu
            }
        };
        let update =
            active_lora(&self.down_lora).map(|lora| lora.expert_forward(e, activated.clone()));
        let mut out = self.down.matrix().forward_expert(e, activated, hidden);
        if let Some(update) = update {
            out = out + update;
        }
        if let Some(bias) = &self.down_bias {
            out = out + bias.val().narrow(0, e, 1);
        }
        out
    }

    /// The fused sparse dispatch on the device (see [`moera_kernels::moe::dispatch`]), from
    /// routing ids and weights `[tokens, top_k]`; `None` where the kernels do not run.
    pub fn forward_fused(
        &self,
        x: Tensor<2>,
        ids: Tensor<2, Int>,
        weights: Tensor<2>,
    ) -> Option<Tensor<2>> {
        // The kernels read the stacked weights alone.
        if active_lora(&self.gate_up_lora).is_some() || active_lora(&self.down_lora).is_some() {
            return None;
        }
        let stacked = StackedExperts {
            gate_up: self.gate_up.matrix(),
            gate_up_bias: self.gate_up_bias.as_ref().map(Param::val),
            down: self.down.matrix(),
            down_bias: self.down_bias.as_ref().map(Param::val),
            activation: self.activation,
        };
        moera_kernels::moe::dispatch(x, ids, weights, &stacked)
    }

    /// The reference sparse dispatch: rows of `x` `[tokens, H]` grouped by chosen expert,
    /// each expert run once on its rows, results weighted and scatter-added per token.
    pub fn forward_sparse(&self, x: Tensor<2>, routing: &Routing) -> Tensor<2> {
        let device = x.device();
        self.dispatch_sorted(x, routing, |order| {
            let weights = order.iter().map(|&slot| routing.weights[slot]).collect();
            Tensor::from_data(TensorData::new(weights, [order.len()]), &device)
        })
    }

    /// [`Experts::forward_sparse`] with the routing weights given as a tensor `[tokens ·
    /// top_k]` (slot order), so that training carries gradients back to the router.
    pub fn forward_sparse_weighted(
        &self,
        x: Tensor<2>,
        routing: &Routing,
        weights: Tensor<1>,
    ) -> Tensor<2> {
        let device = x.device();
        self.dispatch_sorted(x, routing, |order| {
            let order: Vec<i64> = order.iter().map(|&slot| slot as i64).collect();
            let count = order.len();
            let order = Tensor::<1, Int>::from_data(TensorData::new(order, [count]), &device);
            weights.select(0, order)
        })
    }

    /// The sparse dispatch, with `slot_weights(order)` giving the routing weight of each
    /// slot in `order` (slots sorted by expert, then token) as a `[count]` tensor.
    fn dispatch_sorted(
        &self,
        x: Tensor<2>,
        routing: &Routing,
        slot_weights: impl FnOnce(&[usize]) -> Tensor<1>,
    ) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let device = x.device();
        // (expert, token, slot), sorted so each expert's rows are contiguous.
        let mut slots: Vec<(u32, usize, usize)> = routing
            .ids
            .iter()
            .enumerate()
            .map(|(slot, &e)| (e, slot / routing.top_k, slot))
            .collect();
        slots.sort_by_key(|&(e, token, _)| (e, token));
        let count = slots.len();
        if count == 0 {
            return Tensor::zeros([tokens, hidden], &device);
        }
        let order: Vec<i64> = slots.iter().map(|&(_, t, _)| t as i64).collect();
        let order = Tensor::<1, Int>::from_data(TensorData::new(order, [count]), &device);
        let rows = x.select(0, order.clone());
        let mut outputs = Vec::new();
        let mut start = 0;
        while start < count {
            let expert = slots[start].0;
            let end = start + slots[start..].iter().take_while(|s| s.0 == expert).count();
            outputs.push(
                self.expert_forward(expert as usize, rows.clone().narrow(0, start, end - start)),
            );
            start = end;
        }
        let slot_order: Vec<usize> = slots.iter().map(|&(_, _, slot)| slot).collect();
        let weights = slot_weights(&slot_order).reshape([count, 1]);
        let weighted = Tensor::cat(outputs, 0) * weights;
        Tensor::zeros([tokens, hidden], &device).select_assign(
            0,
            order,
            weighted,
            IndexingUpdateOp::Add,
        )
    }

    /// The baseline the sparse dispatch is measured against: every expert on every row,
    /// unselected experts weighted by zero. Same result, `E/k` times the work.
    pub fn forward_dense(&self, x: Tensor<2>, routing: &Routing) -> Tensor<2> {
        let [tokens, _] = x.dims();
        let experts = self.num_experts();
        let device = x.device();
        let mut dense = vec![0f32; tokens * experts];
        for (slot, (&e, &w)) in routing.ids.iter().zip(&routing.weights).enumerate() {
            dense[(slot / routing.top_k) * experts + e as usize] += w;
        }
        let dense = Tensor::<2>::from_data(TensorData::new(dense, [tokens, experts]), &device);
        (0..experts)
            .map(|e| self.expert_forward(e, x.clone()) * dense.clone().narrow(1, e, 1))
            .reduce(|a, b| a + b)
            .expect("at least one expert")
    }
}

/// How a layer's experts are stored and computed (their count comes from the router).
#[derive(Debug, Clone, Copy)]
pub struct ExpertSpec {
    pub layout: ExpertLayout,
    pub hidden: usize,
    pub intermediate: usize,
    pub activation: ExpertActivation,
}

/// An MoE feed-forward block: router, routed experts, and optional shared experts (with
/// Qwen2-MoE's sigmoid gate on them).
#[derive(Module, Debug)]
pub struct SparseMoe {
    pub router: Router,
    pub experts: Experts,
    pub shared: Option<GatedMlp>,
    pub shared_gate: Option<Linear>,
}

impl SparseMoe {
    /// Folds the adapters on the router and the experts' stacked weights into them.
    pub fn merge_lora(&mut self) -> Result<(), ModelError> {
        self.router.gate.merge_lora()?;
        self.experts.merge_lora()
    }

    /// The router's linear map, the shared experts' linear layers and their gate (the
    /// routed experts are stacked).
    pub fn linears(&self) -> Vec<&Linear> {
        let shared = self.shared.iter().flat_map(GatedMlp::linears);
        std::iter::once(&self.router.gate)
            .chain(shared)
            .chain(&self.shared_gate)
            .collect()
    }

    /// Loads the router `{prefix}.{router}` and the experts of `{prefix}`, without shared
    /// experts.
    pub fn load(
        source: &dyn WeightSource,
        prefix: &str,
        router: &str,
        spec: RouterSpec,
        experts: ExpertSpec,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let ExpertSpec {
            layout,
            hidden,
            intermediate: inter,
            activation,
        } = experts;
        let experts = spec.num_experts;
        Ok(Self {
            router: Router::load(source, &format!("{prefix}.{router}"), hidden, spec, device)?,
            experts: Experts::load(
                source,
                prefix,
                layout,
                [experts, hidden, inter],
                activation,
                device,
            )?,
            shared: None,
            shared_gate: None,
        })
    }

    /// Runs the block on `x` `[batch, seq, H]`, returning the output and, if `record`, the
    /// routing. On cube devices routing and experts run as fused kernels with no host
    /// round trip (the routing is read back only when recorded); elsewhere the reference
    /// router and sparse dispatch run.
    pub fn forward(
        &self,
        x: Tensor<3>,
        record: bool,
    ) -> Result<(Tensor<3>, Option<Routing>), ModelError> {
        let [batch, seq, hidden] = x.dims();
        let rows = x.reshape([batch * seq, hidden]);
        let logits = self.router.logits(rows.clone());
        let fused = self
            .router
            .route_on_device(logits.clone())
            .and_then(|(ids, weights)| {
                let out = self
                    .experts
                    .forward_fused(rows.clone(), ids.clone(), weights.clone())?;
                Some((out, ids, weights))
            });
        let (mut out, routing) = match fused {
            Some((out, ids, weights)) => {
                let routing = if record {
                    Some(Routing::from_device(logits, ids, weights)?)
                } else {
                    None
                };
                (out, routing)
            }
            None if logits.is_autodiff() => {
                // Training: the weights are recomputed from the logits with tensor ops so
                // the router gets gradients (the choice of experts has none).
                let routing = self.router.route_logits(logits.clone())?;
                let weights = self.router.weights_of(logits, &routing.ids);
                let out = self
                    .experts
                    .forward_sparse_weighted(rows.clone(), &routing, weights);
                (out, record.then_some(routing))
            }
            None => {
                let routing = self.router.route_logits(logits)?;
                let out = self.experts.forward_sparse(rows.clone(), &routing);
                (out, record.then_some(routing))
            }
        };
        if let Some(shared) = &self.shared {
            let mut shared_out = shared.forward(rows.clone());
            if let Some(gate) = &self.shared_gate {
                shared_out = shared_out * sigmoid(gate.forward(rows));
            }
            out = out + shared_out;
        }
        Ok((out.reshape([batch, seq, hidden]), routing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(method: RoutingMethod, experts: usize, top_k: usize) -> RouterSpec {
        RouterSpec {
            num_experts: experts,
            top_k,
            method,
            scale: 1.0,
            bias: false,
        }
    }

    #[test]
    fn group_limited_routing_only_picks_from_the_best_groups() {
        // Four groups of two; groups 2 and 3 hold the best single scores but group 0 holds
        // the best pair sum under the DeepSeek-V3 rule.
        let logits = [2.0, 1.9, -5.0, 2.5, -5.0, 2.4, -5.0, -5.0];
        let s = spec(
            RoutingMethod::SigmoidGroupLimited {
                groups: (4, 1),
                normalize: true,
                correction_bias: vec![0.0; 8],
            },
            8,
            2,
        );
        let (ids, weights) = s.route_token(&logits);
        assert_eq!(ids, vec![0, 1]);
        assert!((weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // The V2 rule ranks groups by their best score instead: group 1 (2.5).
        let s = spec(
            RoutingMethod::SoftmaxGroupLimited {
                groups: Some((4, 1)),
            },
            8,
            2,
        );
        let (ids, _) = s.route_token(&logits);
        assert_eq!(ids, vec![3, 2]);
    }

    #[test]
    fn router_spec_rejects_top_k_above_the_expert_count() {
        let s = spec(RoutingMethod::SoftmaxTopK { normalize: true }, 4, 5);
        assert!(matches!(s.validate(), Err(ModelError::Config(m)) if m.contains("exceeds")));
    }

    #[test]
    fn sparse_dispatch_equals_running_every_expert() {
        let device = Device::flex();
        let [experts, hidden, inter, tokens, top_k] = [6, 8, 5, 7, 2];
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                        / 500.0
                        - 1.0
                })
                .collect()
        };
        let experts_module = Experts::from_stacked(
            [experts, hidden, inter],
            values(experts * hidden * 2 * inter, 1),
            values(experts * inter * hidden, 2),
            Some((values(experts * 2 * inter, 3), values(experts * hidden, 4))),
            ExpertActivation::ClampedSwiGlu {
                alpha: 1.702,
                limit: 0.5,
            },
            &device,
        )
        .unwrap();
        let x = Tensor::<2>::from_data(
            TensorData::new(values(tokens * hidden, 5), [tokens, hidden]),
            &device,
        );
        let logits = values(tokens * experts, 6);
        let s = spec(
            RoutingMethod::SoftmaxTopK { normalize: false },
            experts,
            top_k,
        );
        let mut ids = vec![];
        let mut weights = vec![];
        for row in logits.chunks(experts) {
            let (i, w) = s.route_token(row);
            ids.extend(i.into_iter().map(|i| i as u32));
            weights.extend(w);
        }
        let routing = Routing {
            num_experts: experts,
            top_k,
            logits,
            ids,
            weights,
        };
        let sparse = experts_module
            .forward_sparse(x.clone(), &routing)
            .into_data();
        let dense = experts_module.forward_dense(x, &routing).into_data();
        sparse.assert_approx_eq::<f32>(&dense, burn::tensor::Tolerance::absolute(1e-5));
    }
}
