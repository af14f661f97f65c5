//! Hostile and broken inputs give typed errors that name the file or tensor, never a panic.

use std::path::Path;

use moera::engine::{Error, GenerationRequest, Model};
use moera_models::ModelError;

use crate::common::*;

fn load(path: &Path) -> Error {
    Model::load_on(path, &flex(), &mut |_| {}).expect_err("loading must fail")
}

/// A minimal GGUF v3 file: one string key and the given tensor infos (name, dims, type,
/// offset), followed by `data_len` zero bytes of tensor data.
fn gguf_bytes(tensors: &[(&str, &[u64], u32, u64)], data_len: usize) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(1u64.to_le_bytes());
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    for (name, dims, kind, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(kind.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + data_len, 0);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn truncated_gguf_header() {
    let dir = scratch();
    let bytes = std::fs::read(fixtures().join("quants.gguf")).unwrap();
    let path = write(dir.path(), "cut.gguf", &bytes[..100]);
    match load(&path) {
        Error::Truncated { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn truncated_gguf_data() {
    let dir = scratch();
    let bytes = std::fs::read(fixtures().join("quants.gguf")).unwrap();
    let path = write(dir.path(), "cut.gguf", &bytes[..bytes.len() - 100]);
    match load(&path) {
        Error::TensorOutOfBounds { tensor, .. } => assert_eq!(tensor, "Q6_K"),
        other => panic!("expected TensorOutOfBounds, got {other:?}"),
    }
}

#[test]
fn wrong_magic() {
    let dir = scratch();
    let path = write(
        dir.path(),
        "model.gguf",
        b"GGML\x03\0\0\0 not really a model",
    );
    assert!(matches!(load(&path), Error::BadMagic { .. }));
    let path = write(dir.path(), "tiny.gguf", b"GG");
    assert!(matches!(load(&path), Error::BadMagic { .. }));
}

#[test]
fn tensor_data_out_of_bounds() {
    let dir = scratch();
    let bytes = gguf_bytes(&[("token_embd.weight", &[32, 4], 0, 1 << 40)], 512);
    let path = write(dir.path(), "oob.gguf", &bytes);
    match load(&path) {
        Error::TensorOutOfBounds {
            tensor, path: p, ..
        } => {
            assert_eq!(tensor, "token_embd.weight");
            assert_eq!(p, path);
        }
        other => panic!("expected TensorOutOfBounds, got {other:?}"),
    }
}

#[test]
fn unknown_tensor_type() {
    let dir = scratch();
    let bytes = gguf_bytes(&[("blk.0.attn_q.weight", &[32, 4], 77, 0)], 512);
    match load(&write(dir.path(), "type.gguf", &bytes)) {
        Error::UnknownTensorType {
            tensor, type_id, ..
        } => {
            assert_eq!((tensor.as_str(), type_id), ("blk.0.attn_q.weight", 77));
        }
        other => panic!("expected UnknownTensorType, got {other:?}"),
    }
}

#[test]
fn absurd_counts_do_not_allocate() {
    // A header claiming 2^60 metadata entries must fail fast, not try to allocate them.
    let dir = scratch();
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((1u64 << 60).to_le_bytes());
    assert!(matches!(
        load(&write(dir.path(), "huge.gguf", &bytes)),
        Error::Truncated { .. }
    ));
}

#[test]
fn gguf_missing_tensor_names_it() {
    let dir = scratch();
    // Valid header and embedding, but no metadata for the architecture's sizes.
    let bytes = gguf_bytes(&[("token_embd.weight", &[32, 4], 0, 0)], 512);
    match load(&write(dir.path(), "partial.gguf", &bytes)) {
        Error::Model {
            source: ModelError::Config(reason),
            ..
        } => {
            assert!(reason.contains("GGUF metadata lacks `llama."), "{reason}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = scratch();
    let model = copy_fixture("tiny-llama", dir.path());
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    match load(&model) {
        Error::Safetensors { path, .. } => assert_eq!(path, weights),
        other => panic!("expected Safetensors, got {other:?}"),
    }
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn missing_config_field() {
    let dir = scratch();
    let model = copy_fixture("tiny-llama", dir.path());
    edit_config(&model, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    match load(&model) {
        Error::Config { path, reason } => {
            assert_eq!(path, model.join("config.json"));
            assert!(reason.contains("hidden_size"), "{reason}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
}

#[test]
fn unknown_architecture() {
    let dir = scratch();
    let model = copy_fixture("tiny-llama", dir.path());
    edit_config(&model, |c| {
        c["architectures"] = serde_json::json!(["FooForCausalLM"])
    });
    match load(&model) {
        Error::UnknownArchitecture {
            architecture,
            supported,
            ..
        } => {
            assert_eq!(architecture, "FooForCausalLM");
            for listed in [
                "LlamaForCausalLM",
                "MixtralForCausalLM",
                "DeepseekV3ForCausalLM",
            ] {
                assert!(supported.contains(listed), "{supported}");
            }
        }
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
}

#[test]
fn config_weight_shape_mismatch() {
    let dir = scratch();
    let model = copy_fixture("tiny-llama", dir.path());
    edit_config(&model, |c| c["intermediate_size"] = serde_json::json!(96));
    match load(&model) {
        Error::Model {
            source:
                ModelError::ShapeMismatch {
                    name,
                    expected,
                    found,
                },
            path,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!((expected, found), (vec![96, 64], vec![128, 64]));
            assert_eq!(path, model.join("model.safetensors"));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn inconsistent_head_counts() {
    let dir = scratch();
    let model = copy_fixture("tiny-llama", dir.path());
    edit_config(&model, |c| c["num_key_value_heads"] = serde_json::json!(3));
    assert!(matches!(
        load(&model),
        Error::Model {
            source: ModelError::Config(_),
            ..
        }
    ));
}

#[test]
fn missing_model_path() {
    assert!(matches!(
        load(Path::new("/no/such/model")),
        Error::NotAModel(_)
    ));
}

#[test]
fn bad_requests() {
    let model = load_on(&fixtures().join("tiny-llama"), &flex());
    let generate = |request: GenerationRequest| model.generate(&request).err();
    assert!(matches!(
        generate(GenerationRequest::ids(vec![1, 600])),
        Some(Error::TokenOutOfRange {
            id: 600,
            vocab: 512
        })
    ));
    assert!(matches!(
        generate(GenerationRequest::ids(vec![])),
        Some(Error::EmptyPrompt)
    ));
    assert!(matches!(
        generate(GenerationRequest::ids(vec![1; 250]).max_tokens(10)),
        Some(Error::PromptTooLong {
            prompt: 250,
            max_new: 10,
            context: 256
        })
    ));
    // The tiny checkpoint has no tokenizer: text prompts are refused, ids work.
    assert!(matches!(
        generate(GenerationRequest::text("hello")),
        Some(Error::NoTokenizer)
    ));
    let bad_sampling = moera::engine::SamplingParams {
        top_p: 2.0,
        ..Default::default()
    };
    assert!(matches!(
        generate(GenerationRequest::ids(vec![1]).sampling(bad_sampling)),
        Some(Error::Sampling(_))
    ));
    assert!(matches!(
        model.logits(&[1; 300]),
        Err(Error::PromptTooLong { .. })
    ));
}

#[test]
fn expert_count_mismatch_names_the_tensor() {
    for (experts, found) in [(6, 8), (10, 8)] {
        let dir = scratch();
        let model = copy_fixture("tiny-mixtral", dir.path());
        edit_config(&model, |c| {
            c["num_local_experts"] = serde_json::json!(experts)
        });
        match load(&model) {
            Error::Model {
                source:
                    ModelError::ExpertCount {
                        name,
                        config,
                        found: in_file,
                    },
                ..
            } => {
                assert_eq!(name, "model.layers.0.block_sparse_moe.gate.weight");
                assert_eq!((config, in_file), (experts, found));
            }
            other => panic!("expected ExpertCount, got {other:?}"),
        }
    }
}

#[test]
fn more_experts_per_token_than_experts() {
    let dir = scratch();
    let model = copy_fixture("tiny-qwen2-moe", dir.path());
    edit_config(&model, |c| c["num_experts_per_tok"] = serde_json::json!(9));
    match load(&model) {
        Error::Model {
            source: ModelError::Config(reason),
            path,
        } => {
            assert!(reason.contains("num_experts_per_tok (9)"), "{reason}");
            assert_eq!(path, model.join("config.json"));
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Rewrites `model.safetensors` of `model` without the tensor `drop`.
fn drop_tensor(model: &Path, drop: &str) {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != drop)
        .collect();
    assert!(kept.len() < tensors.len(), "{drop} is in the fixture");
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn missing_expert_tensor_names_it() {
    for (fixture, tensor) in [
        (
            "tiny-mixtral",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        ),
        ("tiny-gpt-oss", "model.layers.0.mlp.experts.down_proj_bias"),
        (
            "tiny-deepseek-v3",
            "model.layers.2.mlp.gate.e_score_correction_bias",
        ),
    ] {
        let dir = scratch();
        let model = copy_fixture(fixture, dir.path());
        drop_tensor(&model, tensor);
        match load(&model) {
            Error::Model {
                source: ModelError::MissingTensor(name),
                ..
            } => assert_eq!(name, tensor),
            other => panic!("{fixture}: expected MissingTensor, got {other:?}"),
        }
    }
}

/// Fine-tuning data: malformed lines are errors naming the line (or skipped and counted
/// when asked), an empty file or a conversation the model has no template for is an error,
/// long examples are truncated and counted, and the split is seeded.
#[test]
fn training_data_errors_name_the_line() {
    use moera::engine::dataset::{Dataset, DatasetOptions};

    let model = load_on(&fixtures().join("tiny-qwen3-moe"), &flex());
    let dir = scratch();
    let path = dir.path().join("data.jsonl");
    let read = |text: &str, options: &DatasetOptions| {
        std::fs::write(&path, text).unwrap();
        Dataset::from_jsonl(&path, &model, options)
    };
    let good = r#"{"prompt": "the cat", "completion": " sat on the mat"}"#;
    let defaults = DatasetOptions::default();
    let err = read(&format!("{good}\n\n{{\"prompt\": 3}}\n{good}\n"), &defaults).unwrap_err();
    assert!(matches!(err, Error::Dataset { line: Some(3), .. }), "{err}");
    assert!(err.to_string().contains("data.jsonl:3"), "{err}");
    let skipping = DatasetOptions {
        skip_malformed: true,
        ..DatasetOptions::default()
    };
    let data = read(&format!("{good}\nnot json\n{good}\n"), &skipping).expect("skips");
    assert_eq!((data.train.len(), data.skipped_lines), (2, 1));
    let err = read("\n\n", &defaults).unwrap_err();
    assert!(err.to_string().contains("no examples"), "{err}");
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let err = read(chat, &defaults).unwrap_err();
    assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
    let short = DatasetOptions {
        max_len: 3,
        ..DatasetOptions::default()
    };
    let short_prompt = r#"{"prompt": "a", "completion": " sat on the mat, the cat sat"}"#;
    let data = read(&format!("{short_prompt}\n{short_prompt}\n"), &short).expect("truncates");
    assert_eq!(data.truncated, 2);
    assert!(
        data.train
            .iter()
            .all(|e| e.ids.len() == 3 && e.labels.len() == 3)
    );
    // A prompt that fills max_len leaves nothing to learn: the example is dropped.
    let long_prompt =
        r#"{"prompt": "the cat sat on the mat, the cat sat on the mat", "completion": " x"}"#;
    let data = read(&format!("{short_prompt}\n{long_prompt}\n"), &short).expect("drops");
    assert_eq!((data.train.len(), data.unscored), (1, 1));
    let err = read(long_prompt, &short).unwrap_err();
    assert!(err.to_string().contains("has a token to learn"), "{err}");
    let lines: String = (0..10)
        .map(|i| format!("{{\"prompt\": \"line {i}\", \"completion\": \" the cat\"}}\n"))
        .collect();
    let split = DatasetOptions {
        validation_fraction: 0.2,
        seed: 7,
        ..DatasetOptions::default()
    };
    let first = read(&lines, &split).expect("split");
    let again = read(&lines, &split).expect("split");
    assert_eq!((first.train.len(), first.validation.len()), (8, 2));
    assert_eq!(first.train, again.train, "the shuffle is seeded");
    let other = read(
        &lines,
        &DatasetOptions {
            seed: 8,
            ..split.clone()
        },
    )
    .expect("split");
    assert_ne!(first.train, other.train, "another seed, another order");
    let bad_fraction = DatasetOptions {
        validation_fraction: 1.0,
        ..DatasetOptions::default()
    };
    assert!(read(good, &bad_fraction).is_err());
}
