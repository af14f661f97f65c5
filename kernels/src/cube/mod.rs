//! The cubecl kernels, reached from burn tensors through a backend extension.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{DType, Device, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

mod qmatmul;

use crate::linear::DeviceWeights;

/// Whether `device` runs on a cubecl runtime (wgpu, cuda).
pub fn is_cube(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Cube(_))
}

/// The operations moera implements as cubecl kernels.
#[backend_extension(Cube)]
pub trait KernelOps: burn::backend::Backend {
    /// `x` `[m, k]` times the transposed quantized `[n, k]` matrix given by its packed
    /// `codes`, `scales` `[n, k / group]` and `offsets` (same shape).
    fn quant_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        offsets: FloatTensor<Self>,
        bits: u32,
        group: usize,
        has_offsets: bool,
    ) -> FloatTensor<Self>;
}

/// Up to this many tokens each output element gets its own reduction over `k` (decode);
/// above it, the tiled GEMM (prefill).
const GEMV_MAX_TOKENS: usize = 4;

impl KernelOps for Cube {
    fn quant_matmul(
        x: CubeTensor,
        codes: CubeTensor,
        scales: CubeTensor,
        offsets: CubeTensor,
        bits: u32,
        group: usize,
        has_offsets: bool,
    ) -> CubeTensor {
        assert_eq!(
            x.dtype,
            DType::F32,
            "quantized matmul takes f32 activations"
        );
        assert!(
            matches!(codes.dtype, DType::I32 | DType::U32),
            "quantized codes must be 32-bit words, found {:?}",
            codes.dtype
        );
        let x = into_contiguous(x);
        let (m, k) = (x.meta.shape()[0], x.meta.shape()[1]);
        let n = scales.meta.shape()[0];
        let out = empty_device::<f32>(x.client.clone(), x.device.clone(), [m, n].into());
        let client = x.client.clone();
        let per_word = 32 / bits as usize;
        let dims = qmatmul::Dims {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            group: group as u32,
        };
        if m <= GEMV_MAX_TOKENS || k % qmatmul::TILE_K as usize != 0 {
            let rows_per_cube = qmatmul::GEMV_ROWS as usize;
            let count = CubeCount::Static(n.div_ceil(rows_per_cube) as u32, m as u32, 1);
            let dim = CubeDim::new_2d(qmatmul::GEMV_LANES, qmatmul::GEMV_ROWS);
            debug_assert_eq!(k % per_word, 0);
            unsafe {
                qmatmul::qgemv_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    x.into_buffer_arg(),
                    codes.into_buffer_arg(),
                    scales.into_buffer_arg(),
                    offsets.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    dims.m,
                    dims.n,
                    dims.k,
                    dims.group,
                    bits,
                    has_offsets,
                );
            }
        } else {
            let tile = qmatmul::TILE as usize;
            let count = CubeCount::Static(n.div_ceil(tile) as u32, m.div_ceil(tile) as u32, 1);
            let dim = CubeDim::new_2d(qmatmul::THREADS_SIDE, qmatmul::THREADS_SIDE);
            unsafe {
                qmatmul::qgemm_kernel::launch_unchecked(
                    &client,
                    count,
                    dim,
                    x.into_buffer_arg(),
                    codes.into_buffer_arg(),
                    scales.into_buffer_arg(),
                    offsets.into_buffer_arg(),
                    out.clone().into_buffer_arg(),
                    dims.m,
                    dims.n,
                    dims.k,
                    dims.group,
                    bits,
                    has_offsets,
                );
            }
        }
        out
    }
}

/// [`KernelOps::quant_matmul`] on burn tensors.
pub fn quant_matmul(
    x: Tensor<2>,
    weights: &DeviceWeights,
    bits: u32,
    group: usize,
    has_offsets: bool,
) -> Tensor<2> {
    let out = <Dispatch as KernelOps>::quant_matmul(
        x.into_dispatch(),
        weights.codes.clone().into_dispatch(),
        weights.scales.clone().into_dispatch(),
        weights.offsets.clone().into_dispatch(),
        bits,
        group,
        has_offsets,
    );
    Tensor::from_dispatch(out)
}
