//! Tiny random Llama checkpoints against the logits and greedy tokens of HF transformers.

use moera::engine::Device;

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

    let generated = greedy_ids(&model, &prompt, 16);
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

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn tiny_llama_matches_transformers_on_wgpu() {
    let device = gpu();
    for name in ["tiny-llama", "tiny-llama-llama3"] {
        check_parity(name, &device);
    }
}

#[test]
fn bf16_weights_in_shards_match_transformers() {
    // model.safetensors.index.json over two bf16 shards; transformers' reference is its f32
    // forward over the same bf16-rounded weights.
    let dir = fixtures().join("tiny-llama-bf16-sharded");
    let reference = reference(&dir.join("reference.safetensors"));
    let model = load_on(&dir, &flex());
    let logits = model.logits(&ids(&reference["prompt_ids"].1)).unwrap();
    let diff = max_abs_diff(&logits, &reference["logits"].1);
    assert!(diff < LOGITS_TOLERANCE, "logits differ by {diff}");
}

#[test]
fn hf_folder_tokenizer_and_chat_template_match_transformers() {
    // tiny-llama weights beside SmolLM2's tokenizer.json, tokenizer_config.json and
    // chat_template.jinja as transformers saves them; the ids are transformers' own.
    let dir = scratch();
    let folder = copy_fixture("tiny-llama", dir.path());
    for entry in std::fs::read_dir(fixtures().join("smollm2-tokenizer")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), folder.join(entry.file_name())).unwrap();
    }
    let model = load_on(&folder, &flex());
    let reference_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    for sample in reference_json["tokenizer"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(sample["ids"].clone()).unwrap();
        assert_eq!(
            model.encode(text, false).unwrap(),
            expected,
            "ids of {text:?}"
        );
    }
    let chat_ids =
        ids(&reference(&fixtures().join("smollm2_reference.safetensors"))["chat_prompt_ids"].1);
    let messages = [moera::engine::ChatMessage::user(
        "What is the capital of France?",
    )];
    let prompt = model.apply_chat_template(&messages, true).unwrap();
    assert_eq!(model.encode(&prompt, false).unwrap(), chat_ids);
}
