//! Where the prelude, Python/libtorch, caches and our evcxr config live.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The prelude crate: `PIVOT_PRELUDE`, else the source tree this binary was built from.
pub fn prelude_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PIVOT_PRELUDE") {
        return PathBuf::from(p);
    }
    let built = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../prelude"));
    built.canonicalize().unwrap_or_else(|_| built.to_path_buf())
}

/// The `:dep` spec through which cells get the prelude: its `dylib` wrapper (`prelude/dylib`, one
/// shared library that each cell links in milliseconds) where the prelude has one, else the
/// prelude's rlib itself, as with `PIVOT_PRELUDE_STATIC=1` (cells then link ~210 rlibs each).
pub fn prelude_dep(prelude_dir: &Path) -> String {
    let dylib = prelude_dir.join("dylib");
    if std::env::var_os("PIVOT_PRELUDE_STATIC").is_none() && dylib.join("Cargo.toml").is_file() {
        format!("pivot = {{ path = {:?}, package = \"pivot-dylib\" }}", dylib.display().to_string())
    } else {
        format!("pivot = {{ path = {:?} }}", prelude_dir.display().to_string())
    }
}

/// Where cargo puts a build slot's dependencies (the prelude's dylib among them), given the
/// standard library's directory `rustc --print target-libdir` (`…/rustlib/<host>/lib`): evcxr
/// builds for the host triple into `<slot>/target/<host>/debug/deps`.
pub fn slot_deps_dir(slot_dir: &Path, std_lib_dir: &Path) -> Option<PathBuf> {
    let host = std_lib_dir.parent()?.file_name()?;
    Some(slot_dir.join("target").join(host).join("debug").join("deps"))
}

/// The Python that has torch: `PIVOT_PYTHON`, else the workspace's `.venv` next to the prelude,
/// else `$VIRTUAL_ENV/bin/python`, else `python3` on PATH.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PIVOT_PYTHON") {
        return PathBuf::from(p);
    }
    if let Some(root) = prelude_dir().parent() {
        let venv = root.join(".venv/bin/python");
        if venv.exists() {
            return venv;
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        let p = PathBuf::from(v).join("bin/python");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("python3")
}

/// How libtorch is found, for building (torch-sys) and for running (the child's library path).
#[derive(Debug, Clone)]
pub struct Torch {
    /// Directory containing libtorch*.so.
    pub lib_dir: PathBuf,
    /// Build environment for torch-sys.
    pub build_env: Vec<(String, String)>,
}

pub fn torch() -> anyhow::Result<Torch> {
    // An explicit LIBTORCH wins, as it does for torch-sys.
    if let Ok(l) = std::env::var("LIBTORCH") {
        if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
            return Ok(Torch { lib_dir: PathBuf::from(&l).join("lib"), build_env: vec![("LIBTORCH".into(), l)] });
        }
    }
    let py = python();
    let torch_dir = torch_package_dir(&py)?;
    // torch-sys runs `python3` from PATH when LIBTORCH_USE_PYTORCH is set: ours must come first.
    // `prepare_process_env` puts it first in this process's PATH, which cargo inherits; only where
    // that did not happen does the build get its own PATH, because a command with PATH in its
    // environment and a bare program name (evcxr's `cargo`, our `mold`) makes std fork instead of
    // posix_spawn, and forking the engine (gigabytes of rust-analyzer state) cost every cell
    // ~0.1 CPU-s of page-table copies and copy-on-write faults. Either way cargo sees the same
    // PATH at every start (torch-sys's fingerprint).
    let mut build_env = vec![("LIBTORCH_USE_PYTORCH".to_string(), "1".to_string())];
    let path = std::env::var("PATH").unwrap_or_default();
    if let Some(path) = python_first_on_path(&py, &path) {
        build_env.push(("PATH".into(), path));
    }
    Ok(Torch { lib_dir: torch_dir.join("lib"), build_env })
}

/// `path` with `py`'s folder in front, or `None` when it is in front already.
pub fn python_first_on_path(py: &Path, path: &str) -> Option<String> {
    let bin = py.parent().filter(|b| !b.as_os_str().is_empty())?;
    if path.split(':').next() == Some(bin.to_str().unwrap_or("")) {
        None
    } else {
        Some(format!("{}:{path}", bin.display()))
    }
}

