//! Cell builds without cargo when only the cell's source changed.
//!
//! evcxr builds every cell with `cargo build` in the slot. With the prelude's ~200 dependencies,
//! cargo spends a third of a second fingerprinting them before it starts the one rustc that
//! matters (the cell crate `ctx`). Between two cells usually nothing but `src/lib.rs` changed, so
//! that rustc command, run again as it was, builds the new cell exactly as cargo would.
//!
//! evcxr offers no hook for its cargo command except one: with `:linker mold` it runs
//! `mold -run <cargo> <args>`, finding `mold` on PATH. The engine puts a link named `mold` to its
//! own executable first on PATH (`install`), so every cell build comes here (`shim_main`):
//! - A real cargo build runs with our executable as `RUSTC_WORKSPACE_WRAPPER` (the cell crate is
//!   the only workspace member, so dependencies build and fingerprint as before) and
//!   `PIVOT_FASTBUILD_RECORD` set: `wrapper_hook` records the cell crate's rustc invocation
//!   (arguments and environment) and runs it. The shim reads cargo's JSON on its way to evcxr:
//!   which crates were compiled, and the cell's shared object. When cargo compiled `ctx` and nothing
//!   else, the shim stores that invocation with what it depended on: cargo's arguments and
//!   environment, the bytes of Cargo.toml, Cargo.lock and .cargo/config.toml, the extern crates'
//!   files and their mtimes, and the time the build started (the sources of path dependencies must
//!   be older).
//! - The next build whose inputs are all unchanged runs the stored rustc invocation itself:
//!   rustc's JSON diagnostics reach evcxr on stderr as they do through cargo, and the shared
//!   object's path goes where evcxr looks for it first (`EVCXR_EXECUTION_SO_PATH`). Anything else
//!   (`check`, a new `:dep`, a changed lock or prelude, a missing record) runs real cargo.
//!
//! evcxr also runs `cargo metadata` for every `:dep` (against a stand-in Cargo.toml, to check that
//! the dependency resolves) and to list the dependencies' library names. With the prelude's graph
//! that resolution costs 2-3 CPU-seconds at every engine start (measured, benches/README.md). Its
//! answer depends only on cargo's arguments and environment, the manifest, the lock file, cargo's
//! configuration files and the path dependencies' workspaces, so a successful answer is kept
//! (`metadata_cached`) and given again while none of these changed. Failures are never kept.
//!
//! The cell crate is compiled without rustc's local ThinLTO (`-C lto=off`, added by
//! `wrapper_hook` to the cell's rustc only, so it is in the recorded invocation too). At
//! opt-level 2 rustc splits even a one-line cell into 16 codegen units and then runs ThinLTO
//! across them; the cell's code is a few small functions that call into the prelude's dylib, so
//! inlining between its own units buys nothing, and the ThinLTO pass was 0.078 s of a tensor
//! cell's 0.373 s rustc run (`-Z time-passes`, benches/README.md "Issue 16, session 14").
//! The opt-level itself and the prelude's build are unchanged. `PIVOT_CELL_THINLTO=1` keeps
//! rustc's default, for comparisons.
//!
//! Cargo's fingerprint of `ctx` goes stale on a replay; that costs nothing, because the next real
//! cargo build rebuilds `ctx` anyway (its source changed).
//!
//! Written here rather than with a crate: nothing on crates.io drives cargo from a recorded rustc
//! invocation, and the file format is private to this module (JSON through serde_json).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// The name evcxr runs for `:linker mold`.
pub const SHIM_NAME: &str = "mold";
/// Set (to anything): the cell crate keeps rustc's local ThinLTO between its codegen units.
pub const CELL_THINLTO_ENV: &str = "PIVOT_CELL_THINLTO";
/// Set on the real cargo run: the folder where the wrapper records what rustc compiled.
const RECORD_ENV: &str = "PIVOT_FASTBUILD_RECORD";
/// Set to anything to make every build run cargo (for comparisons and as an escape hatch).
pub const DISABLE_ENV: &str = "PIVOT_NO_FASTBUILD";
const STATE_FILE: &str = "pivot-fastbuild.json";
const METADATA_FILE: &str = "pivot-fastbuild-metadata.json";
/// Answers kept in METADATA_FILE (the validation and the library names of a few `:dep` sets).
const METADATA_KEPT: usize = 8;
const RECORD_DIR: &str = "pivot-fastbuild-record";
/// Jobserver hand-offs from cargo name descriptors that only exist inside a cargo run.
const DROPPED_ENV: [&str; 4] = ["CARGO_MAKEFLAGS", "MAKEFLAGS", "MFLAGS", RECORD_ENV];

