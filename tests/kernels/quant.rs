//! Weight-only quantized matmul: formats against `gguf`, kernels against the reference.

use burn::tensor::{Device, Tensor, TensorData};
use moera::engine::gguf::GgufFile;
use moera::kernels::{KernelPath, QuantFormat, QuantLinear, QuantizedMatrix, with_kernel_path};

use crate::*;

/// The GGUF fixture's blocks kept quantized, with the reference `gguf`'s dequantization.
fn gguf_matrices() -> Vec<(QuantizedMatrix, Vec<f32>)> {
    let file = GgufFile::open(fixtures().join("quants.gguf")).expect("open quants.gguf");
    let bytes = std::fs::read(fixtures().join("quants_reference.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    [
        ("Q4_0", QuantFormat::Q4_0),
        ("Q4_1", QuantFormat::Q4_1),
        ("Q8_0", QuantFormat::Q8_0),
        ("Q4_K", QuantFormat::Q4K),
    ]
    .into_iter()
    .map(|(name, format)| {
        let info = file.tensor_info(name).expect("fixture tensor");
        let shape = info.shape();
        let matrix =
            QuantizedMatrix::from_ggml(format, file.tensor_bytes(info), shape[0], shape[1])
                .expect("re-layout");
        let expected: Vec<f32> = reference
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (matrix, expected)
    })
    .collect()
}

#[test]
fn gguf_blocks_dequantize_exactly_as_the_gguf_package() {
    let device = Device::flex();
    for (matrix, expected) in gguf_matrices() {
        let format = matrix.format;
        // Host decoding and the plain-burn reference both give gguf's values bit for bit.
        assert_eq!(
            matrix.dequantize(),
            expected,
            "{format} host dequantization"
        );
        let linear = QuantLinear::new(matrix, &device);
        assert_eq!(
            values(linear.dequantize()),
            expected,
            "{format} burn dequantization"
        );
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn gguf_blocks_dequantize_exactly_on_wgpu() {
    let device = gpu();
    for (matrix, expected) in gguf_matrices() {
        let format = matrix.format;
        let linear = QuantLinear::new(matrix, &device);
        assert_eq!(values(linear.dequantize()), expected, "{format} on wgpu");
    }
}

/// Every format over shapes that are not multiples of the kernels' tiles.
pub fn sweep() -> Vec<QuantizedMatrix> {
    let mut out = Vec::new();
    for (rows, cols) in [(7, 64), (33, 96), (40, 256)] {
        let weights = pseudo_random((rows * cols) as u64, rows * cols);
        let mut formats = vec![
            QuantFormat::Int8,
            QuantFormat::Int4 {
                group: 32,
                asymmetric: false,
            },
            QuantFormat::Int4 {
                group: 32,
                asymmetric: true,
            },
        ];
        if cols % 64 == 0 {
            formats.push(QuantFormat::Int4 {
                group: 64,
                asymmetric: true,
            });
        }
        if cols % 128 == 0 {
            formats.push(QuantFormat::Int4 {
                group: 128,
                asymmetric: false,
            });
        }
        for format in formats {
            out.push(QuantizedMatrix::quantize(format, &weights, rows, cols).unwrap());
        }
    }
    out.extend(gguf_matrices().into_iter().map(|(m, _)| m));
    out
}

/// The fast path (rayon on flex, cubecl on wgpu) against the reference on the same device,
/// for decode-sized (GEMV) and prefill-sized (tiled GEMM) token counts.
fn check_against_reference(device: &Device) {
    with_kernel_path(KernelPath::Fast, || check_sweep(device));
}

fn check_sweep(device: &Device) {
    let on_cpu = *device == Device::flex();
    for matrix in sweep() {
        let (format, rows, cols) = (matrix.format, matrix.rows, matrix.cols);
        // The CPU decodes 4-bit blocks of 32 with 8-bit activations (llama.cpp's scheme):
        // checked against the rounding bound below instead of f32 round-off.
        let int8_activations = on_cpu && format.code_bits() == 4 && matrix.group.is_multiple_of(32);
        let weights = matrix.dequantize();
        let linear = QuantLinear::new(matrix, device);
        for tokens in [1, 3, 5, 37] {
            let x = pseudo_random((tokens * 31 + cols) as u64, tokens * cols);
            let x_host = x.clone();
            let x = Tensor::<2>::from_data(TensorData::new(x, [tokens, cols]), device);
            let fast = values(linear.forward(x.clone()));
            let reference = values(linear.reference(x));
            if int8_activations && tokens == 1 {
                check_activation_rounding(&fast, &reference, &weights, &x_host, cols);
                continue;
            }
            let error = relative_error(&fast, &reference);
            assert!(
                error < 1e-5,
                "{format} [{rows}, {cols}] × {tokens} tokens: relative error {error}"
            );
        }
    }
}

/// Rounding `x` to 8 bits per block of 32 (`d = max|x| / 127`, error ≤ `d/2` per value)
/// moves output row `r` by at most `Σ_j |w_rj|·d_j/2`: every row stays inside that bound,
/// and on average far inside it (the errors are not all of one sign).
fn check_activation_rounding(
    fast: &[f32],
    reference: &[f32],
    weights: &[f32],
    x: &[f32],
    cols: usize,
) {
    let half_steps: Vec<f32> = x
        .chunks(32)
        .flat_map(|block| {
            let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            std::iter::repeat_n(d / 2.0, block.len())
        })
        .collect();
    let mut error_sum = 0.0;
    let mut bound_sum = 0.0;
    for (r, row) in weights.chunks(cols).enumerate() {
        let bound: f32 = row.iter().zip(&half_steps).map(|(w, h)| w.abs() * h).sum();
        let error = (fast[r] - reference[r]).abs();
        assert!(
            error <= bound * 1.001 + 1e-5,
            "row {r}: error {error} over the rounding bound {bound}"
        );
        error_sum += error;
        bound_sum += bound;
    }
    assert!(
        error_sum < 0.5 * bound_sum,
        "mean error {error_sum} against the bounds' {bound_sum}"
    );
}

#[test]
fn cpu_kernel_matches_the_reference() {
    check_against_reference(&Device::flex());
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[test]
fn cube_kernels_match_the_reference_on_wgpu() {
    check_against_reference(&gpu());
}

#[test]
fn a_three_dimensional_input_keeps_its_leading_dims() {
    let device = Device::flex();
    let weights = pseudo_random(5, 8 * 64);
    let matrix = QuantizedMatrix::quantize(QuantFormat::Int8, &weights, 8, 64).unwrap();
    let linear = QuantLinear::new(matrix, &device);
    let y = linear.forward(Tensor::<3>::ones([2, 3, 64], &device));
    assert_eq!(y.dims(), [2, 3, 8]);
}
