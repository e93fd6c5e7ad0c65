//! Device selection that actually sees the GPU.
//!
//! `tch::Cuda::is_available()` answers false unless `libtorch_cuda.so` is loaded into the
//! process, and nothing links it for binaries and evcxr cells that never reference a CUDA symbol
//! (tch-rs #329, #907). We load it ourselves, once, from the libtorch we were built against.

use std::sync::OnceLock;
use tch::Device;

/// Loads libtorch_cuda.so (RTLD_GLOBAL) once; whether it is loaded.
pub(crate) fn load_cuda_runtime() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let mut candidates: Vec<String> = Vec::new();
        if let Ok(dir) = std::env::var("LIBTORCH") {
            candidates.push(format!("{dir}/lib/libtorch_cuda.so"));
        }
        if let Some(dir) = option_env!("PIVOT_LIBTORCH_LIB") {
            candidates.push(format!("{dir}/libtorch_cuda.so"));
        }
        candidates.push("libtorch_cuda.so".to_string());
        candidates.iter().any(|path| {
            let Ok(c) = std::ffi::CString::new(path.as_str()) else { return false };
            // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            !handle.is_null()
        })
    })
}

/// True when a CUDA device can be used (loads libtorch's CUDA backend first).
pub fn cuda_available() -> bool {
    load_cuda_runtime() && tch::Cuda::is_available()
}

/// `Device::Cuda(0)` when a GPU is usable, else `Device::Cpu`.
pub fn cuda_if_available() -> Device {
    if cuda_available() { Device::Cuda(0) } else { Device::Cpu }
}