/// Makes `mold` on PATH the executable `exe` (which calls `shim_hook`). Returns the folder to put
/// first on PATH.
pub fn install(cache_dir: &Path, exe: &Path) -> std::io::Result<PathBuf> {
    let exe = exe.canonicalize()?;
    let dir = cache_dir.join("fastbuild-bin").join(format!("{:x}", fnv(exe.as_os_str().as_encoded_bytes())));
    std::fs::create_dir_all(&dir)?;
    for name in [SHIM_NAME, crate::celllink::LINKER_NAME] {
        link_executable(&dir, name, &exe)?;
    }
    Ok(dir)
}

/// Makes `dir/name` a symbolic link to `exe` (canonical), unless it is one already. The link is
/// made beside it and renamed into place, so a process starting it never finds it half-made.
pub(crate) fn link_executable(dir: &Path, name: &str, exe: &Path) -> std::io::Result<()> {
    let link = dir.join(name);
    if std::fs::read_link(&link).ok().as_deref() != Some(exe) {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(exe, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    Ok(())
}

/// Call first in `main`: when this process was started as the `mold` shim, runs it and exits.
pub fn shim_hook() {
    crate::racargo::hook();
    let mut args = std::env::args_os();
    let name = args.next().and_then(|a0| Path::new(&a0).file_name().map(|n| n.to_owned()));
    if name.as_deref() == Some(crate::celllink::LINKER_NAME.as_ref()) {
        std::process::exit(crate::celllink::link_main(&args.collect::<Vec<_>>()));
    }
    if name.as_deref() != Some(SHIM_NAME.as_ref()) {
        return;
    }
    // cargo and everything it runs must see the user's cargo home, not rust-analyzer's stand-in.
    crate::racargo::restore_cargo_home();
    let rest: Vec<OsString> = args.collect();
    let code = match rest.split_first() {
        Some((flag, tail)) if flag == "-run" && !tail.is_empty() => shim_main(&tail[0], &tail[1..]),
        _ => {
            eprintln!("pivot: this `mold` only stands in for evcxr's `mold -run cargo ...`");
            2
        }
    };
    std::process::exit(code);
}

/// Call in `main` right after `shim_hook`: as cargo's workspace wrapper during a recorded build,
/// records the cell crate's rustc invocation, runs rustc, and exits.
pub fn wrapper_hook() {
    let Some(dir) = std::env::var_os(RECORD_ENV).map(PathBuf::from) else { return };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some((rustc, rest)) = args.split_first() else { return };
    let mut rest = rest.to_vec();
    let mut text: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    if text.windows(2).any(|w| w[0] == "--crate-name" && w[1] == "ctx") {
        // The cell links through `celllink`: this executable's `pivot-cc` link, which `install`
        // made beside the `mold` that runs this build.
        let linker = std::env::current_exe().ok().and_then(|exe| install(&crate::paths::cache_dir(), &exe).ok()).map(|d| d.join(crate::celllink::LINKER_NAME));
        let linker = linker.filter(|_| std::env::var_os(crate::celllink::DISABLE_ENV).is_none());
        let extra = cell_codegen_flags(&text, linker.as_deref(), std::env::var_os(CELL_THINLTO_ENV).is_none());
        rest.extend(extra.iter().map(OsString::from));
        text.extend(extra);
        let env: BTreeMap<String, String> = std::env::vars_os()
            .filter(|(k, _)| !DROPPED_ENV.iter().any(|d| k == d))
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect();
        let cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("ctx.json"), json!({ "args": text, "env": env, "cwd": cwd }).to_string());
    }
    let code = match Command::new(rustc).args(&rest).env_remove(RECORD_ENV).status() {
        Ok(s) => s.code().unwrap_or(101),
        Err(e) => {
            eprintln!("pivot: cannot run {}: {e}", Path::new(rustc).display());
            101
        }
    };
    std::process::exit(code);
}

/// The flags the cell crate's rustc gets on top of cargo's `args`: `-C linker=LINKER` unless a
/// linker is configured, and `-C lto=off` (when `no_thinlto`) unless an LTO mode is.
fn cell_codegen_flags(args: &[String], linker: Option<&Path>, no_thinlto: bool) -> Vec<String> {
    let configured = |key: &str| args.iter().any(|a| a.starts_with(key) || a.strip_prefix("-C").is_some_and(|f| f.starts_with(key)));
    let mut extra = Vec::new();
    if let (false, Some(linker)) = (configured("linker="), linker) {
        extra.extend(["-C".to_string(), format!("linker={}", linker.display())]);
    }
    if no_thinlto && !configured("lto") {
        extra.extend(["-C".to_string(), "lto=off".to_string()]);
    }
    extra
}

/// Appends `line` and a newline to `path`, creating it; a log that cannot be written is skipped.
pub(crate) fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

fn shim_main(cargo: &OsString, args: &[OsString]) -> i32 {
    let crate_dir = std::env::current_dir().unwrap_or_default();
    let _ = std::fs::remove_file(crate_dir.join("pivot-fastbuild.log"));
    let is_build = args.iter().any(|a| a == "build");
    if is_build && std::env::var_os(DISABLE_ENV).is_none() {
        match replay(&crate_dir, cargo, args) {
            Ok(code) => {
                note(&crate_dir, "replayed the recorded rustc invocation");
                return code;
            }
            Err(why) => note(&crate_dir, &format!("ran cargo: {why}")),
        }
    }
    if !is_build {
        if args.iter().any(|a| a == "metadata") && std::env::var_os(DISABLE_ENV).is_none() {
            return metadata_cached(&crate_dir, cargo, args);
        }
        return run_cargo(cargo, args, None);
    }
    let record_dir = crate_dir.join(RECORD_DIR);
    let _ = std::fs::remove_dir_all(&record_dir);
    let _ = std::fs::remove_file(crate_dir.join(STATE_FILE));
    let started = now_nanos();
    let code = run_cargo(cargo, args, Some(&record_dir));
    if code == 0 {
        match state_after_build(&crate_dir, cargo, args, &record_dir, started) {
            Some(state) => {
                let _ = std::fs::write(crate_dir.join(STATE_FILE), state.to_string());
            }
            None => {
                let crates = std::fs::read_to_string(record_dir.join("crates")).unwrap_or_default();
                note(&crate_dir, &format!("nothing recorded: cargo compiled [{}]", crates.lines().collect::<Vec<_>>().join(", ")));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&record_dir);
    code
}

/// Why the last build took the path it took, in the slot (`pivot-fastbuild.log`), for diagnosis.
fn note(crate_dir: &Path, line: &str) {
    append_line(&crate_dir.join("pivot-fastbuild.log"), line);
}

/// Runs cargo. When recording, our executable is the workspace wrapper, and cargo's stdout (JSON
/// messages, passed on unchanged) tells which crates it compiled and where the cell's shared
/// object is, written to `record/crates` and `record/so`.
fn run_cargo(cargo: &OsString, args: &[OsString], record: Option<&Path>) -> i32 {
    use std::io::{BufRead, Write};
    let mut cmd = Command::new(cargo);
    cmd.args(args);
    let exe = std::env::current_exe().ok();
    let recording = match (record, &exe) {
        (Some(dir), Some(exe)) if std::env::var_os("RUSTC_WORKSPACE_WRAPPER").is_none() => {
            let _ = std::fs::create_dir_all(dir);
            cmd.env(RECORD_ENV, dir).env("RUSTC_WORKSPACE_WRAPPER", exe).stdout(std::process::Stdio::piped());
            Some(dir)
        }
        _ => None,
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pivot: cannot run cargo ({}): {e}", Path::new(cargo).display());
            return 101;
        }
    };
    if let (Some(dir), Some(out)) = (recording, child.stdout.take()) {
        let mut crates = Vec::new();
        let mut so = None;
        let stdout = std::io::stdout();
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(msg) = serde_json::from_str::<Value>(&line) {
                if msg["reason"] == "compiler-artifact" && msg["fresh"] == false {
                    crates.push(msg["target"]["name"].as_str().unwrap_or("?").to_string());
                }
                if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "ctx" {
                    so = msg["filenames"].as_array().and_then(|f| f.iter().filter_map(Value::as_str).find(|f| f.ends_with(".so")).map(str::to_string));
                }
            }
            let mut lock = stdout.lock();
            let _ = writeln!(lock, "{line}");
        }
        let _ = std::fs::write(dir.join("crates"), crates.join("\n"));
        if let Some(so) = so {
            let _ = std::fs::write(dir.join("so"), so);
        }
    }
    match child.wait() {
        Ok(s) => s.code().unwrap_or(101),
        Err(_) => 101,
    }
}

/// What the build depended on, beyond the cell's source.
fn inputs(crate_dir: &Path, cargo: &OsString, args: &[OsString]) -> Value {
    let file = |name: &str| std::fs::read(crate_dir.join(name)).map(|b| format!("{:x}", fnv(&b))).unwrap_or_default();
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter(|(k, _)| !DROPPED_ENV.iter().any(|d| k == d))
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    // This executable records and rewrites the invocation (`wrapper_hook`): another build of it
    // may record another one.
    let exe = std::env::current_exe().ok().and_then(|p| std::fs::metadata(&p).ok().map(|m| format!("{} {} {:?}", p.display(), m.len(), m.modified().ok())));
    json!({
        "engine": exe,
        "cargo": cargo.to_string_lossy(),
        "args": args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "env": env,
        "cargo_toml": file("Cargo.toml"),
        "cargo_lock": file("Cargo.lock"),
        "config_toml": file(".cargo/config.toml"),
    })
}

fn state_after_build(crate_dir: &Path, cargo: &OsString, args: &[OsString], record_dir: &Path, started: u64) -> Option<Value> {
    let crates = std::fs::read_to_string(record_dir.join("crates")).ok()?;
    // Only a build that compiled the cell crate alone shows the dependencies settled.
    if crates.lines().any(|c| c != "ctx") || !crates.lines().any(|c| c == "ctx") {
        return None;
    }
    let ctx: Value = serde_json::from_str(&std::fs::read_to_string(record_dir.join("ctx.json")).ok()?).ok()?;
    let so = std::fs::read_to_string(record_dir.join("so")).ok()?;
    let rustc_args: Vec<String> = serde_json::from_value(ctx["args"].clone()).ok()?;
    Some(json!({
        "inputs": inputs(crate_dir, cargo, args),
        "externs": extern_stamps(&rustc_args)?,
        "path_deps": path_deps(crate_dir),
        "started": started,
        "ctx": ctx,
        "so": so,
    }))
}

/// `--extern name=file` of the rustc invocation, with each file's mtime: a rebuilt dependency
/// changes them.
fn extern_stamps(rustc_args: &[String]) -> Option<Value> {
    let mut out = BTreeMap::new();
    for w in rustc_args.windows(2).filter(|w| w[0] == "--extern") {
        if let Some((_, file)) = w[1].split_once('=') {
            out.insert(file.to_string(), mtime_nanos(Path::new(file))?);
        }
    }
    Some(json!(out))
}

/// Folders of `path = "..."` dependencies in the generated Cargo.toml (the prelude, `:dep`s).
fn path_deps(crate_dir: &Path) -> Vec<String> {
    let Ok(toml) = std::fs::read_to_string(crate_dir.join("Cargo.toml")) else { return vec![] };
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t.contains("dependencies");
            continue;
        }
        if !in_deps {
            continue;
        }
        let mut rest = t;
        while let Some(i) = rest.find("path") {
            rest = &rest[i + 4..];
            let after = rest.trim_start();
            if let Some(v) = after.strip_prefix('=').map(str::trim_start).and_then(|v| v.strip_prefix('"')) {
                if let Some(end) = v.find('"') {
                    out.push(v[..end].to_string());
                }
            }
        }
    }
    out
}

