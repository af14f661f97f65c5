//! MoE kernels: fused routing against the models' reference router, the fused dispatch
//! against the reference sparse dispatch, and whole MoE models with kernels against the
//! reference path. The kernels run on cube devices only, so these tests need `wgpu`.

use burn::tensor::{Device, Tensor, TensorData};
use moera::kernels::moe::{ExpertActivation, MoeTiles, RoutingMethod, with_moe_tiles};
use moera::kernels::{KernelPath, QuantFormat, QuantizedMatrix, with_kernel_path};
use moera::models::moe::{Experts, RouterSpec, Routing};

use crate::*;

fn spec(experts: usize, top_k: usize, method: RoutingMethod, scale: f32) -> RouterSpec {
    RouterSpec {
        num_experts: experts,
        top_k,
        method,
        scale,
        bias: false,
    }
}

/// Every routing method at each expert count, with top-k from 1 to all experts.
fn routing_specs() -> Vec<RouterSpec> {
    let mut specs = Vec::new();
    for experts in [8usize, 64] {
        let bias: Vec<f32> = pseudo_random(experts as u64, experts)
            .iter()
            .map(|v| v * 0.2)
            .collect();
        for top_k in [1, 2, 8, experts] {
            let methods = [
                (RoutingMethod::SoftmaxTopK { normalize: true }, 1.0),
                (RoutingMethod::SoftmaxTopK { normalize: false }, 1.0),
                (RoutingMethod::SoftmaxGroupLimited { groups: None }, 16.0),
                (
                    RoutingMethod::SoftmaxGroupLimited {
                        groups: Some((4, 2)),
                    },
                    1.0,
                ),
                (
                    RoutingMethod::SigmoidGroupLimited {
                        groups: (4, 2),
                        normalize: true,
                        correction_bias: bias.clone(),
                    },
                    2.5,
                ),
                (
                    RoutingMethod::SigmoidGroupLimited {
                        groups: (8, 8),
                        normalize: false,
                        correction_bias: bias.clone(),
                    },
                    1.0,
                ),
                (RoutingMethod::TopKSoftmax, 1.0),
            ];
            for (method, scale) in methods {
                let s = spec(experts, top_k, method, scale);
                if s.validate().is_ok() {
                    specs.push(s);
                }
            }
        }
    }
    specs
}

/// Router logits: random rows, plus rows of exact ties (all equal; equal pairs) where the
/// lower index must win.
fn router_logits(tokens: usize, experts: usize) -> Vec<f32> {
    let mut logits: Vec<f32> = pseudo_random((tokens * experts) as u64, tokens * experts)
        .iter()
        .map(|v| v * 3.0)
        .collect();
    logits[..experts].fill(0.5);
    if tokens > 1 {
        for (e, v) in logits[experts..2 * experts].iter_mut().enumerate() {
            *v = (e / 2) as f32 * 0.25;
        }
    }
    logits
}

#[test]
fn routing_kernel_matches_the_reference_router_on_wgpu() {
    let device = gpu();
    with_kernel_path(KernelPath::Fast, || {
        for s in routing_specs() {
            let (experts, k) = (s.num_experts, s.top_k);
            for tokens in [1, 2, 37, 130] {
                let logits = router_logits(tokens, experts);
                let tensor = Tensor::<2>::from_data(
                    TensorData::new(logits.clone(), [tokens, experts]),
                    &device,
                );
                let (ids, weights) =
                    moera::kernels::moe::route(tensor, &s.method, k, s.scale, None)
                        .expect("the routing kernel runs on wgpu");
                let ids = ids
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .unwrap();
                let weights = values(weights);
                for (t, row) in logits.chunks(experts).enumerate() {
                    let (expected_ids, expected_weights) = s.route_token(row);
                    let got: Vec<usize> = ids[t * k..(t + 1) * k]
                        .iter()
                        .map(|&i| i as usize)
                        .collect();
                    assert_eq!(
                        got, expected_ids,
                        "{:?} E{experts} k{k} token {t}: ids",
                        s.method
                    );
                    let error = relative_error(&weights[t * k..(t + 1) * k], &expected_weights);
                    assert!(
                        error < 1e-5,
                        "{:?} E{experts} k{k} token {t}: weights off by {error}",
                        s.method
                    );
                }
            }
        }
    });
}

/// A routing of `tokens` rows: `ids` chosen by `pick(token, j)`, weights pseudo-random.
fn routing(
    tokens: usize,
    experts: usize,
    top_k: usize,
    pick: impl Fn(usize, usize) -> u32,
) -> Routing {
    let ids: Vec<u32> = (0..tokens * top_k)
        .map(|s| pick(s / top_k, s % top_k))
        .collect();
    let weights = pseudo_random((tokens * top_k) as u64 + 99, tokens * top_k);
    Routing {
        num_experts: experts,
        top_k,
        logits: vec![0.0; tokens * experts],
        ids,
        weights,
    }
}

