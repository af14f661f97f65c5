//! A linear layer over a quantized weight matrix.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::quant::{QuantFormat, QuantizedMatrix};
use crate::{Executor, differentiable_executor};

/// From this many tokens the CPU path multiplies a transiently dequantized matrix.
const CPU_GEMM_MIN_TOKENS: usize = 16;

/// `y = x · Wᵀ` with `W` (`[out, in]`) held quantized on `device`.
///
/// On cube devices the codes, scales and offsets live in device memory and a cubecl kernel
/// decodes them inside the matrix product; on CPU backends they stay in host memory for the
/// rayon kernel. The reference path dequantizes with burn ops (uploading the codes once if
/// they are not on the device yet). Cloning is cheap: the weights are shared.
#[derive(Clone)]
pub struct QuantLinear {
    inner: Arc<Inner>,
}

struct Inner {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    group: usize,
    bits: u32,
    memory_bytes: usize,
    device: Device,
    /// Kept for the CPU kernel.
    host: Option<QuantizedMatrix>,
    on_device: OnceLock<DeviceWeights>,
}

/// The matrix's parts as burn tensors.
#[derive(Clone)]
pub(crate) struct DeviceWeights {
    /// Packed code words, bit patterns carried in the device's int type.
    pub codes: Tensor<1, Int>,
    /// `[rows, groups]`.
    pub scales: Tensor<2>,
    /// `[rows, groups]`; zeros when the format has none.
    pub offsets: Tensor<2>,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantLinear({} [{}, {}])",
            self.inner.format, self.inner.rows, self.inner.cols
        )
    }
}

impl QuantLinear {
    /// Places `matrix` on `device`.
    pub fn new(matrix: QuantizedMatrix, device: &Device) -> Self {
        let gpu = is_gpu(device);
        let on_device = OnceLock::new();
        if gpu {
            let _ = on_device.set(upload(&matrix, device));
        }
        let inner = Inner {
            format: matrix.format,
            rows: matrix.rows,
            cols: matrix.cols,
            group: matrix.group,
            bits: matrix.format.code_bits(),
            memory_bytes: matrix.memory_bytes(),
            device: device.clone(),
            host: (!gpu).then_some(matrix),
            on_device,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn format(&self) -> QuantFormat {
        self.inner.format
    }

    /// Consecutive weights of a row sharing one scale (and offset).
    pub fn group(&self) -> usize {
        self.inner.group
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.inner.rows, self.inner.cols]
    }

    /// Bytes of codes, scales and offsets.
    pub fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes
    }