/// The newest mtime of a path dependency's files (its `target` and hidden folders aside).
fn newest_mtime(dir: &Path, depth: usize) -> u64 {
    let mut newest = mtime_nanos(dir).unwrap_or(0);
    let Ok(entries) = std::fs::read_dir(dir) else { return newest };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        let t = if ft.is_dir() && depth < 16 { newest_mtime(&e.path(), depth + 1) } else { mtime_nanos(&e.path()).unwrap_or(u64::MAX) };
        newest = newest.max(t);
    }
    newest
}

/// Replays the recorded rustc invocation when nothing but the cell's source changed. Err: why
/// cargo must run instead.
fn replay(crate_dir: &Path, cargo: &OsString, args: &[OsString]) -> Result<i32, String> {
    let text = std::fs::read_to_string(crate_dir.join(STATE_FILE)).map_err(|_| "no recorded build".to_string())?;
    let state: Value = serde_json::from_str(&text).map_err(|e| format!("unreadable record: {e}"))?;
    let bad = || "incomplete record".to_string();
    if state["inputs"] != inputs(crate_dir, cargo, args) {
        return Err("cargo's arguments, environment, Cargo.toml, Cargo.lock or config changed".into());
    }
    let externs = state["externs"].as_object().ok_or_else(bad)?;
    if let Some((file, _)) = externs.iter().find(|(file, t)| mtime_nanos(Path::new(file)) != t.as_u64()) {
        return Err(format!("{file} changed"));
    }
    let started = state["started"].as_u64().ok_or_else(bad)?;
    for dep in state["path_deps"].as_array().ok_or_else(bad)?.iter().filter_map(Value::as_str) {
        if newest_mtime(&crate_dir.join(dep), 0) >= started {
            return Err(format!("a file under {dep} changed"));
        }
    }
    let ctx = &state["ctx"];
    let rustc_args: Vec<String> = serde_json::from_value(ctx["args"].clone()).map_err(|_| bad())?;
    let env: BTreeMap<String, String> = serde_json::from_value(ctx["env"].clone()).map_err(|_| bad())?;
    // rustc writes the object into its --out-dir; cargo's path is the copy it makes outside `deps`.
    let so_name = Path::new(state["so"].as_str().ok_or_else(bad)?).file_name().ok_or_else(bad)?.to_owned();
    let out_dir = rustc_args.windows(2).find(|w| w[0] == "--out-dir").map(|w| PathBuf::from(&w[1])).ok_or_else(bad)?;
    let so = out_dir.join(so_name);
    let (rustc, rest) = rustc_args.split_first().ok_or_else(bad)?;
    let status = Command::new(rustc)
        .args(rest)
        .env_clear()
        .envs(&env)
        .current_dir(ctx["cwd"].as_str().filter(|c| !c.is_empty()).map(PathBuf::from).unwrap_or_else(|| crate_dir.to_path_buf()))
        .status()
        .map_err(|e| format!("cannot run {rustc}: {e}"))?;
    if status.success() {
        // evcxr reads the shared object's path from this file first (cargo's JSON otherwise).
        if let Some(file) = std::env::var_os("EVCXR_EXECUTION_SO_PATH") {
            std::fs::write(file, so.as_os_str().as_encoded_bytes()).map_err(|e| format!("cannot report the shared object: {e}"))?;
        }
    }
    Ok(status.code().unwrap_or(101))
}

