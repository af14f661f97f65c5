//! SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers, which loads the same GGUF and
//! dequantizes it to f32. Skipped with a note when the model was not fetched.

use std::sync::OnceLock;

use moera::engine::gguf::GgufFile;
use moera::engine::{ChatMessage, GenerationRequest, LoadOptions, Model, Quantization};

use crate::common::*;

fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| smollm2_path().map(|path| load_on(&path, &flex())))
        .as_ref()
}

/// The same file with every weight dequantized to f32 at load (`--quant none`).
fn dequantized_model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            smollm2_path().map(|path| {
                let options = LoadOptions {
                    quantization: Quantization::None,
                    ..Default::default()
                };
                Model::load_with(&path, &flex(), options, &mut |_| {}).unwrap()
            })
        })
        .as_ref()
}

fn reference_json() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn prompt_logits_and_greedy_continuation_match_transformers() {
    let Some(model) = model() else { return };
    let reference = reference(&fixtures().join("smollm2_reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    // The GGUF says add_bos_token = false: the prompt is the text's tokens alone.
    assert_eq!(
        model.encode("The capital of France is", true).unwrap(),
        prompt
    );

    let logits = model.logits(&prompt).unwrap();
    let expected = &reference["prompt_logits"].1;
    let diff = max_abs_diff(&logits, expected);
    let mean = logits
        .iter()
        .zip(expected)
        .map(|(&a, b)| (a as f64 - b).abs())
        .sum::<f64>()
        / logits.len() as f64;
    // Same dequantized f32 weights, same math; only the summation order differs (gemm
    // blocking, 30 layers, logits of magnitude ~20): 1e-3 leaves room for that and nothing
    // else (a wrong norm, rope or permutation moves logits by whole units).
    assert!(diff < 1e-3, "max logit difference {diff} (mean {mean})");

    let generated = greedy_ids(model, &prompt, 10);
    let expected = ids(&reference["greedy_ids"].1);
    assert_eq!(&generated[..5], &expected[..5], "first five greedy tokens");
    assert_eq!(generated, expected, "all ten greedy tokens");
}

#[test]
fn chat_template_prompt_matches_transformers_and_answers_paris() {
    let Some(model) = model() else { return };
    let reference = reference(&fixtures().join("smollm2_reference.safetensors"));
    let messages = vec![ChatMessage::user("What is the capital of France?")];
    let prompt = moera::engine::Prompt::Chat(messages.clone());
    assert_eq!(
        model.prompt_ids(&prompt).unwrap(),
        ids(&reference["chat_prompt_ids"].1),
        "chat prompt tokens"
    );
    let (answer, _) = model
        .generate_text(&GenerationRequest::chat(messages).max_tokens(24))
        .unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    assert_eq!(
        answer.trim(),
        reference_json()["chat_answer"].as_str().unwrap().trim()
    );
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let Some(model) = model() else { return };
    for sample in reference_json()["tokenizer"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(sample["ids"].clone()).unwrap();
        let ids = model.encode(text, false).unwrap();
        assert_eq!(ids, expected, "ids of {text:?}");
        assert_eq!(
            model.decode(&ids, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn perplexity_matches_transformers() {
    let Some(model) = model() else { return };
    let reference = &reference_json()["perplexity"];
    let text = std::fs::read_to_string(fixtures().join("english.txt")).unwrap();
    let ids = model.encode(&text, true).unwrap();
    assert_eq!(ids.len() as u64, reference["tokens"].as_u64().unwrap());
    let ctx = reference["ctx"].as_u64().unwrap() as usize;
    let report = model.perplexity(&ids, ctx).unwrap();
    let expected = reference["perplexity"].as_f64().unwrap();
    let relative = (report.perplexity - expected).abs() / expected;
    assert!(
        relative < 0.005,
        "perplexity {} vs {expected}",
        report.perplexity
    );
    assert_eq!(
        report.tokens_scored as u64,
        reference["scored"].as_u64().unwrap()
    );
}

#[test]
fn real_tensors_dequantize_like_the_gguf_package() {
    let Some(path) = smollm2_path() else { return };
    let file = GgufFile::open(path).unwrap();
    let reference = reference(&fixtures().join("smollm2_reference.safetensors"));
    for name in [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
    ] {
        let expected = &reference[&format!("dequant/{name}")].1;
        let values = file.dequantize(name).unwrap();
        let diff = max_abs_diff(&values[..expected.len()], expected);
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn greedy_continuation_matches_transformers_on_wgpu() {
    let Some(path) = smollm2_path() else { return };
    let device = gpu();
    let model = load_on(&path, &device);
    let reference = reference(&fixtures().join("smollm2_reference.safetensors"));
    let prompt = ids(&reference["prompt_ids"].1);
    let logits = model.logits(&prompt).unwrap();
    let diff = max_abs_diff(&logits, &reference["prompt_logits"].1);
    eprintln!("wgpu max logit difference: {diff}");
    assert!(diff < 1e-3, "max logit difference {diff}");
    let generated = greedy_ids(&model, &prompt, 10);
    assert_eq!(generated, ids(&reference["greedy_ids"].1));

    // That was the quantized path (the GGUF blocks on the dequant-matmul kernels); its
    // perplexity stays within 0.5% of the dequantized path's on flex.
    assert!(model.weight_memory().quantized > 0);
    let Some(dequantized) = dequantized_model() else {
        return;
    };
    let text = std::fs::read_to_string(fixtures().join("english.txt")).unwrap();
    let ids = model.encode(&text, true).unwrap();
    let ids = &ids[..ids.len().min(257)];
    let q = model.perplexity(ids, 256).unwrap().perplexity;
    let f = dequantized.perplexity(ids, 256).unwrap().perplexity;
    assert!(
        (q - f).abs() / f < 0.005,
        "perplexity {q} on wgpu vs {f} dequantized"
    );
}

#[test]
fn quantized_path_matches_the_dequantized_path() {
    let (Some(quantized), Some(dequantized)) = (model(), dequantized_model()) else {
        return;
    };
    // The default keeps the GGUF blocks: every projection and the tied head run on the
    // dequant-matmul kernel; `none` holds them all in f32.
    let memory = quantized.weight_memory();
    assert_eq!(memory.quantized, memory.matrices, "{memory}");
    assert!(memory.loaded_bytes * 4 < memory.f32_bytes, "{memory}");
    assert_eq!(dequantized.weight_memory().quantized, 0);

    let prompt = quantized.encode("The capital of France is", true).unwrap();
    assert_eq!(
        greedy_ids(quantized, &prompt, 16),
        greedy_ids(dequantized, &prompt, 16),
        "greedy tokens"
    );
    let text = std::fs::read_to_string(fixtures().join("english.txt")).unwrap();
    let ids = quantized.encode(&text, true).unwrap();
    let q = quantized.perplexity(&ids, 256).unwrap().perplexity;
    let f = dequantized.perplexity(&ids, 256).unwrap().perplexity;
    assert!(
        (q - f).abs() / f < 0.005,
        "perplexity {q} quantized vs {f} dequantized"
    );
}

/// Fine-tuning examples (completions and conversations) tokenize to transformers' ids, with
/// the learned tokens (completion + EOS, assistant turns) labelled as transformers' tokenizer
/// and chat template place them.
#[test]
fn sft_examples_tokenize_as_transformers() {
    use moera::engine::dataset::{parse_jsonl, tokenize};

    let Some(model) = model() else { return };
    let path = fixtures().join("sft.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let (examples, skipped) = parse_jsonl(&text, &path, false).expect("parse");
    assert_eq!(skipped, 0);
    let reference: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sft_reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(examples.len(), reference.len());
    for ((line, example), expected) in examples.iter().zip(&reference) {
        let tokenized = tokenize(model, example).expect("tokenize");
        let ids: Vec<u32> = serde_json::from_value(expected["ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(expected["labels"].clone()).unwrap();
        assert_eq!(tokenized.ids, ids, "line {line}: ids");
        assert_eq!(tokenized.labels, labels, "line {line}: labels");
    }
}