    /// `x` `[..., in]` → `[..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_with_lora(x, None)
    }

    /// `x` `[..., in]` → `[..., out]`, plus a LoRA update when given. On cube devices the
    /// update is fused into the dequant-matmul kernel, forward and (on an autodiff device)
    /// backward; elsewhere it is added with burn ops.
    pub fn forward_with_lora<const D: usize>(
        &self,
        x: Tensor<D>,
        lora: Option<LoraUpdate<D>>,
    ) -> Tensor<D> {
        let dims = x.dims();
        let (rows, cols) = (self.inner.rows, self.inner.cols);
        assert_eq!(dims[D - 1], cols, "QuantLinear input width");
        let tokens = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([tokens, cols]);
        let lora = lora.map(|update| update.flatten(tokens));
        let y = match differentiable_executor(&x.device()) {
            #[cfg(feature = "cube")]
            Executor::Cube => crate::cube::quant_linear(
                x,
                lora,
                self.device_weights(),
                self.inner.bits,
                self.inner.group,
                self.inner.format.has_offsets(),
            ),
            _ => match lora {
                Some(update) => {
                    // Where `forward_rows` would decode the weights for a GEMM anyway, the
                    // update joins that GEMM.
                    let decodes = differentiable_executor(&x.device()) == Executor::Cpu
                        && (tokens >= CPU_GEMM_MIN_TOKENS || x.is_autodiff());
                    let fused = decodes
                        .then(|| self.host_dequantized(&x.device()))
                        .flatten()
                        .and_then(|weights| {
                            crate::fused_lora_linear(&x, &weights.transpose(), &update)
                        });
                    match fused {
                        Some(y) => y,
                        None => self.forward_rows(x.clone(), 0..rows) + update.apply(x),
                    }
                }
                None => self.forward_rows(x, 0..rows),
            },
        };
        let mut out = dims;
        out[D - 1] = rows;
        y.reshape(out)
    }

    /// `x` `[tokens, in]` times the rows `rows` of the weights (e.g. one expert's block of a
    /// stacked matrix), transposed: `[tokens, rows.len()]`.
    pub fn forward_rows(&self, x: Tensor<2>, rows: Range<usize>) -> Tensor<2> {
        let [tokens, cols] = x.dims();
        assert_eq!(cols, self.inner.cols, "QuantLinear input width");
        assert!(rows.end <= self.inner.rows, "QuantLinear rows {rows:?}");
        match differentiable_executor(&x.device()) {
            Executor::Reference => self.reference_rows(x, rows),
            Executor::Cpu => match &self.inner.host {
                // Prefill: decoding each group once per token loses to a blocked f32 GEMM, so
                // the rows are dequantized for the call (rayon) and multiplied by burn. In
                // training (autodiff) burn's matmul also carries the gradient back to `x`.
                Some(host) if tokens >= CPU_GEMM_MIN_TOKENS || x.is_autodiff() => {
                    let weights = decode_rows(host, rows, &x.device());
                    x.matmul(weights.transpose())
                }
                Some(host) => {
                    let device = x.device();
                    let n = rows.len();
                    let data = x.into_data().convert::<f32>();
                    let values = data.as_slice::<f32>().expect("converted to f32");
                    let y = crate::cpu::quant_matmul(host, rows, values, tokens);
                    Tensor::from_data(TensorData::new(y, [tokens, n]), &device)
                }
                None => self.reference_rows(x, rows),
            },
            #[cfg(feature = "cube")]
            Executor::Cube if rows == (0..self.inner.rows) => crate::cube::quant_linear(
                x,
                None,
                self.device_weights(),
                self.inner.bits,
                self.inner.group,
                self.inner.format.has_offsets(),
            ),
            // Part of a matrix on a cube device: only the fused MoE kernels' fallback asks.
            #[cfg(feature = "cube")]
            Executor::Cube => self.reference_rows(x, rows),
        }
    }

    /// The reference: the weights dequantized with burn ops, then a plain matmul.
    pub fn reference(&self, x: Tensor<2>) -> Tensor<2> {
        self.reference_rows(x, 0..self.inner.rows)
    }

    fn reference_rows(&self, x: Tensor<2>, rows: Range<usize>) -> Tensor<2> {
        x.matmul(self.dequantize_rows(rows).transpose())
    }

    /// The `[out, in]` weights as f32 on `device`, decoded from the host copy the CPU
    /// kernels keep; `None` where the codes live in GPU memory.
    pub fn host_dequantized(&self, device: &Device) -> Option<Tensor<2>> {
        let host = self.inner.host.as_ref()?;
        Some(decode_rows(host, 0..self.inner.rows, device))
    }

    /// The `[out, in]` weights as f32, computed with burn ops on the device.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_rows(0..self.inner.rows)
    }

    /// Rows `rows` of the weights as f32 `[rows.len(), in]`, computed with burn ops on the
    /// device (only those rows' codes are decoded).
    pub fn dequantize_rows(&self, range: Range<usize>) -> Tensor<2> {
        let Inner {
            cols, group, bits, ..
        } = *self.inner;
        let rows = range.len();
        let weights = self.device_weights();
        let device = weights.scales.device();
        let per_word = (32 / bits) as usize;
        let words = cols / per_word;
        let shifts: Vec<i32> = (0..per_word as i32).map(|i| i * bits as i32).collect();
        let shifts = Tensor::<1, Int>::from_data(TensorData::new(shifts, [per_word]), &device)
            .reshape([1, 1, per_word])
            .expand([rows, words, per_word]);
        let fields = weights
            .codes
            .clone()
            .narrow(0, range.start * words, rows * words)
            .reshape([rows, words, 1])
            .expand([rows, words, per_word])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar((1i64 << bits) - 1)
            .reshape([rows, cols]);
        let codes = if bits == 8 {
            // Two's complement bytes: 128..=255 stand for −128..=−1.
            let negative = fields.clone().greater_equal_elem(128).int() * 256;
            (fields - negative).float()
        } else {
            fields.float()
        };
        let groups = cols / group;
        let per_weight = |t: &Tensor<2>| {
            t.clone()
                .narrow(0, range.start, rows)
                .reshape([rows, groups, 1])
                .expand([rows, groups, group])
                .reshape([rows, cols])
        };
        codes * per_weight(&weights.scales) + per_weight(&weights.offsets)
    }

    pub(crate) fn device_weights(&self) -> &DeviceWeights {
        self.inner.on_device.get_or_init(|| {
            let host = self
                .inner
                .host
                .as_ref()
                .expect("quantized weights are either on the device or on the host");
            upload(host, &self.inner.device)
        })
    }
}