/// What a `cargo metadata` answer depends on besides the path dependencies' files: cargo, its
/// arguments, the environment cargo reads (`CARGO*`, `RUST*`, PATH, HOME), the manifest and lock
/// file, and every cargo configuration file that applies (the crate's folder and its ancestors,
/// `$CARGO_HOME`). A fingerprint of all of it.
fn metadata_key(crate_dir: &Path, cargo: &std::ffi::OsStr, args: &[OsString]) -> String {
    let file = |p: &Path| std::fs::read(p).map(|b| format!("{:x}", fnv(&b))).unwrap_or_default();
    // The folder of this shim on PATH differs between front ends (one per executable) and is
    // nothing cargo uses: left out, so the kernel and the REPL share answers.
    let me = std::env::current_exe().ok().and_then(|e| e.canonicalize().ok());
    let not_shim = |d: &PathBuf| me.is_none() || d.join(SHIM_NAME).canonicalize().ok() != me;
    let env: BTreeMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            let v = if k == "PATH" { std::env::join_paths(std::env::split_paths(&v).filter(not_shim)).unwrap_or(v) } else { v };
            (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned())
        })
        .filter(|(k, _)| (k.starts_with("CARGO") || k.starts_with("RUST") || k == "PATH" || k == "HOME") && !DROPPED_ENV.iter().any(|d| k == d))
        .collect();
    let mut configs = BTreeMap::new();
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    for dir in crate_dir.ancestors().map(|d| d.join(".cargo")).chain(cargo_home) {
        for name in ["config", "config.toml"] {
            let p = dir.join(name);
            if p.exists() {
                configs.insert(p.display().to_string(), file(&p));
            }
        }
    }
    let key = json!({
        "cargo": cargo.to_string_lossy(),
        "args": args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
        "env": env,
        "cargo_toml": file(&crate_dir.join("Cargo.toml")),
        "cargo_lock": file(&crate_dir.join("Cargo.lock")),
        "configs": configs,
    });
    format!("{:x}", fnv(key.to_string().as_bytes()))
}

