//! GGUF: dequantization against the `gguf` Python package, and GGUF vocabularies against
//! the tokenizers they came from.

use moera::engine::gguf::GgufFile;
use moera::engine::tokenizer;

use crate::common::*;

#[test]
fn every_block_type_dequantizes_like_the_gguf_package() {
    let file = GgufFile::open(fixtures().join("quants.gguf")).expect("open quants.gguf");
    let reference = reference(&fixtures().join("quants_reference.safetensors"));
    for kind in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
    ] {
        let info = file
            .tensor_info(kind)
            .unwrap_or_else(|| panic!("tensor {kind}"));
        let (shape, expected) = &reference[kind];
        assert_eq!(&info.shape(), shape, "{kind} shape");
        let values = file.dequantize(kind).unwrap();
        let diff = max_abs_diff(&values, expected);
        // Both sides compute d·q (+ m) in f32 from the same f16 scales: exact up to rounding.
        assert!(diff <= 1e-6, "{kind}: max difference {diff}");
    }
}

#[test]
fn sentencepiece_vocabulary_tokenizes_like_sentencepiece() {
    #[derive(serde::Deserialize)]
    struct Sample {
        text: String,
        ids: Vec<u32>,
        decoded: String,
    }
    let file = GgufFile::open(fixtures().join("spm-tokenizer.gguf")).unwrap();
    let tokenizer = tokenizer::from_gguf(&file).expect("llama tokenizer");
    let samples: Vec<Sample> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("spm_reference.json")).unwrap(),
    )
    .unwrap();
    for sample in samples {
        let ids = tokenizer
            .encode(sample.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, sample.ids, "ids of {:?}", sample.text);
        let decoded = tokenizer.decode(&ids, true).unwrap();
        assert_eq!(decoded, sample.decoded, "decoding {:?}", sample.text);
    }
}

#[test]
fn llama_cpp_qk_permutation_is_undone() {
    // llama.cpp's converter: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2). Build a matrix
    // whose rows are their own HF index, permute it that way, and check we get it back.
    let (heads, head_dim, cols) = (3, 8, 2);
    let rows = heads * head_dim;
    let hf: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
    let mut permuted = vec![0f32; hf.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                let src = h * head_dim + j * head_dim / 2 + i;
                let dst = h * head_dim + i * 2 + j;
                permuted[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    let order = moera::engine::gguf::unpermute_order(rows, heads).unwrap();
    let restored = moera::models::nn::gather_rows(&permuted, cols, &order);
    assert_eq!(restored, hf);
}