/// A LoRA update `scale · (input·a)·b` to add to a linear layer's output, `a` `[in, r]`,
/// `b` `[r, out]`. `input` is the adapter's own input (the layer's after dropout, while
/// training), or `None` for the layer's input itself: then the fused backward computes
/// both input gradients in one pass.
#[derive(Debug, Clone)]
pub struct LoraUpdate<const D: usize> {
    pub input: Option<Tensor<D>>,
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub scale: f32,
}

impl<const D: usize> LoraUpdate<D> {
    /// The update of the layer input `x` computed with burn ops (the reference of the
    /// fused kernels).
    pub fn apply(self, x: Tensor<D>) -> Tensor<D> {
        let down = burn::tensor::module::linear(self.input.unwrap_or(x), self.a, None);
        burn::tensor::module::linear(down, self.b, None).mul_scalar(self.scale)
    }

    /// The same update on the input's `tokens` rows as a matrix.
    pub fn flatten(self, tokens: usize) -> LoraUpdate<2> {
        LoraUpdate {
            input: self.input.map(|input| {
                let width = input.dims()[D - 1];
                input.reshape([tokens, width])
            }),
            a: self.a,
            b: self.b,
            scale: self.scale,
        }
    }
}

/// Rows `rows` of a host matrix decoded to f32 `[rows.len(), cols]` on `device` (rayon).
fn decode_rows(host: &QuantizedMatrix, rows: Range<usize>, device: &Device) -> Tensor<2> {
    let shape = [rows.len(), host.cols];
    Tensor::from_data(TensorData::new(host.dequantize_rows(rows), shape), device)
}

fn upload(matrix: &QuantizedMatrix, device: &Device) -> DeviceWeights {
    let words: Vec<i32> = matrix.codes.iter().map(|&w| w as i32).collect();
    let groups = matrix.groups_per_row();
    let grid = |values: Vec<f32>| {
        Tensor::<2>::from_data(TensorData::new(values, [matrix.rows, groups]), device)
    };
    DeviceWeights {
        codes: Tensor::from_data(TensorData::new(words, [matrix.codes.len()]), device),
        scales: grid(matrix.scales.clone()),
        offsets: grid(
            matrix
                .offsets
                .clone()
                .unwrap_or_else(|| vec![0.0; matrix.scales.len()]),
        ),
    }
}

/// Whether `device` is one of the cube (GPU) backends.
fn is_gpu(device: &Device) -> bool {
    #[cfg(feature = "cube")]
    {
        crate::cube::is_cube(device) || crate::cube::is_autodiff_cube(device)
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        false
    }
}