/// The folders whose files a path dependency's metadata comes from: the dependency's workspace
/// (the nearest ancestor whose Cargo.toml has a `[workspace]` table, as cargo finds it), which may
/// hold other path crates it uses; else the dependency's own folder.
fn path_dep_roots(crate_dir: &Path) -> Vec<PathBuf> {
    let is_workspace = |d: &Path| std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"));
    path_deps(crate_dir)
        .into_iter()
        .map(|d| {
            let dir = crate_dir.join(d);
            dir.ancestors().find(|a| is_workspace(a)).map(Path::to_path_buf).unwrap_or(dir)
        })
        .collect()
}

/// Runs `cargo metadata`, or gives the answer a run with the same inputs gave (see the module doc).
pub(crate) fn metadata_cached(crate_dir: &Path, cargo: &std::ffi::OsStr, args: &[OsString]) -> i32 {
    use std::io::Write;
    let key = metadata_key(crate_dir, cargo, args);
    let path = crate_dir.join(METADATA_FILE);
    let mut kept: Vec<Value> = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Some(hit) = kept.iter().find(|e| e["key"] == key.as_str()) {
        let started = hit["started"].as_u64().unwrap_or(0);
        let roots = path_dep_roots(crate_dir);
        if let Some(changed) = roots.iter().find(|r| newest_mtime(r, 0) >= started) {
            note(crate_dir, &format!("ran cargo metadata: a file under {} changed", changed.display()));
        } else if let (Some(out), Some(err)) = (hit["stdout"].as_str(), hit["stderr"].as_str()) {
            note(crate_dir, "answered cargo metadata as before (same inputs)");
            let _ = std::io::stdout().lock().write_all(out.as_bytes());
            let _ = std::io::stderr().lock().write_all(err.as_bytes());
            return 0;
        }
    }
    let started = now_nanos();
    let out = match Command::new(cargo).args(args).stdin(std::process::Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pivot: cannot run cargo ({}): {e}", Path::new(cargo).display());
            return 101;
        }
    };
    let _ = std::io::stdout().lock().write_all(&out.stdout);
    let _ = std::io::stderr().lock().write_all(&out.stderr);
    if let (true, Ok(stdout), Ok(stderr)) = (out.status.success(), std::str::from_utf8(&out.stdout), std::str::from_utf8(&out.stderr)) {
        kept.retain(|e| e["key"] != key.as_str());
        kept.insert(0, json!({ "key": key, "started": started, "stdout": stdout, "stderr": stderr }));
        kept.truncate(METADATA_KEPT);
        let tmp = crate_dir.join(format!(".{METADATA_FILE}.{}", std::process::id()));
        if std::fs::write(&tmp, Value::Array(kept).to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    out.status.code().unwrap_or(101)
}

/// Nanoseconds since the epoch, as integers: serde_json does not round-trip every f64 exactly.
fn mtime_nanos(p: &Path) -> Option<u64> {
    let m = std::fs::metadata(p).ok()?.modified().ok()?;
    u64::try_from(m.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_nanos()).ok()).unwrap_or(0)
}

