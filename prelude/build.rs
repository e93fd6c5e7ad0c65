// Binaries and tests of this package find libtorch without LD_LIBRARY_PATH: torch-sys
// tells its direct dependents where the library lives, and we bake that into an rpath.
// The same place gives torch's C++ headers, against which csrc/ (kernels tch does not
// expose) is compiled.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo::rustc-check-cfg=cfg(pivot_fused_optim)");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Exposed to the crate so the runtime can dlopen libtorch_cuda.so from the same place.
    println!("cargo:rustc-env=PIVOT_LIBTORCH_LIB={lib}");

    let include = Path::new(&lib).join("../include");
    if !include.join("ATen/ops/_fused_adamw.h").exists() {
        println!("cargo:warning=no ATen headers under {}: AdamW uses its unfused path", include.display());
        return;
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/fused_optim.cpp")
        .compile("pivot_fused_optim");
    println!("cargo:rustc-cfg=pivot_fused_optim");
}

/// The C++ ABI torch was built with, found the way torch-sys finds it (a mismatch fails at link
/// time, not silently).
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if let Ok(abi) = std::env::var("LIBTORCH_CXX11_ABI") {
        return abi;
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let out = std::process::Command::new(python)
            .args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output();
        if let Ok(out) = out {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if s == "0" || s == "1" {
                return s;
            }
        }
    }
    "1".into()
}
