//! Compiles `kernels/*.cu` to PTX with nvcc, only when the `cuda` feature is on (the CPU build
//! needs no CUDA toolkit). Each `kernels/NAME.cu` becomes `$OUT_DIR/NAME.ptx`, embedded by
//! `src/cuda/` with `include_str!`.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. The PTX targets the
//! virtual architecture `compute_$CUDA_COMPUTE_CAP` (default 80; the driver JIT-compiles it for
//! the GPU it runs on, which must be at least that). No `--use_fast_math` and no FMA
//! contraction: the kernels must round like their CPU twins (IEEE division and square root,
//! every product rounded), which costs nothing measurable in memory-bound elementwise code.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=OPTLAB_EMULATE_KERNELS");
    println!("cargo::rustc-check-cfg=cfg(optlab_emulate_kernels)");
    if std::env::var("OPTLAB_EMULATE_KERNELS").is_ok_and(|v| v == "1") {
        emulator();
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let arch = format!("-arch=compute_{}", if cap.is_empty() { "80" } else { &cap });
    // The toolkit release, for the run's env.json (`DeviceInfo::cuda_toolkit`).
    if let Ok(out) = Command::new(&nvcc).arg("--version").output() {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(release) = text
            .split([',', '\n'])
            .find_map(|part| part.trim().strip_prefix("release "))
        {
            println!("cargo:rustc-env=OPTLAB_NVCC_RELEASE={}", release.trim());
        }
    }

    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ folder")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel name");
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", &arch, "-O3", "-std=c++17", "--fmad=false"])
            .args(["-Ikernels", "-o"])
            .arg(&ptx)
            .arg(src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); with the `cuda` feature a CUDA toolkit is needed: \
                     source scripts/cuda-env.sh",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}

/// Compiles `kernels/fused.cu` as host C++ (`kernels/emulate/host.cpp`) into a static library
/// and sets `cfg(optlab_emulate_kernels)`, for checking the kernels without a GPU
/// (src/launch/emulate.rs). Needs a C++17 compiler (`$CXX`, else `c++`) and `ar`.
fn emulator() {
    println!("cargo:rerun-if-env-changed=CXX");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let obj = out.join("fused_host.o");
    // -ffp-contract=off: no fused multiply-add, as in the CUDA build (--fmad=false).
    let status = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-fPIC",
            "-pthread",
            "-c",
        ])
        .arg("kernels/emulate/host.cpp")
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| panic!("OPTLAB_EMULATE_KERNELS=1 needs a C++ compiler ({cxx}): {e}"));
    assert!(status.success(), "{cxx} failed on kernels/emulate/host.cpp");
    let lib = out.join("liboptlab_fused_host.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(&lib)
        .arg(&obj)
        .status()
        .expect("ar");
    assert!(status.success(), "ar failed");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=optlab_fused_host");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-cfg=optlab_emulate_kernels");
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
