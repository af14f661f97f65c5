//! Tiny random MoE checkpoints (one per architecture) against HF transformers: logits,
//! every MoE layer's expert choices and weights, greedy tokens, and cached decoding.

use moera::engine::{Device, Model};
use moera::models::LogitsMode;
use moera::models::nn::token_tensor;

use crate::common::*;

const LOGITS_TOLERANCE: f64 = 1e-4;
const ROUTER_WEIGHT_TOLERANCE: f64 = 1e-5;

pub const MOE_FIXTURES: &[&str] = &[
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-olmoe",
    "tiny-deepseek-v2",
    "tiny-deepseek-v3",
    "tiny-gpt-oss",
];

/// Every MoE layer's (expert id, weight) pairs per token equal transformers' as sets.
fn check_routing(name: &str, model: &Model, prompt: &[u32], reference: &Reference) {
    let (_, trace) = model.logits_with_routing(prompt).expect("forward");
    let mut expected_layers: Vec<usize> = reference
        .keys()
        .filter_map(|k| {
            k.strip_prefix("router.")?
                .strip_suffix(".ids")?
                .parse()
                .ok()
        })
        .collect();
    expected_layers.sort_unstable();
    let layers: Vec<usize> = trace.layers.keys().copied().collect();
    assert_eq!(layers, expected_layers, "{name}: MoE layers");
    for (layer, routing) in &trace.layers {
        let (shape, expected_ids) = &reference[&format!("router.{layer}.ids")];
        let expected_weights = &reference[&format!("router.{layer}.weights")].1;
        let expected_logits = &reference[&format!("router.{layer}.logits")].1;
        let diff = max_abs_diff(&routing.logits, expected_logits);
        assert!(
            diff < LOGITS_TOLERANCE,
            "{name} layer {layer}: router logits differ by {diff}"
        );
        let k = shape[1];
        assert_eq!(routing.top_k, k, "{name} layer {layer}: top-k");
        for token in 0..shape[0] {
            let pairs = |ids: &[u32], weights: &[f32]| {
                let mut p: Vec<(u32, f64)> = ids
                    .iter()
                    .zip(weights)
                    .map(|(&i, &w)| (i, w as f64))
                    .collect();
                p.sort_by_key(|&(i, _)| i);
                p
            };
            let ours = pairs(
                &routing.ids[token * k..(token + 1) * k],
                &routing.weights[token * k..(token + 1) * k],
            );
            let mut theirs: Vec<(u32, f64)> = (0..k)
                .map(|j| {
                    (
                        expected_ids[token * k + j] as u32,
                        expected_weights[token * k + j],
                    )
                })
                .collect();
            theirs.sort_by_key(|&(i, _)| i);
            let ids_ours: Vec<u32> = ours.iter().map(|p| p.0).collect();
            let ids_theirs: Vec<u32> = theirs.iter().map(|p| p.0).collect();
            assert_eq!(
                ids_ours, ids_theirs,
                "{name} layer {layer} token {token}: experts"
            );
            for ((_, w), (_, t)) in ours.iter().zip(&theirs) {
                assert!(
                    (w - t).abs() < ROUTER_WEIGHT_TOLERANCE,
                    "{name} layer {layer} token {token}: weight {w} vs {t}"
                );
            }
        }
    }
}

/// Logits of every prompt position, from a prefill of `prefill` tokens and then one token
/// at a time through the KV cache.
fn cached_logits(model: &Model, prompt: &[u32], prefill: usize) -> Vec<f32> {
    let lm = model.causal_lm();
    let device = lm.device();
    let mut cache = lm.new_cache(1, prompt.len());
    let mut logits = Vec::new();
    let first = lm
        .forward(
            token_tensor(&prompt[..prefill], 1, &device),
            &mut cache,
            LogitsMode::All,
        )
        .expect("prefill");
    logits.extend(first.into_data().try_into_vec::<f32>().unwrap());
    for &id in &prompt[prefill..] {
        let step = lm
            .forward(
                token_tensor(&[id], 1, &device),
                &mut cache,
                LogitsMode::Last,
            )
            .expect("decode step");
        logits.extend(step.into_data().try_into_vec::<f32>().unwrap());
    }
    logits
}

/// The prompt fed as a prefill of 5 then one token at a time through the KV cache gives
/// transformers' full-sequence logits.
fn check_cached_decode(name: &str, model: &Model, prompt: &[u32], expected: &[f64]) {
    let logits = cached_logits(model, prompt, 5);
    assert_eq!(logits.len(), prompt.len() * model.causal_lm().vocab_size());
    let diff = max_abs_diff(&logits, expected);
    assert!(
        diff < LOGITS_TOLERANCE,
        "{name}: cached decode differs by {diff}"
    );
}

pub fn check_moe_parity(name: &str, device: &Device) {
    let dir = fixtures().join(name);
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    let expected_logits = &reference["logits"].1;
    let model = load_on(&dir, device);

    let logits = model.logits(&prompt).expect("forward");
    let diff = max_abs_diff(&logits, expected_logits);
    assert!(diff < LOGITS_TOLERANCE, "{name}: logits differ by {diff}");
    check_routing(name, &model, &prompt, &reference);
    check_cached_decode(name, &model, &prompt, expected_logits);
    assert_eq!(
        greedy_ids(&model, &prompt, 16),
        ids(&reference["greedy_ids"].1),
        "{name}: greedy tokens"
    );
}

