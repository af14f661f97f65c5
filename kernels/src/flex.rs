//! Host access to flex tensors for the CPU kernels reached through burn's backend extension.

use burn::backend::DispatchDevice;
use burn::backend::flex::FlexTensor;
use burn::tensor::{Device, TensorData};

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
