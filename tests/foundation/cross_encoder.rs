//! The cross-encoder reranker against sentence-transformers' `CrossEncoder.predict`
//! (`make_fixtures.py --only cross-encoder`): a random one-label BertForSequenceClassification
//! with a small WordPiece vocabulary, pairs with non-ASCII text and one passage truncated at
//! the tokenizer's 64 tokens, scored in one padded batch and one at a time; the default
//! (sigmoid) activation; heads it cannot run refused.

use moera::engine::Device;
use moera::engine::rag::Reranker;
use moera::engine::rag::cross_encoder::{CrossEncoder, ScoreActivation};

use crate::common::*;

struct CrossEncoderReference {
    pairs: Vec<(String, String)>,
    scores: Vec<f64>,
    default_scores: Vec<f64>,
    max_seq_length: usize,
    token_ids: Vec<Vec<u32>>,
    type_ids: Vec<Vec<u32>>,
}

fn cross_encoder_reference() -> CrossEncoderReference {
    let path = fixtures().join("tiny-cross-encoder/reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f64> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let rows = |key: &str| -> Vec<Vec<u32>> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    CrossEncoderReference {
        pairs: json["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap().to_string(),
                    pair[1].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        scores: floats("scores"),
        default_scores: floats("default_scores"),
        max_seq_length: json["max_seq_length"].as_u64().unwrap() as usize,
        token_ids: rows("token_ids"),
        type_ids: rows("type_ids"),
    }
}

/// Scores of every pair, in one padded batch per query and one pair at a time, each within
/// 1e-4 of `expected`; returns the largest difference.
fn check_scores(
    encoder: &CrossEncoder,
    pairs: &[(String, String)],
    expected: &[f64],
    what: &str,
) -> f64 {
    // Batched: the pairs grouped by query (the reranker's calls), in padded batches of 4.
    let mut batched = vec![f32::NAN; pairs.len()];
    let mut done = vec![false; pairs.len()];
    for i in 0..pairs.len() {
        if done[i] {
            continue;
        }
        let members: Vec<usize> = (i..pairs.len())
            .filter(|&j| pairs[j].0 == pairs[i].0)
            .collect();
        let passages: Vec<&str> = members.iter().map(|&j| pairs[j].1.as_str()).collect();
        let scores = encoder
            .score(&pairs[i].0, &passages)
            .expect("score a batch");
        assert_eq!(scores.len(), passages.len());
        for (&j, score) in members.iter().zip(scores) {
            batched[j] = score;
            done[j] = true;
        }
    }
    // All passages of the fixture under one query, as one batch, must also equal each pair
    // scored alone: padding must not leak into the scores.
    let passages: Vec<&str> = pairs.iter().map(|(_, p)| p.as_str()).collect();
    let same_query = encoder.score(&pairs[0].0, &passages).expect("score");
    let mut worst = 0f64;
    for (i, (query, passage)) in pairs.iter().enumerate() {
        let alone = encoder.score(query, &[passage]).expect("score one")[0];
        let mixed_alone = encoder.score(&pairs[0].0, &[passage]).expect("score one")[0];
        for (how, score, want) in [
            ("batched", batched[i], expected[i]),
            ("alone", alone, expected[i]),
            ("padded", same_query[i], mixed_alone as f64),
        ] {
            let diff = (score as f64 - want).abs();
            if how != "padded" {
                worst = worst.max(diff);
            }
            assert!(
                diff < 1e-4,
                "{what} {how} pair {i} ({query:?}, {passage:?}): {score} vs {want}"
            );
        }
    }
    eprintln!("{what}: max |moera − sentence-transformers| = {worst:.2e}");
    worst
}

fn check_cross_encoder(device: &Device) {
    let reference = cross_encoder_reference();
    assert!(reference.pairs.len() >= 6);
    let dir = fixtures().join("tiny-cross-encoder");
    let mut encoder = CrossEncoder::load(&dir, device).expect("load tiny-cross-encoder");
    encoder.batch_size = 4;
    assert_eq!(encoder.activation(), ScoreActivation::Identity);
    assert_eq!(encoder.max_tokens(), reference.max_seq_length);
    for (i, (query, passage)) in reference.pairs.iter().enumerate() {
        let tokens = encoder.encode(query, passage).unwrap();
        assert_eq!(tokens.ids, reference.token_ids[i], "token ids of pair {i}");
        assert_eq!(
            tokens.segments, reference.type_ids[i],
            "segments of pair {i}"
        );
    }
    assert!(
        reference
            .token_ids
            .iter()
            .any(|ids| ids.len() == reference.max_seq_length),
        "one pair is truncated"
    );
    check_scores(&encoder, &reference.pairs, &reference.scores, "logits");

    // Without config_sentence_transformers.json no activation is named: a sigmoid.
    let scratch = scratch();
    let copy = copy_fixture("tiny-cross-encoder", scratch.path());
    std::fs::remove_file(copy.join("config_sentence_transformers.json")).unwrap();
    let mut encoder = CrossEncoder::load(&copy, device).expect("load without activation");
    encoder.batch_size = 4;
    assert_eq!(encoder.activation(), ScoreActivation::Sigmoid);
    check_scores(
        &encoder,
        &reference.pairs,
        &reference.default_scores,
        "sigmoid scores",
    );
    assert!(encoder.score("anything", &[]).unwrap().is_empty());
}

#[test]
fn cross_encoder_matches_sentence_transformers() {
    check_cross_encoder(&flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn cross_encoder_matches_sentence_transformers_on_wgpu() {
    check_cross_encoder(&gpu());
}

/// Heads, architectures, modules and activations the reranker cannot run are clear errors.
#[test]
fn unusable_cross_encoders_are_refused() {
    let scratch = scratch();
    let copy = copy_fixture("tiny-cross-encoder", scratch.path());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("config.json")).unwrap()).unwrap();
    let refused = |changed: serde_json::Value| {
        std::fs::write(copy.join("config.json"), changed.to_string()).unwrap();
        let err = CrossEncoder::load(&copy, &flex()).expect_err("refused");
        assert!(
            matches!(err, moera::engine::Error::Config { .. }),
            "not a config error: {err:?}"
        );
        err.to_string()
    };
    let mut two_labels = config.clone();
    two_labels["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
    two_labels["label2id"] = serde_json::json!({"LABEL_0": 0, "LABEL_1": 1});
    let msg = refused(two_labels);
    assert!(
        msg.contains("num_labels 2") && msg.contains("config.json"),
        "{msg}"
    );
    let mut roberta = config.clone();
    roberta["architectures"] = serde_json::json!(["XLMRobertaForSequenceClassification"]);
    let msg = refused(roberta);
    assert!(msg.contains("XLMRobertaForSequenceClassification"), "{msg}");
    let mut model_type = config.clone();
    model_type["model_type"] = "xlm-roberta".into();
    let msg = refused(model_type);
    assert!(msg.contains("xlm-roberta"), "{msg}");
    std::fs::write(
        copy.join("config_sentence_transformers.json"),
        r#"{"activation_fn": "torch.nn.modules.activation.Tanh"}"#,
    )
    .unwrap();
    let msg = refused(config.clone());
    assert!(msg.contains("Tanh"), "{msg}");
    std::fs::remove_file(copy.join("config_sentence_transformers.json")).unwrap();
    std::fs::write(
        copy.join("modules.json"),
        r#"[{"type": "sentence_transformers.base.modules.transformer.Transformer"},
            {"type": "sentence_transformers.base.modules.dense.Dense"}]"#,
    )
    .unwrap();
    let msg = refused(config.clone());
    assert!(msg.contains("Dense"), "{msg}");
}
