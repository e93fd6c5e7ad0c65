// Binaries and tests of this package find libtorch without LD_LIBRARY_PATH: torch-sys
// tells its direct dependents where the library lives, and we bake that into an rpath.
// The same place gives torch's C++ headers, against which csrc/ (kernels tch does not
// expose) is compiled.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo:rerun-if-changed=csrc/c10d_gloo.cpp");
    println!("cargo:rerun-if-changed=csrc/recompute.cpp");
    println!("cargo::rustc-check-cfg=cfg(pivot_fused_optim)");
    println!("cargo::rustc-check-cfg=cfg(pivot_c10d_gloo)");
    println!("cargo::rustc-check-cfg=cfg(pivot_recompute)");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    rust_std_rpath();
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
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/recompute.cpp")
        .compile("pivot_recompute");
    println!("cargo:rustc-cfg=pivot_recompute");
    if std::env::var_os("CARGO_FEATURE_C10D").is_some() {
        c10d_gloo(&include);
    }
}

/// The c10d Gloo shim (data parallel on CPU; feature `c10d`, which the kernel's build slots leave
/// off). torch's ProcessGroupGloo.hpp includes Gloo's own
/// headers, which the wheel lacks; they come from Debian's libgloo-dev (`make gloo`), found under
/// $PIVOT_GLOO_INCLUDE or /usr/include. Without them the prelude still builds and multi-rank runs
/// say why they cannot start. Gloo's code itself is inside libtorch_cpu: nothing more to link.
fn c10d_gloo(torch_include: &Path) {
    println!("cargo:rerun-if-env-changed=PIVOT_GLOO_INCLUDE");
    let gloo = std::env::var("PIVOT_GLOO_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    let header = Path::new(&gloo).join("gloo/algorithm.h");
    if !header.exists() {
        println!(
            "cargo:warning=no Gloo headers at {}: built without c10d data parallelism (run `make gloo`, i.e. apt-get install libgloo-dev, then rebuild)",
            header.display()
        );
        return;
    }
    println!("cargo:rerun-if-changed={}", header.display());
    let mut build = cc::Build::new();
    // -I/usr/include would reorder the system directories and break libstdc++'s #include_next.
    if Path::new(&gloo) != Path::new("/usr/include") {
        build.include(&gloo);
    }
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_GLOO")
        .file("csrc/c10d_gloo.cpp")
        .compile("pivot_c10d_gloo");
    println!("cargo:rustc-cfg=pivot_c10d_gloo");
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

/// The prelude's tests build with -Cprefer-dynamic (the kernel's slot flags), which links Rust's
/// std as a shared library; cargo finds it for test binaries, but torchrun starts `pivot-train`
/// directly. An rpath to the toolchain's std makes the binary start on its own.
fn rust_std_rpath() {
    let (Ok(rustc), Ok(target)) = (std::env::var("RUSTC"), std::env::var("TARGET")) else { return };
    let Ok(out) = std::process::Command::new(rustc).args(["--print", "sysroot"]).output() else { return };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let lib = Path::new(&sysroot).join("lib/rustlib").join(target).join("lib");
    if lib.is_dir() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", lib.display());
    }
}