fn experts_module(
    experts: usize,
    hidden: usize,
    inter: usize,
    gpt_oss: bool,
    device: &Device,
) -> Experts {
    let scale = 1.0 / (hidden as f32).sqrt();
    let scaled = |seed: u64, n: usize| -> Vec<f32> {
        pseudo_random(seed, n).iter().map(|v| v * scale).collect()
    };
    let biases = gpt_oss.then(|| (scaled(3, experts * 2 * inter), scaled(4, experts * hidden)));
    let activation = if gpt_oss {
        ExpertActivation::ClampedSwiGlu {
            alpha: 1.702,
            limit: 0.3,
        }
    } else {
        ExpertActivation::SwiGlu
    };
    Experts::from_stacked(
        [experts, hidden, inter],
        scaled(1, experts * hidden * 2 * inter),
        scaled(2, experts * inter * hidden),
        biases,
        activation,
        device,
    )
    .expect("experts")
}

#[test]
fn dispatch_kernel_matches_the_reference_dispatch_on_wgpu() {
    let device = gpu();
    // (experts, top_k, tokens, how slots pick experts): decode sizes take the GEMV, the
    // rest the sorted grouped GEMM (blocks of 8 slots); hidden 40 and intermediate 24 are
    // ragged against the 64-thread column blocks.
    type Pick = fn(usize, usize, usize) -> u32;
    let spread: Pick = |t, j, e| ((t * 7 + j * 3 + t * j) % e) as u32;
    let one_expert: Pick = |_, _, _| 3;
    let every_expert: Pick = |_, j, _| j as u32;
    let low_half: Pick = |t, j, e| ((t + j * 5) % (e / 2)) as u32 * 2;
    let cases: &[(usize, usize, usize, Pick, &str)] = &[
        (8, 2, 1, spread, "decode"),
        (8, 2, 4, spread, "decode batch"),
        (8, 2, 5, spread, "ragged prefill"),
        (8, 2, 37, spread, "prefill"),
        (8, 8, 512, spread, "long prefill, k = E"),
        (8, 1, 70, one_expert, "every token on one expert (9 blocks)"),
        (4, 4, 37, every_expert, "k = E"),
        (64, 8, 33, low_half, "odd experts get no tokens"),
        (64, 8, 3, low_half, "decode, 64 experts"),
    ];
    // The default tiles, and others: odd blocks of 3 slots, 32 and 128 threads per cube.
    let tile_choices = [
        MoeTiles::DEFAULT,
        MoeTiles {
            block_rows: 3,
            threads: 32,
            ..MoeTiles::DEFAULT
        },
        MoeTiles {
            block_rows: 16,
            threads: 128,
            ..MoeTiles::DEFAULT
        },
    ];
    with_kernel_path(KernelPath::Fast, || {
        for (gpt_oss, tiles) in [false, true]
            .into_iter()
            .flat_map(|g| tile_choices.map(|t| (g, t)))
        {
            for &(experts, top_k, tokens, pick, what) in cases {
                let (hidden, inter) = (40, 24);
                let module = experts_module(experts, hidden, inter, gpt_oss, &device);
                let routing = routing(tokens, experts, top_k, |t, j| pick(t, j, experts));
                let x = pseudo_random(tokens as u64 * 5 + 1, tokens * hidden);
                let x = Tensor::<2>::from_data(TensorData::new(x, [tokens, hidden]), &device);
                let (ids, weights) = routing.to_device(&device);
                let fused = with_moe_tiles(tiles, || module.forward_fused(x.clone(), ids, weights))
                    .expect("valid tiles")
                    .expect("the dispatch kernels run on wgpu");
                let reference = module.forward_sparse(x, &routing);
                let error = relative_error(&values(fused), &values(reference));
                assert!(
                    error < 1e-5,
                    "{what} (E{experts} k{top_k} t{tokens}, GPT-OSS experts: {gpt_oss}, \
                     {tiles:?}): relative error {error}"
                );
            }
        }
    });
}