#[test]
fn mixtral_matches_transformers() {
    check_moe_parity("tiny-mixtral", &flex());
}

#[test]
fn qwen2_moe_with_gated_shared_expert_matches_transformers() {
    check_moe_parity("tiny-qwen2-moe", &flex());
}

#[test]
fn qwen3_moe_with_a_dense_layer_matches_transformers() {
    check_moe_parity("tiny-qwen3-moe", &flex());
}

#[test]
fn olmoe_matches_transformers() {
    check_moe_parity("tiny-olmoe", &flex());
}

#[test]
fn deepseek_v2_group_limited_greedy_matches_transformers() {
    check_moe_parity("tiny-deepseek-v2", &flex());
}

#[test]
fn deepseek_v3_with_yarn_and_old_config_keys_matches_transformers() {
    check_moe_parity("tiny-deepseek-v3", &flex());
}

#[test]
fn gpt_oss_with_sinks_and_sliding_window_matches_transformers() {
    check_moe_parity("tiny-gpt-oss", &flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn moe_architectures_match_transformers_on_wgpu() {
    let device = gpu();
    for name in MOE_FIXTURES.iter().chain(&["tiny-qwen2", "tiny-qwen3"]) {
        check_moe_parity(name, &device);
    }
}

/// GGUF files made by llama.cpp's converter from three of the checkpoints (f32 tensors,
/// llama.cpp names, Mixtral's Q/K permuted) give the same logits as transformers.
#[test]
fn moe_gguf_files_match_transformers() {
    for (gguf, folder, architecture) in [
        ("tiny-mixtral.gguf", "tiny-mixtral", "mixtral"),
        ("tiny-qwen2-moe.gguf", "tiny-qwen2-moe", "qwen2_moe"),
        ("tiny-qwen3-moe.gguf", "tiny-qwen3-moe", "qwen3_moe"),
    ] {
        let reference = reference(&fixtures().join(folder).join("reference.safetensors"));
        let prompt = ids(&reference["prompt_ids"].1);
        let model = load_on(&fixtures().join(gguf), &flex());
        assert_eq!(model.architecture(), architecture);
        let (logits, trace) = model.logits_with_routing(&prompt).expect("forward");
        let diff = max_abs_diff(&logits, &reference["logits"].1);
        assert!(diff < LOGITS_TOLERANCE, "{gguf}: logits differ by {diff}");
        check_routing(gguf, &model, &prompt, &reference);
        assert!(!trace.layers.is_empty());
    }
}

/// The quantized GGUFs (llama.cpp's own quantizer: experts in Q4_0 / Q4_1, other matrices
/// in those, Q8_0 or F16) give transformers' logits of their dequantized weights on
/// `device` within `tolerance`, on the current kernel path.
fn check_quantized_moe_ggufs(device: &Device, tolerance: f64) {
    for name in QUANTIZED_MOE_GGUFS {
        let reference = reference(&fixtures().join(format!("{name}_reference.safetensors")));
        let prompt = ids(&reference["prompt_ids"].1);
        let model = load_on(&fixtures().join(format!("{name}.gguf")), device);
        let logits = model.logits(&prompt).expect("forward");
        let diff = max_abs_diff(&logits, &reference["logits"].1);
        assert!(diff < tolerance, "{name}: logits differ by {diff}");
    }
}

const QUANTIZED_MOE_GGUFS: &[&str] = &["tiny-qwen2-moe-q4_0", "tiny-qwen3-moe-q4_1"];

/// On flex the reference path dequantizes exactly as transformers does; the CPU kernels
/// multiply one-row expert inputs with 8-bit activations, as llama.cpp does, which moves
/// logits of these random models (|logit| ≤ 8) by a few hundredths.
#[test]
fn quantized_moe_gguf_files_match_transformers() {
    use moera::kernels::{KernelPath, with_kernel_path};
    with_kernel_path(KernelPath::Reference, || {
        check_quantized_moe_ggufs(&flex(), LOGITS_TOLERANCE)
    });
    with_kernel_path(KernelPath::Fast, || check_quantized_moe_ggufs(&flex(), 0.1));
}

/// The GPU kernels decode the blocks in f32: transformers' logits within the f32 tolerance.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn quantized_moe_gguf_files_match_transformers_on_wgpu() {
    let device = gpu();
    check_quantized_moe_ggufs(&device, LOGITS_TOLERANCE);
}

/// In-situ int8 quantization covers the experts whatever their layout (per-expert linears
/// in tiny-mixtral and tiny-qwen2-moe): every linear weight and expert projection loads
/// quantized, and the logits equal those of transformers with the same weights quantized
/// per output channel in torch (`reference-int8.safetensors`).
fn check_in_situ_int8(device: &Device) {
    let options = || moera::engine::LoadOptions {
        quantization: moera::engine::Quantization::Int8,
        ..Default::default()
    };
    for name in ["tiny-mixtral", "tiny-qwen2-moe"] {
        let model = Model::load_with(fixtures().join(name), device, options(), &mut |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let memory = model.weight_memory();
        assert_eq!(memory.quantized, memory.matrices, "{name}: {memory}");
        assert!(
            memory.loaded_bytes * 3 < memory.f32_bytes,
            "{name}: {memory}"
        );
        let reference = reference(&fixtures().join(name).join("reference-int8.safetensors"));
        let prompt = ids(&reference["prompt_ids"].1);
        let logits = model.logits(&prompt).expect("forward");
        let diff = max_abs_diff(&logits, &reference["logits"].1);
        assert!(
            diff < LOGITS_TOLERANCE,
            "{name} int8: logits differ by {diff}"
        );
    }
}

#[test]
fn in_situ_int8_quantizes_the_experts_as_torch_does() {
    check_in_situ_int8(&flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn in_situ_int8_quantizes_the_experts_as_torch_does_on_wgpu() {
    let device = gpu();
    check_in_situ_int8(&device);
}

/// Experts stored as transformers 5 holds them in memory and some checkpoints ship them:
/// `experts.gate_up_proj` `[E, 2I, H]` (each expert's gate rows, then its up rows) and
/// `experts.down_proj` `[E, H, I]` — built here from the per-expert tensors exactly as
/// transformers' loader merges them — give transformers' logits.
#[test]
fn fused_expert_tensors_match_transformers() {
    let dir = scratch();
    let model_dir = copy_fixture("tiny-qwen2-moe", dir.path());
    let path = model_dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.data().to_vec())))
        .collect();
    let (experts, hidden, inter) = (8, 64, 32);
    let mut take = |name: String| tensors.remove(&name).unwrap_or_else(|| panic!("{name}")).1;
    let mut fused = Vec::new();
    for layer in 0..2 {
        let p = format!("model.layers.{layer}.mlp.experts");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..experts {
            gate_up.extend(take(format!("{p}.{e}.gate_proj.weight")));
            gate_up.extend(take(format!("{p}.{e}.up_proj.weight")));
            down.extend(take(format!("{p}.{e}.down_proj.weight")));
        }
        fused.push((
            format!("{p}.gate_up_proj"),
            vec![experts, 2 * inter, hidden],
            gate_up,
        ));
        fused.push((format!("{p}.down_proj"), vec![experts, hidden, inter], down));
    }
    assert!(!tensors.keys().any(|k| k.contains(".experts.")));
    let all: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, (shape, data))| (name, shape, data))
        .chain(fused)
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = all
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();

    let reference = reference(
        &fixtures()
            .join("tiny-qwen2-moe")
            .join("reference.safetensors"),
    );
    let prompt = ids(&reference["prompt_ids"].1);
    let model = load_on(&model_dir, &flex());
    let logits = model.logits(&prompt).expect("forward");
    let diff = max_abs_diff(&logits, &reference["logits"].1);
    assert!(
        diff < LOGITS_TOLERANCE,
        "fused experts: logits differ by {diff}"
    );
}

