//! Choosing the compute device at run time among the backends compiled in.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// A backend moera can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Pure-Rust CPU backend.
    Flex,
    /// WGSL shaders through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// NVIDIA GPUs.
    Cuda,
}

impl DeviceKind {
    /// Every kind compiled into this build, best first.
    pub fn available() -> Vec<DeviceKind> {
        let mut kinds = Vec::new();
        if cfg!(feature = "cuda") {
            kinds.push(Self::Cuda);
        }
        if cfg!(feature = "wgpu") {
            kinds.push(Self::Wgpu);
        }
        if cfg!(feature = "flex") {
            kinds.push(Self::Flex);
        }
        kinds
    }

    /// The default: `MOERA_DEVICE` if set, else CUDA when compiled in, else flex. wgpu is
    /// only used when asked for, since it may silently run on a software rasterizer.
    pub fn default_kind() -> Result<DeviceKind> {
        if let Ok(name) = std::env::var("MOERA_DEVICE") {
            return name.parse();
        }
        if cfg!(feature = "cuda") {
            Ok(Self::Cuda)
        } else if cfg!(feature = "flex") {
            Ok(Self::Flex)
        } else {
            Self::available()
                .first()
                .copied()
                .ok_or_else(|| Error::DeviceUnavailable("any".into()))
        }
    }

    /// Opens the device (index 0 of its kind).
    pub fn device(self) -> Result<Device> {
        match self {
            #[cfg(feature = "flex")]
            Self::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "cuda")]
            Self::Cuda => Ok(Device::cuda(burn::tensor::DeviceIndex::Default)),
            #[allow(unreachable_patterns)]
            other => Err(Error::DeviceUnavailable(other.to_string())),
        }
    }
}

impl FromStr for DeviceKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "flex" | "cpu" => Ok(Self::Flex),
            "wgpu" | "gpu" | "vulkan" | "metal" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            _ => Err(Error::UnknownDevice(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flex => "flex",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}
