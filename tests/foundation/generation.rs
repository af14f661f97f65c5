//! Generation behaviour: seeds, stop conditions, streaming, UTF-8 safe detokenization.

use std::sync::Arc;

use moera::engine::tokenizer::IncrementalDecoder;
use moera::engine::{FinishReason, GenerationRequest, SamplingParams, TokenEvent};

use crate::common::*;

#[test]
fn same_seed_reproduces_and_another_seed_differs() {
    let model = load_on(&fixtures().join("tiny-llama"), &flex());
    let request = |seed| {
        GenerationRequest::ids(vec![5, 6, 7])
            .max_tokens(24)
            .sampling(SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.95,
                seed: Some(seed),
                ..Default::default()
            })
    };
    let a = token_ids(model.generate(&request(1)).unwrap());
    let b = token_ids(model.generate(&request(1)).unwrap());
    let c = token_ids(model.generate(&request(2)).unwrap());
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn max_tokens_and_usage() {
    let model = load_on(&fixtures().join("tiny-llama"), &flex());
    let events: Vec<TokenEvent> = model
        .generate(&GenerationRequest::ids(vec![1, 2, 3]).max_tokens(5))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(events.len(), 6);
    match events.last().unwrap() {
        TokenEvent::Done { reason, usage } => {
            assert_eq!(*reason, FinishReason::Length);
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 5));
        }
        other => panic!("expected Done, got {other:?}"),
    }
}

#[test]
fn async_stream_yields_the_same_tokens() {
    let model = Arc::new(load_on(&fixtures().join("tiny-llama"), &flex()));
    let request = GenerationRequest::ids(vec![9, 8, 7]).max_tokens(8);
    let expected = token_ids(model.generate(&request).unwrap());
    let stream = model.generate_stream(request);
    let streamed = token_ids(futures::executor::block_on_stream(stream));
    assert_eq!(streamed, expected);
}

#[test]
fn stop_strings_end_generation_before_them() {
    let Some(path) = smollm2_path() else { return };
    let model = load_on(&path, &flex());
    // transformers' greedy continuation is " Paris.\n\nThe answer is: 2".
    let request = GenerationRequest::text("The capital of France is").max_tokens(12);
    let (full, _) = model.generate_text(&request).unwrap();
    assert!(full.starts_with(" Paris.\n\n"), "{full:?}");
    let (text, reason) = model
        .generate_text(&request.clone().stop(["\n\n"]))
        .unwrap();
    assert_eq!(text, " Paris.");
    assert_eq!(reason, FinishReason::Stop("\n\n".into()));
    // A stop string spanning several tokens is held back until it is complete.
    let (text, reason) = model.generate_text(&request.stop(["The answer"])).unwrap();
    assert_eq!(text, " Paris.\n\n");
    assert_eq!(reason, FinishReason::Stop("The answer".into()));
}

#[test]
fn incremental_decoding_never_splits_characters() {
    let Some(path) = smollm2_path() else { return };
    let model = load_on(&path, &flex());
    let tokenizer = model.tokenizer().unwrap();
    for text in [
        "emoji 🚀🌍👩‍💻 end",
        "数据科学 and 東京タワー",
        "Café déjà vu — naïve",
    ] {
        let ids = model.encode(text, false).unwrap();
        let mut decoder = IncrementalDecoder::new();
        let mut pieces: Vec<String> = ids
            .iter()
            .filter_map(|&id| decoder.push(tokenizer, id))
            .collect();
        pieces.extend(decoder.flush(tokenizer));
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
        assert!(pieces.len() > 1, "streamed in pieces");
    }
}
