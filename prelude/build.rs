// Binaries and tests of this package find libtorch without LD_LIBRARY_PATH: torch-sys
// tells its direct dependents where the library lives, and we bake that into an rpath.
// The same place gives torch's C++ headers, against which csrc/ (kernels tch does not
// expose) is compiled.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo:rerun-if-changed=csrc/c10d_gloo.cpp");
    println!("cargo:rerun-if-changed=csrc/recompute.cpp");
    println!("cargo:rerun-if-changed=csrc/c10d_nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.hpp");
    println!("cargo::rustc-check-cfg=cfg(pivot_fused_optim)");
    println!("cargo::rustc-check-cfg=cfg(pivot_c10d_gloo)");
    println!("cargo::rustc-check-cfg=cfg(pivot_recompute)");
    println!("cargo::rustc-check-cfg=cfg(pivot_c10d_nccl)");
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
        if let Err(reason) = c10d_nccl(&include, Path::new(&lib)) {
            println!("cargo:warning=built without NCCL: {reason}");
            println!("cargo:rustc-env=PIVOT_NCCL_MISSING={reason}");
        }
    }
}

/// The c10d NCCL shim (data parallel on CUDA; feature `c10d`), built on any machine, GPU or not,
/// so a binary carried to a GPU machine has it. torch's ProcessGroupNCCL.hpp includes nccl.h (from
/// the nvidia-nccl-cu13 wheel, a torch dependency) and CUDA runtime headers (nvidia-cuda-runtime,
/// also one), which need crt/ and nv/ from nvidia-cuda-crt and nvidia-cuda-cccl
/// (prelude/requirements-cuda-headers.txt, `make cuda-headers`); all sit in site-packages/nvidia
/// next to torch, or under $PIVOT_CUDA_INCLUDE and $PIVOT_NCCL_INCLUDE.
///
/// The shim becomes a shared library linked to libtorch_cuda.so, which the crate embeds
/// (PIVOT_C10D_NCCL_SO) and dlopens only when a run asks for NCCL: linking it into the binary
/// would load the CUDA libraries (about a second) into every process, NCCL or not. Returns why
/// it was not built.
fn c10d_nccl(torch_include: &Path, lib: &Path) -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=PIVOT_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=PIVOT_NCCL_INCLUDE");
    let nvidia = lib.join("../../nvidia");
    let dir = |var: &str, default: PathBuf| std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    let (cuda, nccl) = (dir("PIVOT_CUDA_INCLUDE", nvidia.join("cu13/include")), dir("PIVOT_NCCL_INCLUDE", nvidia.join("nccl/include")));
    let needed = [
        (torch_include.join("torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"), "torch's c10d headers"),
        (nccl.join("nccl.h"), "the nvidia-nccl-cu13 wheel"),
        (cuda.join("cuda_runtime_api.h"), "the nvidia-cuda-runtime wheel"),
        (cuda.join("crt/host_config.h"), "the nvidia-cuda-crt wheel (`make cuda-headers`)"),
        (cuda.join("nv/target"), "the nvidia-cuda-cccl wheel (`make cuda-headers`)"),
    ];
    for (path, from) in &needed {
        println!("cargo:rerun-if-changed={}", path.display());
        if !path.exists() {
            return Err(format!("no {} (from {from})", path.display()));
        }
    }
    if !lib.join("libtorch_cuda.so").exists() {
        return Err(format!("no libtorch_cuda.so in {} (a CPU-only torch)", lib.display()));
    }
    let objects = cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(&cuda)
        .include(&nccl)
        .flag("-std=c++17")
        .flag("-Wno-interference-size")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag("-DUSE_C10D_NCCL")
        .file("csrc/c10d_nccl.cpp")
        .try_compile_intermediates()
        .map_err(|e| format!("compiling csrc/c10d_nccl.cpp failed: {e}"))?;
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?).join("libpivot_c10d_nccl.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    // --no-undefined: every symbol the shim uses must resolve against torch's libraries now,
    // not first on a GPU machine.
    let status = compiler
        .to_command()
        .arg("-shared")
        .arg("-o")
        .arg(&out)
        .args(&objects)
        .arg(format!("-L{}", lib.display()))
        .args(["-ltorch_cuda", "-ltorch_cpu", "-lc10_cuda", "-lc10", "-Wl,--no-undefined"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .map_err(|e| format!("linking the NCCL shim: {e}"))?;
    if !status.success() {
        return Err(format!("linking the NCCL shim failed ({status})"));
    }
    println!("cargo:rustc-env=PIVOT_C10D_NCCL_SO={}", out.display());
    println!("cargo:rustc-cfg=pivot_c10d_nccl");
    Ok(())
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
