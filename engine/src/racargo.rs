//! The `cargo` that evcxr's rust-analyzer runs: it answers `cargo metadata` without the
//! dependencies, so that analysis covers only the cell crate and the standard library.
//!
//! evcxr asks its rust-analyzer for the types of a cell's new `let`s before every build, and loads
//! the whole crate graph (the prelude and its ~230 dependencies) into one *local* source root. Each
//! edit of the cell then makes rust-analyzer re-verify every memo it holds over those crates:
//! 0.11 s for a trivial cell and 0.5 s for a `let` (`examples/ra_durability.rs`,
//! benches/README.md "Issue 16, session 15"). The engine's own analysis (`analysis`) loads the
//! same graph with the dependencies as *library* roots, names the types of the cell's `let`s, and
//! writes them into the cell; evcxr's rust-analyzer then needs nothing from the dependencies, since
//! evcxr takes a `let`'s written type as it stands.
//!
//! evcxr offers no hook for its rust-analyzer's workspace. rust-analyzer runs
//! `$CARGO_HOME/bin/cargo metadata` (it prefers the rustup proxy there to PATH), so
//! `prepare_process_env` points `CARGO_HOME` at a folder whose `bin/cargo` is our executable and
//! keeps the real value in `REAL_CARGO_HOME_ENV`. That executable (`hook`) puts the real
//! `CARGO_HOME` back and runs the real cargo; for `metadata` it adds `--no-deps`, unless the
//! caller is our own analysis (`FULL_GRAPH_ENV`), whose answer goes through the slot's metadata
//! cache (`fastbuild::metadata_cached`). Every other process the engine starts gets the real
//! `CARGO_HOME` too: evcxr's cargo runs pass through our `mold` shim, which restores it first
//! (`restore_cargo_home`), and the evcxr child is started with it.
//!
//! `PIVOT_EVCXR_ANALYSIS=1` leaves all of this off (evcxr's rust-analyzer sees the whole graph and
//! names the types itself, as before), for side-by-side measurements and as an escape hatch.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The value `CARGO_HOME` had before the engine replaced it ("" when it was unset).
pub const REAL_CARGO_HOME_ENV: &str = "PIVOT_REAL_CARGO_HOME";
/// Set by our own analysis on its `cargo metadata`: answer with the whole graph.
pub const FULL_GRAPH_ENV: &str = "PIVOT_RA_FULL_GRAPH";
/// Set (to anything): evcxr's rust-analyzer sees the whole graph and names types itself.
pub const EVCXR_ANALYSIS_ENV: &str = "PIVOT_EVCXR_ANALYSIS";

/// True when this engine names the types of cells' `let`s itself (the default).
pub fn own_analysis() -> bool {
    std::env::var_os(EVCXR_ANALYSIS_ENV).is_none()
}

/// Makes `<shim_dir>/cargo-home/bin/cargo` our executable `exe`; returns that `cargo-home`.
pub fn install(shim_dir: &Path, exe: &Path) -> std::io::Result<PathBuf> {
    let exe = exe.canonicalize()?;
    let home = shim_dir.join("cargo-home");
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin)?;
    crate::fastbuild::link_executable(&bin, "cargo", &exe)?;
    Ok(home)
}

/// The `CARGO_HOME` every process but rust-analyzer's cargo must see: `None` when it was unset.
pub fn real_cargo_home() -> Option<Option<OsString>> {
    let v = std::env::var_os(REAL_CARGO_HOME_ENV)?;
    Some(if v.is_empty() { None } else { Some(v) })
}

/// Puts the real `CARGO_HOME` back in this process's environment. Call only while the process
/// is single-threaded (the start of a shim's `main`).
pub fn restore_cargo_home() {
    let Some(real) = real_cargo_home() else { return };
    // SAFETY: documented requirement: no other thread runs yet.
    unsafe {
        match real {
            Some(v) => std::env::set_var("CARGO_HOME", v),
            None => std::env::remove_var("CARGO_HOME"),
        }
        std::env::remove_var(REAL_CARGO_HOME_ENV);
    }
}

/// Gives `cmd` the real `CARGO_HOME` (for processes the engine starts itself).
pub fn with_real_cargo_home(cmd: &mut Command) {
    if let Some(real) = real_cargo_home() {
        match real {
            Some(v) => cmd.env("CARGO_HOME", v),
            None => cmd.env_remove("CARGO_HOME"),
        };
        cmd.env_remove(REAL_CARGO_HOME_ENV);
    }
}

/// Call in `main` after `fastbuild::shim_hook`: when this process runs as rust-analyzer's
/// `cargo`, does the job of it (module doc) and exits.
pub fn hook() {
    let mut args = std::env::args_os();
    let a0 = args.next().unwrap_or_default();
    if Path::new(&a0).file_name() != Some("cargo".as_ref()) || std::env::var_os(REAL_CARGO_HOME_ENV).is_none() {
        return;
    }
    let fake_bin = Path::new(&a0).parent().map(Path::to_path_buf);
    restore_cargo_home();
    let cargo = real_cargo(fake_bin.as_deref());
    let mut args: Vec<OsString> = args.collect();
    // Only the cell crate's graph is cut: rust-analyzer also runs `cargo metadata` on the
    // standard library's workspace, which it needs whole.
    let slot = std::env::var_os("EVCXR_TMPDIR").map(PathBuf::from);
    let manifest = args.iter().position(|a| a == "--manifest-path").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let of_slot = match (&slot, &manifest) {
        (Some(slot), Some(m)) => m.parent() == Some(slot.as_path()),
        _ => false,
    };
    let is_metadata = of_slot && args.iter().any(|a| a == "metadata");
    let code = if is_metadata && std::env::var_os(FULL_GRAPH_ENV).is_some() {
        let slot = slot.unwrap_or_default();
        crate::fastbuild::metadata_cached(&slot, cargo.as_os_str(), &args)
    } else {
        if is_metadata && !args.iter().any(|a| a == "--no-deps") {
            args.push("--no-deps".into());
        }
        match Command::new(&cargo).args(&args).env_remove(FULL_GRAPH_ENV).status() {
            Ok(s) => s.code().unwrap_or(101),
            Err(e) => {
                eprintln!("pivot: cannot run cargo ({}): {e}", cargo.display());
                101
            }
        }
    };
    std::process::exit(code);
}

/// The cargo rust-analyzer would have run: `$CARGO_HOME/bin/cargo`, else `$CARGO`, else the first
/// `cargo` on PATH that is not this stand-in.
fn real_cargo(fake_bin: Option<&Path>) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let me = std::env::current_exe().ok().and_then(|e| e.canonicalize().ok());
    let usable = |p: &Path| p.is_file() && (me.is_none() || p.canonicalize().ok() != me);
    if let Some(p) = home.map(|h| h.join("bin/cargo")).filter(|p| usable(p)) {
        return p;
    }
    if let Some(p) = std::env::var_os("CARGO").map(PathBuf::from).filter(|p| usable(p)) {
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|d| Some(d.as_path()) != fake_bin)
        .map(|d| d.join("cargo"))
        .find(|p| usable(p))
        .unwrap_or_else(|| PathBuf::from("cargo"))
}