/// The folder of `py`'s torch package, checked to hold libtorch.
fn torch_package_dir(py: &Path) -> anyhow::Result<PathBuf> {
    // `find_spec` locates the package exactly as `import torch` would (same interpreter, same
    // sys.path) without running torch's __init__, which costs 2-3 CPU-seconds at every start.
    let out = Command::new(&py)
        .args(["-c", "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')"])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {} to find torch: {e}; set PIVOT_PYTHON or LIBTORCH", py.display()))?;
    let torch_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || torch_dir.as_os_str().is_empty() {
        anyhow::bail!(
            "{} has no torch package ({}); set PIVOT_PYTHON to a Python with torch==2.11.0, or LIBTORCH",
            py.display(),
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("not found on its sys.path")
        );
    }
    if !torch_dir.join("lib").join("libtorch_cpu.so").exists() {
        anyhow::bail!(
            "{} finds torch at {}, but {} has no libtorch_cpu.so (a torch without its C++ libraries?); set PIVOT_PYTHON or LIBTORCH",
            py.display(),
            torch_dir.display(),
            torch_dir.join("lib").display()
        );
    }
    Ok(torch_dir)
}

/// Root for build slots and other caches: `PIVOT_CACHE_DIR`, else `~/.cache/pivot-lab`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PIVOT_CACHE_DIR") {
        return PathBuf::from(p);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("pivot-lab")
}

/// Our own evcxr config dir, so a user's `~/.config/evcxr` (init.evcxr, prelude.rs) cannot
/// change the kernel.
pub fn evcxr_config_dir() -> PathBuf {
    cache_dir().join("evcxr-config")
}

/// Data dir for history files etc.
pub fn data_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PIVOT_DATA_DIR") {
        return PathBuf::from(p);
    }
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("pivot-lab")
}

/// Directory holding the toolchain's `libstd-*.so`. Cells link std dynamically and find it
/// through a relative RUNPATH computed for `target/…/deps`, but evcxr loads them from one level
/// up; that only happens to work when the slot shares no path prefix with the toolchain (the
/// default /tmp). Slots under the home directory need the child's library path instead.
pub fn rust_std_lib_dir() -> Option<PathBuf> {
    let out = Command::new("rustc").args(["--print", "target-libdir"]).output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.is_dir().then_some(dir)
}

/// `rustc --version` for kernel_info (cached by the caller).
pub fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_goes_first_on_path_once() {
        let py = Path::new("/venv/bin/python");
        assert_eq!(python_first_on_path(py, "/usr/bin:/bin").as_deref(), Some("/venv/bin:/usr/bin:/bin"));
        assert_eq!(python_first_on_path(py, "/venv/bin:/usr/bin"), None);
        assert_eq!(python_first_on_path(Path::new("python3"), "/usr/bin"), None);
    }

    #[test]
    fn cells_get_the_prelude_through_its_dylib_where_it_has_one() {
        let root = std::env::temp_dir().join(format!("pivot-prelude-dep-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        assert_eq!(prelude_dep(&root), format!("pivot = {{ path = {:?} }}", root.display().to_string()));
        std::fs::create_dir_all(root.join("dylib")).unwrap();
        std::fs::write(root.join("dylib/Cargo.toml"), "").unwrap();
        let dep = prelude_dep(&root);
        assert!(dep.contains("package = \"pivot-dylib\""), "{dep}");
        assert!(dep.contains(&root.join("dylib").display().to_string()), "{dep}");
        std::fs::remove_dir_all(&root).unwrap();
        let deps = slot_deps_dir(Path::new("/s/3"), Path::new("/tc/lib/rustlib/x86_64-unknown-linux-gnu/lib")).unwrap();
        assert_eq!(deps, Path::new("/s/3/target/x86_64-unknown-linux-gnu/debug/deps"));
    }

    /// A stand-in interpreter that prints `stdout` whatever it is asked.
    fn fake_python(dir: &Path, stdout: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let py = dir.join("python");
        std::fs::write(&py, format!("#!/bin/sh\necho '{stdout}'\n")).unwrap();
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).unwrap();
        py
    }

    #[test]
    fn a_python_without_torch_or_without_libtorch_is_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("pivot-paths-test-{}", std::process::id()));
        let py = fake_python(&dir.join("none"), "");
        let e = torch_package_dir(&py).unwrap_err().to_string();
        assert!(e.contains("has no torch package") && e.contains(&py.display().to_string()), "{e}");
        let pkg = dir.join("site-packages/torch");
        std::fs::create_dir_all(pkg.join("lib")).unwrap();
        let py = fake_python(&dir.join("nolib"), &pkg.display().to_string());
        let e = torch_package_dir(&py).unwrap_err().to_string();
        assert!(e.contains("has no libtorch_cpu.so") && e.contains(&pkg.display().to_string()), "{e}");
        std::fs::write(pkg.join("lib/libtorch_cpu.so"), b"").unwrap();
        assert_eq!(torch_package_dir(&py).unwrap(), pkg);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_python_is_a_clear_error() {
        let e = torch_package_dir(Path::new("/nonexistent/bin/python")).unwrap_err().to_string();
        assert!(e.contains("cannot run /nonexistent/bin/python"), "{e}");
    }
}
