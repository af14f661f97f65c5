//! Host access to flex tensors for the CPU kernels reached through burn's backend extension.

use burn::backend::DispatchDevice;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Device, TensorData};

use crate::cpu_gemm::View;
use crate::{Executor, executor};

/// Flex, with or without autodiff, on the fast path.
pub(crate) fn runs_fused(device: &Device) -> bool {
    if executor(device) != Executor::Cpu {
        return false;
    }
    #[allow(unreachable_patterns)] // flex and autodiff may be the only devices built
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        _ => false,
    }
}

/// The tensor's values in row-major order (copied only if it is a strided view).
pub(crate) fn host(t: &FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("made contiguous by `host`")
}

pub(crate) fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A matrix read in place when it is stored row by row or column by column (a transposed
/// view), else copied into rows.
pub(crate) struct Matrix {
    tensor: FlexTensor,
    offset: usize,
    rows: usize,
    cols: usize,
    strides: [usize; 2],
}

impl Matrix {
    pub(crate) fn new(t: &FlexTensor) -> Self {
        let layout = t.layout();
        let (rows, cols) = (layout.shape()[0], layout.shape()[1]);
        let strides = layout.strides();
        let in_place = match (usize::try_from(strides[0]), usize::try_from(strides[1])) {
            (Ok(row), Ok(col)) if (row, col) == (cols, 1) || (row, col) == (1, rows) => {
                Some([row, col])
            }
            _ => None,
        };
        match in_place {
            Some(strides) => Self {
                tensor: t.clone(),
                offset: layout.start_offset(),
                rows,
                cols,
                strides,
            },
            None => Self {
                tensor: host(t),
                offset: 0,
                rows,
                cols,
                strides: [cols, 1],
            },
        }
    }

    pub(crate) fn view(&self) -> View<'_> {
        let storage = match self.tensor.as_slice::<f32>() {
            Some(contiguous) => contiguous,
            None => &self.tensor.storage::<f32>()[self.offset..],
        };
        View::strided(
            storage,
            self.rows,
            self.cols,
            self.strides[0],
            self.strides[1],
        )
    }
}
