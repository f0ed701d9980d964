//! Brings up libtorch's CUDA backend, which the linker otherwise drops.
//!
//! rustc links with `--as-needed`, so `libtorch_cuda.so` never becomes a dependency of a tch binary
//! and CUDA is silently missing even against a CUDA libtorch. `init` finds the folder of the loaded
//! `libtorch_cpu.so` and loads `libtorch_cuda.so` from beside it, globally, for good. A binary of its own
//! (a benchmark, a plugin's tool) calls `device("cuda")`, or `init()`, before asking tch about CUDA;
//! plugins need nothing: the host has done it.

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

/// What start-up found out about CUDA, for `--version` and for a clear `--device cuda` error.
#[derive(Debug, Clone)]
pub enum CudaBackend {
    Loaded { path: PathBuf },
    /// The libtorch in use is a CPU build (e.g. scalpel's slim install).
    Absent { libtorch: Option<PathBuf> },
    Failed { path: PathBuf, error: String },
}

static BACKEND: OnceLock<CudaBackend> = OnceLock::new();

/// Loads the CUDA backend if the libtorch in use has one. Idempotent.
pub fn init() -> &'static CudaBackend {
    BACKEND.get_or_init(|| {
        let Some(dir) = libtorch_dir() else { return CudaBackend::Absent { libtorch: None } };
        let path = dir.join("libtorch_cuda.so");
        if !path.exists() {
            return CudaBackend::Absent { libtorch: Some(dir) };
        }
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: libtorch_cuda's initialisers only register CUDA kernels with the loaded libtorch.
        match unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
            Ok(lib) => {
                std::mem::forget(lib); // never unloaded: libtorch keeps pointers into it
                CudaBackend::Loaded { path }
            }
            Err(e) => CudaBackend::Failed { path, error: e.to_string() },
        }
    })
}

/// The folder of the `libtorch_cpu.so` this process loaded.
pub fn libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| PathBuf::from(p).parent().map(|d| d.to_path_buf()))
}

/// Parses `cpu`, `cuda` or `cuda:N` into a device, with an explanation when CUDA cannot be had.
pub fn device(spec: &str) -> Result<tch::Device> {
    let index = match spec {
        "cpu" => return Ok(tch::Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("unknown device `{spec}`: use cpu, cuda or cuda:N"),
        },
    };
    match init() {
        CudaBackend::Absent { libtorch } => bail!(
            "--device {spec}: the libtorch in use ({}) is a CPU-only build without libtorch_cuda.so. \
             To run on a GPU, point LD_LIBRARY_PATH at the torch/lib folder of a PyTorch 2.11 CUDA install \
             (e.g. `export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib`)",
            libtorch.as_ref().map_or("not found".into(), |d| d.display().to_string())
        ),
        CudaBackend::Failed { path, error } => bail!("--device {spec}: loading {} failed: {error}", path.display()),
        CudaBackend::Loaded { .. } => {}
    }
    let count = tch::Cuda::device_count() as usize;
    if count == 0 {
        bail!("--device {spec}: libtorch has its CUDA backend but sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)");
    }
    if index >= count {
        bail!("--device {spec}: there are only {count} GPU(s), cuda:0..cuda:{}", count - 1);
    }
    Ok(tch::Device::Cuda(index))
}

/// One line on CUDA for `--version`: available (how many GPUs, from where), or why not.
pub fn describe() -> String {
    match init() {
        CudaBackend::Loaded { path } if tch::Cuda::is_available() => {
            format!("available ({} GPU(s), {})", tch::Cuda::device_count(), path.display())
        }
        CudaBackend::Loaded { .. } => "backend loaded, but no GPU visible".into(),
        CudaBackend::Absent { .. } => "not available (CPU-only libtorch)".into(),
        CudaBackend::Failed { error, .. } => format!("not available (loading libtorch_cuda.so failed: {error})"),
    }
}