/// A `[rows, cols]` matrix of GGUF `format` blocks with random codes and small scales, as
/// ggml stores them.
fn random_blocks(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QuantizedMatrix {
    let (block, bytes, scales): (usize, usize, &[f32]) = match format {
        QuantFormat::Q4_0 => (32, 18, &[0.02]),
        QuantFormat::Q4_1 => (32, 20, &[0.02, -0.15]),
        QuantFormat::Q8_0 => (32, 34, &[0.002]),
        QuantFormat::Q4K => (256, 144, &[0.0005, 0.0005]),
        other => panic!("{other} is not a GGUF block format"),
    };
    let blocks = rows * cols / block;
    let noise = pseudo_random(seed, blocks * bytes);
    let mut data = Vec::with_capacity(blocks * bytes);
    for (b, noise) in noise.chunks_exact(bytes).enumerate() {
        // Scales vary a little per block; then every other byte is a random code byte.
        for (i, scale) in scales.iter().enumerate() {
            let jitter = 1.0 + 0.5 * noise[i];
            let value = half::f16::from_f32(scale * jitter * if b % 3 == 0 { -1.0 } else { 1.0 });
            data.extend(value.to_le_bytes());
        }
        data.extend(
            noise[2 * scales.len()..]
                .iter()
                .map(|v| ((v + 1.0) * 127.99) as u8),
        );
    }
    QuantizedMatrix::from_ggml(format, &data, rows, cols).expect("blocks")
}

/// Quantized experts in every format the kernels decode (GGUF blocks as stored, int8 and
/// int4 from in-situ quantization): the fused dispatch against the reference path (burn
/// ops dequantizing on the device) and against f32 experts holding the host-dequantized
/// weights, for decode (GEMV) and prefill (grouped GEMM) token counts, with the default
/// tiles and with blocks of 5 slots × 128 threads. Intermediate 96 is ragged against the
/// 64- and 128-thread column blocks.
#[test]
fn quantized_dispatch_kernel_matches_the_reference_on_wgpu() {
    let device = gpu();
    let int4 = |group, asymmetric| QuantFormat::Int4 { group, asymmetric };
    let formats = [
        (QuantFormat::Q4_0, 64, 96),
        (QuantFormat::Q4_1, 64, 96),
        (QuantFormat::Q8_0, 64, 96),
        (QuantFormat::Q4K, 256, 256),
        (QuantFormat::Int8, 64, 96),
        (int4(32, true), 64, 96),
        (int4(64, false), 128, 64),
    ];
    let (experts, top_k) = (8, 2);
    for (format, hidden, inter) in formats {
        let matrix = |rows: usize, cols: usize, seed: u64| match format {
            QuantFormat::Int8 | QuantFormat::Int4 { .. } => {
                let weights: Vec<f32> = pseudo_random(seed, rows * cols)
                    .iter()
                    .map(|v| v / (cols as f32).sqrt())
                    .collect();
                QuantizedMatrix::quantize(format, &weights, rows, cols).expect("quantize")
            }
            _ => random_blocks(format, rows, cols, seed),
        };
        let gate_up = matrix(experts * 2 * inter, hidden, 11);
        let down = matrix(experts * hidden, inter, 12);
        // The same weights in f32, in the stacked layouts `[E, H, 2I]` and `[E, I, H]`.
        let (gu, d) = (gate_up.dequantize(), down.dequantize());
        let mut dense_gate_up = vec![0f32; gu.len()];
        for e in 0..experts {
            for j in 0..2 * inter {
                for h in 0..hidden {
                    dense_gate_up[(e * hidden + h) * 2 * inter + j] =
                        gu[(e * 2 * inter + j) * hidden + h];
                }
            }
        }
        let mut dense_down = vec![0f32; d.len()];
        for e in 0..experts {
            for h in 0..hidden {
                for i in 0..inter {
                    dense_down[(e * inter + i) * hidden + h] = d[(e * hidden + h) * inter + i];
                }
            }
        }
        let shape = [experts, hidden, inter];
        let activation = ExpertActivation::SwiGlu;
        let quantized = Experts::from_quantized(shape, gate_up, down, activation, &device)
            .expect("quantized experts");
        assert_eq!(quantized.is_quantized(), [true, true]);
        let dense =
            Experts::from_stacked(shape, dense_gate_up, dense_down, None, activation, &device)
                .expect("f32 experts");
        for tokens in [1, 3, 37, 130] {
            let spread = |t: usize, j: usize| ((t * 7 + j * 3 + t * j) % experts) as u32;
            let routing = routing(tokens, experts, top_k, spread);
            let x = pseudo_random(tokens as u64 * 5 + 1, tokens * hidden);
            let x = Tensor::<2>::from_data(TensorData::new(x, [tokens, hidden]), &device);
            let (ids, weights) = routing.to_device(&device);
            let reference = with_kernel_path(KernelPath::Reference, || {
                values(quantized.forward_sparse(x.clone(), &routing))
            });
            let f32_experts = with_kernel_path(KernelPath::Reference, || {
                values(dense.forward_sparse(x.clone(), &routing))
            });
            let other_tiles = MoeTiles {
                block_rows: 5,
                threads: 128,
                ..MoeTiles::DEFAULT
            };
            for tiles in [MoeTiles::DEFAULT, other_tiles] {
                let fused = with_kernel_path(KernelPath::Fast, || {
                    with_moe_tiles(tiles, || {
                        quantized.forward_fused(x.clone(), ids.clone(), weights.clone())
                    })
                })
                .expect("valid tiles")
                .expect("the dispatch kernels run on wgpu");
                let fused = values(fused);
                for (expected, against) in [(&reference, "reference"), (&f32_experts, "f32")] {
                    let error = relative_error(&fused, expected);
                    assert!(
                        error < 1e-5,
                        "{format} ({tokens} tokens, {tiles:?}) vs {against}: relative error {error}"
                    );
                }
            }
        }
    }
}