/// FNV-1a: a stable fingerprint of small files, not a defence against anyone.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cell_gets_our_linker_and_no_thinlto_unless_configured() {
        let cargo = |extra: &[&str]| -> Vec<String> {
            ["rustc", "--crate-name", "ctx", "-C", "opt-level=2"].iter().chain(extra).map(|a| a.to_string()).collect()
        };
        let linker = Path::new("/cache/fastbuild-bin/x/pivot-cc");
        assert_eq!(cell_codegen_flags(&cargo(&[]), Some(linker), true), ["-C", "linker=/cache/fastbuild-bin/x/pivot-cc", "-C", "lto=off"]);
        assert_eq!(cell_codegen_flags(&cargo(&[]), None, false), Vec::<String>::new());
        assert_eq!(cell_codegen_flags(&cargo(&["-C", "linker=clang"]), Some(linker), true), ["-C", "lto=off"]);
        assert_eq!(cell_codegen_flags(&cargo(&["-Clinker=clang", "-Clto=fat"]), Some(linker), true), Vec::<String>::new());
        assert_eq!(cell_codegen_flags(&cargo(&["-C", "lto"]), None, true), Vec::<String>::new());
    }

    #[test]
    fn path_dependencies_are_found_in_the_dependency_tables_only() {
        let dir = std::env::temp_dir().join(format!("pivot-fastbuild-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            "[package]\nname = \"ctx\"\n[lib]\npath = \"src/lib.rs\"\n[dependencies]\npivot = { path = \"/w/prelude\" }\nrand = \"0.9\"\nfoo = { version = \"1\", path = \"../foo\" }\n",
        )
        .unwrap();
        assert_eq!(path_deps(&dir), vec!["/w/prelude".to_string(), "../foo".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn externs_are_stamped_and_a_missing_one_refuses() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let args = vec!["rustc".to_string(), "--extern".into(), format!("me={exe}")];
        let stamps = extern_stamps(&args).unwrap();
        assert!(stamps[&exe].as_u64().unwrap() > 0);
        assert!(extern_stamps(&["--extern".to_string(), "gone=/nonexistent/libgone.rlib".into()]).is_none());
    }

    #[test]
    fn cargo_metadata_is_answered_again_only_while_its_inputs_are_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("pivot-fastbuild-meta-{}", std::process::id()));
        let (slot, ws) = (root.join("slot"), root.join("ws"));
        std::fs::create_dir_all(ws.join("dep/src")).unwrap();
        std::fs::create_dir_all(&slot).unwrap();
        std::fs::write(ws.join("Cargo.toml"), "[workspace]\nmembers = [\"dep\"]\n").unwrap();
        std::fs::write(ws.join("dep/Cargo.toml"), "[package]\nname = \"dep\"\n").unwrap();
        let manifest = format!("[package]\nname = \"ctx\"\n[dependencies]\ndep = {{ path = {:?} }}\n", ws.join("dep").display().to_string());
        std::fs::write(slot.join("Cargo.toml"), &manifest).unwrap();
        // A stand-in cargo that counts its runs and fails while a FAIL file exists.
        let cargo = root.join("cargo");
        let runs = root.join("runs");
        std::fs::write(&cargo, format!("#!/bin/sh\necho run >> {0}\necho '{{}}'\n[ -e {1} ] && exit 3\nexit 0\n", runs.display(), root.join("FAIL").display())).unwrap();
        std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
        let count = || std::fs::read_to_string(&runs).map(|t| t.lines().count()).unwrap_or(0);
        let args: Vec<OsString> = vec!["--offline".into(), "metadata".into(), "--format-version=1".into()];
        let cargo = cargo.into_os_string();
        std::fs::write(root.join("FAIL"), "").unwrap();
        assert_eq!(metadata_cached(&slot, &cargo, &args), 3);
        assert_eq!(metadata_cached(&slot, &cargo, &args), 3, "a failure is never kept");
        assert_eq!(count(), 2);
        std::fs::remove_file(root.join("FAIL")).unwrap();
        assert_eq!(metadata_cached(&slot, &cargo, &args), 0);
        assert_eq!(metadata_cached(&slot, &cargo, &args), 0);
        assert_eq!(count(), 3, "the second run is answered from the record");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(ws.join("dep/src/lib.rs"), "pub fn f() {}").unwrap();
        assert_eq!(metadata_cached(&slot, &cargo, &args), 0);
        assert_eq!(count(), 4, "a new file in the dependency's workspace runs cargo");
        std::fs::write(slot.join("Cargo.toml"), manifest + "# changed\n").unwrap();
        assert_eq!(metadata_cached(&slot, &cargo, &args), 0);
        assert_eq!(count(), 5, "a changed manifest runs cargo");
        let other: Vec<OsString> = vec!["metadata".into(), "--format-version".into(), "1".into()];
        assert_eq!(metadata_cached(&slot, &cargo, &other), 0);
        assert_eq!(count(), 6, "other arguments run cargo");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
