//! `env.json`: what produced a run (code version, library versions, machine, threads).

use serde::{Deserialize, Serialize};

use crate::runner::device::DeviceInfo;

/// The environment a run executed in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvInfo {
    /// `git rev-parse HEAD` of the source tree (or of the working directory), when available.
    pub git_commit: Option<String>,
    /// Whether `git status --porcelain` listed changes to tracked or untracked files.
    pub git_dirty: Option<bool>,
    /// optlab's version.
    pub optlab_version: String,
    /// candle-core's version (from the Cargo.lock optlab was built with).
    pub candle_version: String,
    /// Whether this is an optimized build.
    pub release_build: bool,
    /// Threads candle uses for CPU kernels.
    pub threads: usize,
    /// Logical CPUs available to the process.
    pub available_cpus: usize,
    /// The device: `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name, compute capability, memory, driver and CUDA versions (absent on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<DeviceInfo>,
    /// CPU model (from /proc/cpuinfo, Linux).
    pub cpu: Option<String>,
    /// CPU features candle was built with (`avx`, `f16c`, `neon`, `mkl`, `accelerate`), then
    /// those the CPU has that change how products round (`fma`, `avx2`, `avx512f`: see
    /// `docs/reproducibility.md`).
    pub cpu_features: Vec<String>,
    /// Operating system and architecture.
    pub os: String,
    /// The command line.
    pub command: Vec<String>,
    /// Seconds since the Unix epoch when the run (or its resumption) started.
    pub started_unix: u64,
    /// The step the run resumed from (absent for a fresh start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
}

const CARGO_LOCK: &str = include_str!("../../Cargo.lock");

/// The version of `package` recorded in the Cargo.lock optlab was built with.
pub fn locked_version(package: &str) -> Option<String> {
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = CARGO_LOCK.find(&needle)? + needle.len();
    let len = CARGO_LOCK[start..].find('"')?;
    Some(CARGO_LOCK[start..start + len].to_string())
}

fn git(args: &[&str]) -> Option<String> {
    let dirs = [
        Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        std::env::current_dir().ok(),
    ];
    for dir in dirs.into_iter().flatten() {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
    }
    None
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

impl EnvInfo {
    /// Captures the current environment of a run on `device`.
    pub fn capture(resumed_from_step: Option<u64>, device: &DeviceInfo) -> Self {
        use candle_core::utils;
        let mut cpu_features = Vec::new();
        for (on, name) in [
            (utils::with_avx(), "avx"),
            (utils::with_f16c(), "f16c"),
            (utils::with_neon(), "neon"),
            (utils::has_mkl(), "mkl"),
            (utils::has_accelerate(), "accelerate"),
        ] {
            if on {
                cpu_features.push(name.to_string());
            }
        }
        #[cfg(target_arch = "x86_64")]
        for (on, name) in [
            (std::arch::is_x86_feature_detected!("fma"), "fma"),
            (std::arch::is_x86_feature_detected!("avx2"), "avx2"),
            (std::arch::is_x86_feature_detected!("avx512f"), "avx512f"),
        ] {
            if on {
                cpu_features.push(name.to_string());
            }
        }
        Self {
            git_commit: git(&["rev-parse", "HEAD"]),
            git_dirty: git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
            optlab_version: env!("CARGO_PKG_VERSION").to_string(),
            candle_version: locked_version("candle-core").unwrap_or_else(|| "unknown".into()),
            release_build: !cfg!(debug_assertions),
            threads: utils::get_num_threads(),
            available_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            device: device.spec.clone(),
            gpu: (device.spec != "cpu").then(|| device.clone()),
            cpu: cpu_model(),
            cpu_features,
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            command: std::env::args().collect(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            resumed_from_step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_version_comes_from_the_lock_file() {
        let v = locked_version("candle-core").unwrap();
        assert!(v.starts_with("0.11"), "{v}");
        assert!(locked_version("no-such-crate").is_none());
        let cpu = DeviceInfo::capture(crate::runner::DeviceSpec::Cpu, &candle_core::Device::Cpu);
        let env = EnvInfo::capture(None, &cpu);
        assert_eq!(env.device, "cpu");
        assert!(env.gpu.is_none());
        assert!(env.threads >= 1);
    }
}
