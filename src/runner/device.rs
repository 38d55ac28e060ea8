//! Where a run trains: `device = "cpu" | "cuda" | "cuda:N"` in the run config.
//!
//! The device is not part of a run's identity: a checkpoint written on one device resumes on
//! another (checkpoints hold host bytes), and a sweep places the same run on whichever GPU is
//! free. Opening a CUDA device in a build without the `cuda` feature, or on a machine without a
//! usable GPU, is an error that names the fix.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A training device as the run config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The CPU (candle's CPU backend, `threads` worker threads).
    #[default]
    Cpu,
    /// CUDA device with this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }

    /// Opens the device. Errors name the field and the fix: a build without the `cuda`
    /// feature, or no usable GPU with this ordinal.
    pub fn open(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace when RUST_BACKTRACE is set: the first line is the cause.
        let cause = e.to_string();
        let cause = cause.lines().next().unwrap_or("unknown error");
        Error::config(
            "device",
            format!(
                "`cuda:{ordinal}` is not usable on this machine ({cause}); check the GPU and its \
                 driver (nvidia-smi, CUDA_VISIBLE_DEVICES), or train on the CPU with \
                 --set device=cpu"
            ),
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::config(
        "device",
        format!(
            "`cuda:{ordinal}` needs optlab built with the `cuda` feature (cargo build --release \
             --features cuda, see docs/cuda.md); this build runs on the CPU only: \
             --set device=cpu"
        ),
    ))
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::config(
                "device",
                format!("`{s}` is not a device: use \"cpu\", \"cuda\" or \"cuda:N\" (N = 0, 1, …)"),
            )
        };
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: Error| serde::de::Error::custom(e))
    }
}

/// What `env.json` records about the device a run trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub spec: String,
    /// The GPU's name (CUDA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Compute capability, e.g. `9.0` (CUDA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    /// Device memory in bytes (CUDA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The NVIDIA kernel driver's version, from `/proc/driver/nvidia/version` (CUDA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The CUDA version the driver supports (`cuDriverGetVersion`, e.g. `13.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_driver_api: Option<String>,
    /// The CUDA toolkit the kernels were compiled with (nvcc's release, at build time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_toolkit: Option<String>,
}

impl DeviceInfo {
    /// Describes `device` (opened from `spec`); fields that cannot be queried stay empty.
    pub fn capture(spec: DeviceSpec, device: &Device) -> Self {
        #[allow(unused_mut)] // filled in below with the `cuda` feature
        let mut info = DeviceInfo {
            spec: spec.to_string(),
            name: None,
            compute_capability: None,
            memory_bytes: None,
            driver: None,
            cuda_driver_api: None,
            cuda_toolkit: None,
        };
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let stream = dev.cuda_stream();
            let ctx = stream.context();
            info.name = ctx.name().ok();
            info.compute_capability = ctx
                .compute_capability()
                .ok()
                .map(|(major, minor)| format!("{major}.{minor}"));
            info.memory_bytes = ctx.total_mem().ok().map(|b| b as u64);
            info.cuda_driver_api = crate::cuda::driver_cuda_version();
            info.driver = nvidia_driver_version();
            info.cuda_toolkit = option_env!("OPTLAB_NVCC_RELEASE").map(str::to_string);
        }
        let _ = device;
        info
    }
}

/// The kernel driver's version from `/proc/driver/nvidia/version` (Linux), e.g. `580.95.05`.
#[cfg(feature = "cuda")]
fn nvidia_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu ..."
    line.split_whitespace()
        .find(|w| w.contains('.') && w.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:0", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let got: DeviceSpec = text.parse().unwrap();
            assert_eq!(got, spec, "{text}");
            assert_eq!(got.to_string(), shown);
            assert_eq!(shown.parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in [
            "", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "CPU", "cuda:+1",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("device") && e.contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cpu_always_opens() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        let info = DeviceInfo::capture(DeviceSpec::Cpu, &Device::Cpu);
        assert_eq!(info.spec, "cpu");
        assert!(info.name.is_none());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_fix() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(e.contains("device=cpu"), "{e}");
    }
}
