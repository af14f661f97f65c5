//! Tiny random Llama checkpoints against the logits and greedy tokens of HF transformers.

use moera::engine::{Device, GenerationRequest, SamplingParams, TokenEvent};

use crate::common::*;

/// f32 agreement with transformers' eager attention (same math, different summation order).
const LOGITS_TOLERANCE: f64 = 1e-4;

fn check_parity(name: &str, device: &Device) {
    let dir = fixtures().join(name);
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    let (logits_shape, expected_logits) = &reference["logits"];
    let model = load_on(&dir, device);

    let logits = model.logits(&prompt).expect("forward");
    assert_eq!(logits.len(), logits_shape.iter().product::<usize>());
    let diff = max_abs_diff(&logits, expected_logits);
    assert!(diff < LOGITS_TOLERANCE, "{name}: logits differ by {diff}");

    let request = GenerationRequest::ids(prompt)
        .max_tokens(16)
        .sampling(SamplingParams::greedy());
    let generated: Vec<u32> = model
        .generate(&request)
        .expect("generate")
        .filter_map(|e| match e.expect("event") {
            TokenEvent::Token { id, .. } => Some(id),
            TokenEvent::Done { .. } => None,
        })
        .collect();
    assert_eq!(
        generated,
        ids(&reference["greedy_ids"].1),
        "{name}: greedy tokens"
    );
}

#[test]
fn tiny_llama_matches_transformers_on_flex() {
    check_parity("tiny-llama", &flex());
}

#[test]
fn tiny_llama_with_llama3_rope_and_tied_head_matches_transformers() {
    // Old-style config keys (rope_theta + rope_scaling) and no lm_head.weight in the file.
    check_parity("tiny-llama-llama3", &flex());
}

#[test]
fn tiny_llama_with_linear_rope_matches_transformers() {
    check_parity("tiny-llama-linear", &flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn tiny_llama_matches_transformers_on_wgpu() {
    let device = moera::engine::DeviceKind::Wgpu
        .device()
        .expect("wgpu device");
    for name in ["tiny-llama", "tiny-llama-llama3"] {
        check_parity(name, &device);
    }
}