#[test]
fn dense_qwen2_with_a_sliding_layer_matches_transformers() {
    // The dense models the Qwen MoE code extends: q/k/v biases, a window of 4 on layer 2.
    check_moe_parity("tiny-qwen2", &flex());
}

#[test]
fn dense_qwen3_with_tied_head_matches_transformers() {
    check_moe_parity("tiny-qwen3", &flex());
}

/// Every MoE fixture (and the GGUFs, f32 and quantized), prefilled (grouped GEMM) then
/// decoded a token at a time (GEMV), gives the same logits and expert choices with the
/// kernels as with the reference path.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn moe_fixtures_match_the_reference_path_with_kernels_on_wgpu() {
    use moera::kernels::{KernelPath, with_kernel_path};

    let device = gpu();
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 200).collect();
    let run = |model: &Model| -> (Vec<f32>, Vec<(usize, Vec<u32>)>) {
        let (mut logits, trace) = model.logits_with_routing(&prompt).expect("forward");
        logits.extend(cached_logits(model, &prompt, 6));
        let choices = trace.layers.into_iter().map(|(l, r)| (l, r.ids)).collect();
        (logits, choices)
    };
    let quantized = QUANTIZED_MOE_GGUFS
        .iter()
        .map(|name| format!("{name}.gguf"));
    let names = MOE_FIXTURES
        .iter()
        .map(|name| name.to_string())
        .chain(["tiny-qwen2-moe.gguf".to_string()])
        .chain(quantized);
    for name in names {
        let model = Model::load_on(fixtures().join(&name), &device, &mut |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (fast_logits, fast_choices) = with_kernel_path(KernelPath::Fast, || run(&model));
        let (reference_logits, reference_choices) =
            with_kernel_path(KernelPath::Reference, || run(&model));
        assert!(!fast_choices.is_empty(), "{name}: no MoE layer traced");
        assert_eq!(fast_choices, reference_choices, "{name}: expert choices");
        let diff = fast_logits
            .iter()
            .zip(&reference_logits)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}
