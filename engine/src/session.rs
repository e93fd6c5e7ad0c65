//! One evaluation session: an evcxr `CommandContext` with the prelude loaded, its output pump,
//! and cooperative interrupt. Front ends (Jupyter kernel, REPL, notebook runner) only translate
//! `Event`s and `CellResult`s into their own vocabulary.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evcxr::{CommandContext, EvalCallbacks, EvalContext, Theme};
use serde_json::{Map, Value};

use crate::output::{CellSignals, Event, Pump, Sink, StreamName};
use crate::paths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Jupyter,
    Repl,
}

impl Frontend {
    pub(crate) fn env_value(self) -> &'static str {
        match self {
            Frontend::Jupyter => "jupyter",
            Frontend::Repl => "repl",
        }
    }
}

#[derive(Clone)]
pub struct SessionOptions {
    pub frontend: Frontend,
    /// The evcxr child executable: must call `child::child_main` when `EVCXR_IS_RUNTIME` is set.
    pub child_exe: PathBuf,
    pub prelude_dir: PathBuf,
    /// Load the prelude at start (tests of the engine itself may skip it).
    pub preload: bool,
    /// Time between an interrupt and killing a cell that ignores it (the user is warned first,
    /// after `interrupt_warn`, and may then interrupt again to kill at once).
    pub interrupt_grace: Duration,
    /// Time after an interrupt at which a cell that has not stopped gets the warning.
    pub interrupt_warn: Duration,
    /// ariadne colours for compile errors: light backgrounds (Jupyter) or dark (terminals).
    pub dark_theme: bool,
}

impl SessionOptions {
    pub fn new(frontend: Frontend) -> anyhow::Result<Self> {
        let grace = std::env::var("PIVOT_INTERRUPT_GRACE_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|g| g.is_finite() && *g > 0.0)
            .unwrap_or(DEFAULT_INTERRUPT_GRACE_SECS);
        let interrupt_grace = Duration::from_secs_f64(grace);
        Ok(SessionOptions {
            frontend,
            child_exe: std::env::current_exe()?,
            prelude_dir: paths::prelude_dir(),
            preload: std::env::var_os("PIVOT_NO_PRELUDE").is_none(),
            interrupt_grace,
            interrupt_warn: warn_after(interrupt_grace),
            dark_theme: frontend != Frontend::Jupyter,
        })
    }
}

/// Default time a cell gets to stop after an interrupt before its process is restarted: long,
/// because the restart loses every variable, and every long prelude loop checks far more often.
pub const DEFAULT_INTERRUPT_GRACE_SECS: f64 = 30.0;

/// When the warning comes: 3 s after the interrupt (a cell that checks has stopped by then), or
/// a third of a shorter grace period.
pub fn warn_after(grace: Duration) -> Duration {
    (grace / 3).min(Duration::from_secs(3))
}

/// Set by `prepare_process_env` when the build shim is first on PATH.
const SHIM_ON_ENV: &str = "PIVOT_FASTBUILD_SHIM";

/// Sets the process environment evcxr reads while creating a context. Call from `main` while
/// the process is still single-threaded (setting the environment later races with getenv).
/// This executable must call `fastbuild::shim_hook` first thing in `main`.
pub fn prepare_process_env(slot_dir: &Path) {
    match std::env::current_exe() {
        Ok(exe) => prepare_process_env_for(slot_dir, &exe),
        Err(e) => {
            eprintln!("pivot: cell builds go through cargo every time (cannot find this executable: {e})");
            prepare_process_env_inner(slot_dir, None)
        }
    }
}

/// `prepare_process_env` where another executable (`shim_exe`, e.g. the kernel's, from a test)
/// runs the build shim.
pub fn prepare_process_env_for(slot_dir: &Path, shim_exe: &Path) {
    prepare_process_env_inner(slot_dir, Some(shim_exe))
}

fn prepare_process_env_inner(slot_dir: &Path, shim_exe: Option<&Path>) {
    let config = paths::evcxr_config_dir();
    let _ = std::fs::create_dir_all(&config);
    // The cargo stand-in (`fastbuild`) must come first on PATH: evcxr finds it there.
    let shim = match shim_exe {
        Some(exe) if std::env::var_os(crate::fastbuild::DISABLE_ENV).is_none() => Some(crate::fastbuild::install(&paths::cache_dir(), exe)),
        _ => None,
    };
    let shim_dir = match shim {
        None => None,
        Some(Ok(dir)) => Some(dir),
        Some(Err(e)) => {
            eprintln!("pivot: cell builds go through cargo every time (cannot install the build shim: {e})");
            None
        }
    };
    // evcxr's rust-analyzer gets a cargo that hides the dependencies (`racargo`); it needs the
    // build shim, through which evcxr's own cargo runs get the real `CARGO_HOME` back.
    let ra_home = match (&shim_dir, shim_exe) {
        (Some(dir), Some(exe)) if crate::racargo::own_analysis() => match crate::racargo::install(dir, exe) {
            Ok(home) => Some(home),
            Err(e) => {
                eprintln!("pivot: rust-analyzer in evcxr sees the whole crate graph (cannot install its cargo: {e})");
                None
            }
        },
        _ => None,
    };
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(dir) = &shim_dir {
        path = format!("{}:{path}", dir.display());
    }
    // Our Python in front of that (see `paths::torch`): cargo then needs no PATH of its own.
    if let Some(with_python) = paths::python_first_on_path(&paths::python(), &path) {
        path = with_python;
    }
    // SAFETY: called before any thread is started (documented requirement of this function).
    unsafe {
        std::env::set_var("EVCXR_TMPDIR", slot_dir);
        std::env::set_var("EVCXR_CONFIG_DIR", &config);
        std::env::set_var("PATH", &path);
        if shim_dir.is_some() {
            std::env::set_var(SHIM_ON_ENV, "1");
        }
        if let Some(home) = &ra_home {
            if std::env::var_os(crate::racargo::REAL_CARGO_HOME_ENV).is_none() {
                std::env::set_var(crate::racargo::REAL_CARGO_HOME_ENV, std::env::var_os("CARGO_HOME").unwrap_or_default());
            }
            std::env::set_var("CARGO_HOME", home);
        }
    }
}

/// A failed cell, ready to show: `ename`/`evalue` name it, `traceback` lines explain it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl CellError {
    pub fn new(ename: &str, evalue: impl Into<String>) -> Self {
        let evalue = evalue.into();
        CellError { ename: ename.to_string(), traceback: vec![format!("{ename}: {evalue}")], evalue }
    }
}

#[derive(Debug, Default, Clone)]
pub struct CellResult {
    /// Mime bundle of the final expression (`execute_result`).
    pub value: Option<Map<String, Value>>,
    pub error: Option<CellError>,
    /// The child process was restarted (all variables lost).
    pub restarted: bool,
    pub duration: Duration,
    /// Builds of the cell crate this cell took (0 for commands only; evcxr rebuilds after fixing
    /// what a failed build told it, e.g. the `Debug` fallback of a final expression).
    pub builds: usize,
    /// What evcxr fixed before each rebuild, in order (its phase names: "Fallback", "Captured
    /// value", ...): why `builds` is more than one.
    pub fixes: Vec<String>,
    /// Time the cell's own code ran in the child (evcxr's "Execution" phase), when it ran.
    pub run_time: Option<Duration>,
    /// Variables whose types the engine wrote into the cell for evcxr (`analysis`).
    pub typed: usize,
}

/// Sends interrupts to the running cell from any thread.
#[derive(Clone)]
pub struct Interrupter {
    inner: Arc<InterruptState>,
}

/// What an interrupt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptOutcome {
    /// No cell was running.
    Idle,
    /// The cell's build was stopped.
    CompileStopped,
    /// The cell was asked to stop (it will at its next `check_interrupt`).
    Requested,
    /// The cell had been warned about and is killed now (this was the second interrupt).
    Killed,
}

struct InterruptState {
    process: Arc<Mutex<std::process::Child>>,
    executing: AtomicBool,
    requested: AtomicBool,
    killed: AtomicBool,
    /// A watcher thread (warning, then kill) runs for the current cell.
    watching: AtomicBool,
    /// The warning for the current request is out: another interrupt kills at once.
    warned: AtomicBool,
    generation: AtomicU64,
    grace: Duration,
    warn_after: Duration,
    /// What the user does to interrupt again, for the warning.
    again: &'static str,
    /// Variables a restart would lose, named in the warning.
    variables: Mutex<Vec<String>>,
    /// The pump's notice channel: the warning reaches the front end in order with the output.
    notices: crossbeam_channel::Sender<Event>,
}

impl Interrupter {
    /// Asks the running cell to stop: cargo is stopped if it is compiling; the child gets SIGINT
    /// (the prelude's `check_interrupt` sees it). A cell still running `warn_after` later gets a
    /// warning on stderr: it will be killed when the grace period ends, losing every variable, or
    /// at once if the user interrupts again. No-op when nothing runs.
    pub fn interrupt(&self) -> InterruptOutcome {
        let s = &self.inner;
        if !s.executing.load(Ordering::SeqCst) {
            return InterruptOutcome::Idle;
        }
        if s.warned.load(Ordering::SeqCst) {
            if let Some(pid) = child_pid(&s.process) {
                s.killed.store(true, Ordering::SeqCst);
                // SAFETY: kill with a pid we own.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            return InterruptOutcome::Killed;
        }
        s.requested.store(true, Ordering::SeqCst);
        let generation = s.generation.load(Ordering::SeqCst);
        let compiling = kill_cargo_children();
        if let Some(pid) = child_pid(&s.process) {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        if compiling {
            return InterruptOutcome::CompileStopped;
        }
        if !s.watching.swap(true, Ordering::SeqCst) {
            let inner = self.inner.clone();
            let _ = std::thread::Builder::new().name("pivot-interrupt".into()).spawn(move || watch(&inner, generation));
        }
        InterruptOutcome::Requested
    }

    /// Ends the child process now (kernel shutdown).
    pub fn kill_child(&self) {
        if let Some(pid) = child_pid(&self.inner.process) {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// After an interrupt: warns about a cell that has not stopped, then kills it. Only a child that
/// runs user code counts: while evcxr still analyses or compiles, the child idles in its command
/// read, and the interrupt flag stops the cell as soon as it starts. The kill comes no sooner than
/// `grace` after the interrupt and `grace - warn_after` after the warning.
fn watch(inner: &InterruptState, generation: u64) {
    let started = Instant::now();
    let mut kill_at: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if !inner.executing.load(Ordering::SeqCst) || inner.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let Some(pid) = child_pid(&inner.process) else { return };
        if child_is_idle(pid) {
            continue;
        }
        match kill_at {
            None if started.elapsed() >= inner.warn_after => {
                let wait = inner.grace.saturating_sub(started.elapsed()).max(inner.grace.saturating_sub(inner.warn_after));
                kill_at = Some(Instant::now() + wait);
                let vars = inner.variables.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let text = interrupt_warning(started.elapsed(), wait, &vars, inner.again);
                let _ = inner.notices.send(Event::Stream { name: StreamName::Stderr, text });
                inner.warned.store(true, Ordering::SeqCst);
            }
            Some(at) if Instant::now() >= at => {
                inner.killed.store(true, Ordering::SeqCst);
                // SAFETY: kill with a pid we own.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return;
            }
            _ => {}
        }
    }
}

fn interrupt_warning(since: Duration, wait: Duration, vars: &[String], again: &str) -> String {
    let lost = if vars.is_empty() { "no variables are defined yet".to_string() } else { format!("these variables are lost: {}", vars.join(", ")) };
    format!(
        "\nThe cell is still running {:.0} s after the interrupt: its code does not check for interrupts \
         (long loops should call `check_interrupt(..)?`). In {:.0} s the Rust process will be restarted to stop it, and {lost}. \
         {again} to restart it now.\n",
        since.as_secs_f64(),
        wait.as_secs_f64()
    )
}

/// Whether process `pid` has a handler for `sig` (the `SigCgt` mask of /proc/PID/status).
fn catches(pid: u32, sig: libc::c_int) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("SigCgt:").map(|m| m.trim().to_string())))
        .and_then(|m| u64::from_str_radix(&m, 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
}

fn child_pid(process: &Arc<Mutex<std::process::Child>>) -> Option<u32> {
    process.try_lock().ok().map(|c| c.id()).or_else(|| process.lock().ok().map(|c| c.id()))
}

/// True when the child's main thread waits in `read(0, …)`: evcxr's runtime loop between cells.
fn child_is_idle(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .map(|s| {
            let mut it = s.split_whitespace();
            it.next() == Some("0") && it.next() == Some("0x0")
        })
        .unwrap_or(false)
}

/// Stops cargo builds started by this process. Returns whether one was running.
fn kill_cargo_children() -> bool {
    let me = std::process::id();
    let mut found = false;
    for pid in children_of(me) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // `mold` is the build shim (`fastbuild`), which runs cargo or rustc.
        if comm.trim() == "cargo" || comm.trim() == crate::fastbuild::SHIM_NAME {
            found = true;
            kill_tree(pid);
        }
    }
    found
}

fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()))
                == Some(ppid)
        })
        .collect()
}

fn kill_tree(pid: u32) {
    for child in children_of(pid) {
        kill_tree(child);
    }
    // SAFETY: kill with a pid of our own descendant.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

pub struct Session {
    ctx: CommandContext,
    pump: Pump,
    interrupter: Interrupter,
    opts: SessionOptions,
    child_pid: Option<u32>,
    cell: u64,
    /// The fixed evcxr settings (`start`), applied again by `recycle`.
    settings: String,
    /// Time the start took (context creation + prelude build).
    pub startup: Duration,
    /// Our analysis of cells (`analysis`): names the types of `let`s, answers completions.
    analysis: Analysis,
}

/// The state of the engine's own analysis.
enum Analysis {
    /// `PIVOT_EVCXR_ANALYSIS`: evcxr's rust-analyzer does it all.
    Off,
    /// Not loaded yet: `start` begins the load once the prelude cell has written the crate graph.
    Unloaded,
    /// Loading in the background since the start.
    Loading(std::thread::JoinHandle<anyhow::Result<crate::analysis::CellAnalysis>>),
    Ready(crate::analysis::CellAnalysis),
    /// The load failed for this Cargo.toml of the cell crate; tried again when it changes.
    Failed { manifest: Vec<u8>, why: String },
}


const PANIC_HOOK_CODE: &str = "pivot::runtime::install_panic_hook();";

/// Run after the prelude cell, so that a user's first cell with a `?` builds once. evcxr builds a
/// cell without a `Result` around it until a build fails on a `?` (E0277), then builds it again
/// with one and keeps that for the rest of the session (until `:clear`); the first `?` cell of
/// every notebook paid that second build (9 of the 12 rebuilds over notebooks 01-09, session 15).
/// Paying it here moves it off the user's cell: at a start, a recycle, or a spare's warm-up.
const QUESTION_MARK_CELL: &str = "Ok::<(), std::fmt::Error>(())?;";

/// Set (to anything): skip `QUESTION_MARK_CELL`, leaving the `Result` wrapper to evcxr's first
/// failed build, as before (for side-by-side measurements, `kernel_latency.py --ab`).
pub const LAZY_QUESTION_MARK_ENV: &str = "PIVOT_LAZY_QUESTION_MARK";

impl Session {
    /// Creates the evcxr context in the current slot (see `prepare_process_env`) and loads the
    /// prelude. This is the slow part of a kernel start: minutes in a cold slot, seconds warm.
    pub fn start(opts: SessionOptions, sink: Sink) -> anyhow::Result<Session> {
        let started = Instant::now();
        let mut phases = StartPhases::new();
        let torch = paths::torch()?;
        let mut cmd = Command::new(&opts.child_exe);
        let mut ld = torch.lib_dir.display().to_string();
        if let Some(std_dir) = paths::rust_std_lib_dir() {
            ld = format!("{ld}:{}", std_dir.display());
            // The prelude's dylib, which every cell needs: the loader looks here, since evcxr
            // loads each cell from `debug/`, one folder above the `$ORIGIN` of the cell's rpath.
            let slot = std::env::var_os("EVCXR_TMPDIR").map(PathBuf::from);
            if let Some(deps) = slot.and_then(|s| paths::slot_deps_dir(&s, &std_dir)) {
                ld = format!("{ld}:{}", deps.display());
            }
        }
        if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
            if !old.is_empty() {
                ld = format!("{ld}:{old}");
            }
        }
        cmd.env("LD_LIBRARY_PATH", ld).env("PIVOT_FRONTEND", opts.frontend.env_value());
        crate::racargo::with_real_cargo_home(&mut cmd);
        let (ec, outputs) = catch(|| EvalContext::with_subprocess_command(cmd)).map_err(anyhow::Error::msg)?
            .map_err(|e| anyhow::anyhow!("cannot start the evcxr child process: {e}"))?;
        phases.done("context");
        let mut ctx = CommandContext::with_eval_context(ec);
        let pump = Pump::start(outputs.stdout, outputs.stderr, sink);
        let process = ctx.process_handle();
        let interrupter = Interrupter {
            inner: Arc::new(InterruptState {
                process,
                executing: AtomicBool::new(false),
                requested: AtomicBool::new(false),
                killed: AtomicBool::new(false),
                watching: AtomicBool::new(false),
                warned: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                grace: opts.interrupt_grace,
                warn_after: opts.interrupt_warn.min(opts.interrupt_grace),
                again: match opts.frontend {
                    Frontend::Jupyter => "Interrupt again",
                    Frontend::Repl => "Press Ctrl-C again",
                },
                variables: Mutex::new(Vec::new()),
                notices: pump.notices.clone(),
            }),
        };
        // Fixed settings: any change to these invalidates the slot's build cache. `:linker mold`
        // links with the system linker as `:linker system` does, but makes evcxr run its builds
        // as `mold -run cargo ...`, where `mold` is our build shim (see `fastbuild`).
        let linker = if std::env::var_os(SHIM_ON_ENV).is_some() { "mold" } else { "system" };
        let mut setup = format!(":offline 1\n:opt 2\n:linker {linker}\n");
        for (k, v) in &torch.build_env {
            setup.push_str(&format!(":build_env {k}={v}\n"));
        }
        catch(|| ctx.execute(&setup)).map_err(anyhow::Error::msg)?.map_err(|e| anyhow::anyhow!("evcxr setup failed: {e}"))?;
        phases.done("settings");
        // Our analysis is only needed where evcxr's rust-analyzer does not see the dependencies.
        let analysis = if crate::racargo::own_analysis() && crate::racargo::real_cargo_home().is_some() { Analysis::Unloaded } else { Analysis::Off };
        let mut session = Session { ctx, pump, interrupter, opts, child_pid: None, cell: 0, settings: setup, startup: Duration::ZERO, analysis };
        if session.opts.preload {
            session.load_prelude()?;
            phases.done("prelude_cell");
        }
        if matches!(session.analysis, Analysis::Unloaded) {
            // The crate graph is what the prelude cell left in the slot's Cargo.toml; rust-analyzer
            // reads it while the front end starts (a spare's warm-up, or the user's first cell,
            // waits for it).
            let slot = session.slot_dir();
            session.analysis = Analysis::Loading(std::thread::spawn(move || crate::analysis::CellAnalysis::load(&slot)));
        }
        session.child_pid = child_pid(&session.ctx.process_handle());
        session.startup = started.elapsed();
        if let Some(path) = std::env::var_os(CELL_STATS_ENV) {
            phases.write(Path::new(&path));
        }
        Ok(session)
    }

    /// The prelude cell: `:dep pivot` (`paths::prelude_dep`), `use pivot::prelude::*`, the panic hook.
    fn prelude_cell(&self) -> String {
        format!(":dep {}\nuse pivot::prelude::*;\n{PANIC_HOOK_CODE}", paths::prelude_dep(&self.opts.prelude_dir))
    }

    /// Runs the prelude cell at a start.
    fn load_prelude(&mut self) -> anyhow::Result<()> {
        seed_cargo_lock(&self.opts.prelude_dir);
        let code = self.prelude_cell();
        let mut r = self.execute(&code, &|_, _| String::new());
        if r.error.as_ref().is_some_and(|e| e.evalue.contains("--offline") || e.traceback.iter().any(|l| l.contains("--offline"))) {
            // Some crate of the prelude's dependency graph is not in cargo's local cache
            // (`cargo fetch` in the workspace prevents this): resolve once online.
            let _ = catch(|| self.ctx.execute(":offline 0"));
            r = self.execute(&code, &|_, _| String::new());
        }
        if let Some(e) = r.error {
            anyhow::bail!("loading the prelude failed: {}\n{}", e.evalue, strip_ansi(&e.traceback.join("\n")));
        }
        self.allow_question_mark();
        Ok(())
    }

    /// Runs `QUESTION_MARK_CELL`. Should it fail, cells still work: the first `?` cell then
    /// builds twice, as under evcxr alone.
    fn allow_question_mark(&mut self) {
        if std::env::var_os(LAZY_QUESTION_MARK_ENV).is_some() {
            return;
        }
        let _ = catch(|| self.ctx.execute(QUESTION_MARK_CELL));
        self.pump.flush();
        let _ = self.pump.take_signals();
    }

    /// Makes this session what `start` returns, for the next front end, keeping what is slow to
    /// rebuild: rust-analyzer's analysis of the crate graph (evcxr reloads it only when the cell
    /// crate's Cargo.toml changes, and the prelude's `:dep` writes the same one) and the build
    /// slot's artefacts. The child process is restarted (a fresh process: no variable, thread,
    /// file or torch state survives), evcxr's state (variables, items, `use`s, dependencies) is
    /// cleared and its settings reset to ours (a `:opt` or `:fmt` of the last user is gone), the
    /// prelude is loaded again, and cells count from the start. Fails, leaving the session
    /// unusable, if anything of the last session is still visible.
    pub fn recycle(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        self.ctx.reset_config();
        catch(|| self.ctx.execute(":clear")).map_err(anyhow::Error::msg)?.map_err(|e| anyhow::anyhow!(":clear failed: {e}"))?;
        // After `:clear` has reaped the last session's child, whose CPU is not the recycling's.
        let cpu0 = cpu_seconds();
        let settings = self.settings.clone();
        catch(|| self.ctx.execute(&settings)).map_err(anyhow::Error::msg)?.map_err(|e| anyhow::anyhow!("evcxr setup failed: {e}"))?;
        // The interrupt flags need no reset here: every cell resets them before it runs.
        self.cell = 0;
        if self.opts.preload {
            self.load_prelude()?;
        }
        let vars = self.variables();
        let items: Vec<String> = self.ctx.defined_item_names().map(str::to_string).collect();
        if !vars.is_empty() || !items.is_empty() {
            anyhow::bail!("the recycled session still shows the last one's variables {vars:?} or items {items:?}");
        }
        self.child_pid = child_pid(&self.ctx.process_handle());
        if let Some(path) = std::env::var_os(CELL_STATS_ENV) {
            let line = serde_json::json!({
                "pid": std::process::id(),
                "cell": 0,
                "recycled": {"wall_s": started.elapsed().as_secs_f64(), "engine_cpu_s_after_clear": cpu_seconds() - cpu0},
            });
            crate::fastbuild::append_line(Path::new(&path), &line.to_string());
        }
        Ok(())
    }

    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }

    /// Runs one cell. `input` answers `evcxr_input` prompts (prompt, is_password).
    pub fn execute(&mut self, code: &str, input: &dyn Fn(&str, bool) -> String) -> CellResult {
        let started = Instant::now();
        if let Some(cmd) = code.lines().map(str::trim).find(|l| *l == ":quit" || l.starts_with(":quit ")) {
            return CellResult {
                error: Some(CellError::new("UnsupportedCommand", format!("`{cmd}` would end the kernel process; use the front end's restart/shutdown instead"))),
                ..Default::default()
            };
        }
        let vars_before: Vec<String> = self.ctx.variables_and_types().map(|(n, _)| n.to_string()).collect();
        let cpu_before = cpu_seconds();
        let annotations = self.annotations(code);
        let mut typed_code = crate::analysis::annotated(code, &annotations);
        self.cell += 1;
        let st = &self.interrupter.inner;
        st.requested.store(false, Ordering::SeqCst);
        st.killed.store(false, Ordering::SeqCst);
        st.watching.store(false, Ordering::SeqCst);
        st.warned.store(false, Ordering::SeqCst);
        *st.variables.lock().unwrap_or_else(|e| e.into_inner()) = vars_before.clone();
        st.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(pid) = child_pid(&st.process).filter(|&p| catches(p, libc::SIGUSR1)) {
            // Clears a request left from an earlier cell that never polled the flag. A child that
            // does not catch SIGUSR1 yet was just (re)started by evcxr and has no flag to clear;
            // the signal's default action would kill it.
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
        }
        let _ = self.pump.take_signals();
        st.executing.store(true, Ordering::SeqCst);
        let run = |ctx: &mut CommandContext, code: &str| {
            catch(|| {
                // The prelude's `runtime::input` sends `:` as U+A789 (evcxr cuts the prompt at the
                // first `:`); give the front end the prompt as written.
                let mut callbacks = EvalCallbacks { input_reader: &|r| input(&r.prompt.replace('\u{a789}', ":"), r.is_password) };
                ctx.execute_with_callbacks(code, &mut callbacks)
            })
        };
        let mut result = run(&mut self.ctx, &typed_code);
        let mut annotations = annotations;
        if let Ok(Err(evcxr::Error::CompilationErrors(errors))) = &result {
            let spans = annotation_spans(code, &annotations);
            if errors.iter().any(|e| error_in_annotation(e, &spans)) {
                // A type we wrote does not compile (a path rust-analyzer named that the cell crate
                // cannot use): nothing ran, so the cell runs as the user wrote it.
                annotations.clear();
                typed_code = code.to_string();
                result = run(&mut self.ctx, code);
            }
        }
        let st = &self.interrupter.inner;
        st.executing.store(false, Ordering::SeqCst);
        st.warned.store(false, Ordering::SeqCst);
        self.pump.flush();
        let signals = self.pump.take_signals();
        let interrupted = st.requested.swap(false, Ordering::SeqCst);
        let killed = st.killed.swap(false, Ordering::SeqCst);
        let mut out = CellResult::default();
        match result {
            Err(internal) => out.error = Some(internal_error(&internal)),
            Ok(Err(e)) => {
                let (mut err, restarted) = self.translate_error(e, &typed_code, &vars_before, interrupted, killed);
                hide_annotations(&mut err, &annotations);
                out.error = Some(err);
                out.restarted = restarted;
            }
            Ok(Ok(outputs)) => {
                let phases: Vec<(&str, Duration)> = outputs.phases.iter().map(|p| (p.name.as_str(), p.duration)).collect();
                (out.builds, out.run_time, out.fixes) = build_phases(&phases);
                if let Some(err) = signal_error(&signals, interrupted) {
                    out.error = Some(err);
                } else if !outputs.content_by_mime_type.is_empty() {
                    let mut data = Map::new();
                    for (mime, content) in outputs.content_by_mime_type {
                        let v = if mime.contains("json") {
                            serde_json::from_str(&content).unwrap_or(Value::String(content))
                        } else {
                            Value::String(content)
                        };
                        data.insert(mime, v);
                    }
                    out.value = Some(data);
                }
            }
        }
        // A new child process (restart, `:restart`, crash) has no panic hook yet.
        let pid = child_pid(&self.ctx.process_handle());
        if self.opts.preload && self.child_pid.is_some() && pid != self.child_pid {
            out.restarted = true;
            let _ = catch(|| self.ctx.execute(PANIC_HOOK_CODE));
            self.pump.flush();
            let _ = self.pump.take_signals();
        }
        self.child_pid = pid;
        if code.lines().any(|l| l.trim() == ":clear") && self.opts.preload {
            // `:clear` drops our `:dep`/`use` lines too; bring the prelude back.
            let code = self.prelude_cell();
            let _ = catch(|| self.ctx.execute(&code));
            self.pump.flush();
            self.allow_question_mark();
        }
        out.typed = annotations.iter().map(|a| a.variables).sum();
        out.duration = started.elapsed();
        if let Some(path) = std::env::var_os(CELL_STATS_ENV) {
            write_cell_stats(Path::new(&path), self.cell, &out, cpu_seconds() - cpu_before);
        }
        out
    }

    /// Evaluates Jupyter `user_expressions` after a cell: each expression's `{:?}` text, or the
    /// error it produced. All expressions are compiled together once; if that fails (a compile
    /// error, a panic), each expression is evaluated on its own so errors land on the right one
    /// (expressions with side effects may then run twice). Nothing they print reaches the front
    /// end, and they define no variables, so a failing expression cannot hurt the session.
    pub fn eval_user_expressions(&mut self, exprs: &[String]) -> Vec<Result<String, CellError>> {
        if exprs.is_empty() {
            return vec![];
        }
        self.pump.flush();
        self.pump.set_muted(true);
        let nonce = format!(
            "{:x}{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
            std::process::id()
        );
        let refs: Vec<&str> = exprs.iter().map(String::as_str).collect();
        let all = self.execute(&user_expressions_code(&refs, &nonce), &|_, _| String::new());
        let mut results: Vec<Option<Result<String, CellError>>> = match (&all.error, &all.value) {
            (None, Some(v)) => match decode_user_expressions(v, &nonce, exprs.len()) {
                Some(texts) => texts.into_iter().map(|t| Some(Ok(t))).collect(),
                None => vec![None; exprs.len()],
            },
            _ => vec![None; exprs.len()],
        };
        for (i, expr) in exprs.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let r = self.execute(&user_expressions_code(&[expr.as_str()], &nonce), &|_, _| String::new());
            results[i] = Some(match (r.error, r.value) {
                (Some(e), _) => Err(e),
                (None, Some(v)) => decode_user_expressions(&v, &nonce, 1)
                    .and_then(|mut t| t.pop())
                    .ok_or_else(|| CellError::new("Error", "the expression produced no value")),
                (None, None) => Err(CellError::new("Error", "the expression produced no value")),
            });
        }
        self.pump.flush();
        self.pump.set_muted(false);
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(CellError::new("Error", "not evaluated")))).collect()
    }

    fn translate_error(&mut self, e: evcxr::Error, code: &str, vars_before: &[String], interrupted: bool, killed: bool) -> (CellError, bool) {
        match e {
            evcxr::Error::CompilationErrors(errors) => (self.compile_error(&errors, code, interrupted), false),
            evcxr::Error::TypeRedefinedVariablesLost(vars) => (
                CellError::new("VariablesLost", format!("redefining a type dropped the variables that used it: {}", vars.join(", "))),
                false,
            ),
            evcxr::Error::SubprocessTerminated(msg) => {
                let lost = if vars_before.is_empty() { "no variables were defined".to_string() } else { format!("lost variables: {}", vars_before.join(", ")) };
                let err = if killed {
                    CellError::new(
                        "Interrupted",
                        format!(
                            "the cell did not stop at the interrupt (its code never checked for one), so the Rust process was restarted; {lost}. Long loops should call check_interrupt(..)? to stop cleanly."
                        ),
                    )
                } else {
                    CellError::new("ProcessCrashed", format!("{} — the Rust process was restarted; {lost}", msg.trim()))
                };
                (err, true)
            }
            evcxr::Error::Message(m) => {
                if interrupted {
                    (CellError::new("Interrupted", format!("interrupted while compiling: {}", m.trim())), false)
                } else {
                    (CellError::new("Error", m.trim().to_string()), false)
                }
            }
        }
    }

    fn compile_error(&self, errors: &[evcxr::CompilationError], code: &str, interrupted: bool) -> CellError {
        if interrupted {
            return CellError::new("Interrupted", "interrupted while compiling");
        }
        let errors: Vec<&evcxr::CompilationError> = {
            let user: Vec<_> = errors.iter().filter(|e| e.is_from_user_code()).collect();
            if user.is_empty() { errors.iter().collect() } else { user }
        };
        let mut traceback = Vec::new();
        for e in &errors {
            let mut buf = Vec::new();
            let rendered = e.build_report("cell".to_string(), code.to_string(), if self.opts.dark_theme { Theme::Dark } else { Theme::Light }).and_then(|r| {
                r.write(ariadne::sources([("cell".to_string(), code.to_string())]), &mut buf).ok()
            });
            if rendered.is_some() && !buf.is_empty() {
                traceback.extend(String::from_utf8_lossy(&buf).lines().map(str::to_string));
            } else {
                traceback.push(format!("error: {}", e.message()));
                if let Some(m) = e.primary_spanned_message() {
                    if let Some(span) = &m.span {
                        traceback.push(format!("  --> cell:{}:{}", span.start_line, span.start_column));
                    }
                    traceback.extend(m.lines.iter().cloned());
                    if !m.label.is_empty() {
                        traceback.push(format!("  {}", m.label));
                    }
                }
            }
            for h in e.help() {
                traceback.push(format!("help: {h}"));
            }
            if let Some(hint) = e.evcxr_extra_hint() {
                traceback.push(format!("note: {hint}"));
            }
        }
        let first = errors.first().map(|e| e.message()).unwrap_or_else(|| "compilation failed".into());
        let evalue = if errors.len() > 1 { format!("{first} (and {} more errors)", errors.len() - 1) } else { first };
        let ename = errors.first().and_then(|e| e.code()).map(|c| format!("CompileError[{c}]")).unwrap_or_else(|| "CompileError".into());
        CellError { ename, evalue, traceback }
    }

    /// Completions at a byte offset: (start byte, end byte, candidates with kinds).
    pub fn complete(&mut self, code: &str, pos: usize) -> (usize, usize, Vec<(String, String)>) {
        let line = code[..pos.min(code.len())].rsplit('\n').next().unwrap_or("");
        if !line.trim_start().starts_with(':') {
            if let Some(ctx) = self.analysis_context() {
                if let Some(Ok(found)) = self.ready_analysis().map(|a| a.completions(&ctx, code, pos)) {
                    return found;
                }
            }
        }
        match catch(|| self.ctx.completions(code, pos)) {
            Ok(Ok(c)) => (
                c.start_offset,
                c.end_offset,
                c.completions.into_iter().map(|c| (c.code, c.kind.to_string())).collect(),
            ),
            _ => (pos, pos, vec![]),
        }
    }

    /// Makes evcxr's own rust-analyzer analyse `code` (a completion at its end, whose answer is
    /// dropped), so that its first inference is not paid by a user's cell.
    pub fn warm_evcxr_analysis(&mut self, code: &str) {
        let _ = catch(|| self.ctx.completions(code, code.len()));
    }

    /// Documentation at a byte offset: (plain text, html), or None.
    pub fn inspect(&mut self, code: &str, pos: usize) -> Option<(String, String)> {
        if let Some(ctx) = self.analysis_context().filter(|_| code.is_char_boundary(pos)) {
            if let Some(Ok(found)) = self.ready_analysis().map(|a| a.hover(&ctx, code, pos)) {
                return found.filter(|(plain, _)| !plain.trim().is_empty()).map(|(plain, md)| {
                    let mut html = String::new();
                    pulldown_cmark::html::push_html(&mut html, pulldown_cmark::Parser::new(&md));
                    (plain, html)
                });
            }
        }
        match catch(|| self.ctx.hover_at(code, pos)) {
            Ok(Ok((plain, html))) if !plain.trim().is_empty() && !plain.contains("No documentation found") => Some((plain, html)),
            _ => None,
        }
    }

    /// The slot (evcxr's crate folder) this session builds in.
    fn slot_dir(&self) -> PathBuf {
        std::env::var_os("EVCXR_TMPDIR").map(PathBuf::from).unwrap_or_default()
    }

    /// Our analysis, once loaded (waits for the load begun at the start); None where it is off
    /// or failed, which the front end then learns from evcxr's own messages.
    fn ready_analysis(&mut self) -> Option<&mut crate::analysis::CellAnalysis> {
        let state = std::mem::replace(&mut self.analysis, Analysis::Off);
        self.analysis = match state {
            Analysis::Loading(h) => match h.join() {
                Ok(Ok(a)) => Analysis::Ready(a),
                Ok(Err(e)) => Analysis::Failed { manifest: self.manifest(), why: format!("{e:#}") },
                Err(_) => Analysis::Failed { manifest: self.manifest(), why: "the analysis panicked while loading".into() },
            },
            Analysis::Unloaded => match crate::analysis::CellAnalysis::load(&self.slot_dir()) {
                Ok(a) => Analysis::Ready(a),
                Err(e) => Analysis::Failed { manifest: self.manifest(), why: format!("{e:#}") },
            },
            Analysis::Failed { manifest, .. } if manifest != self.manifest() => match crate::analysis::CellAnalysis::load(&self.slot_dir()) {
                Ok(a) => Analysis::Ready(a),
                Err(e) => Analysis::Failed { manifest: self.manifest(), why: format!("{e:#}") },
            },
            other => other,
        };
        if let Analysis::Failed { why, .. } = &self.analysis {
            if !why.is_empty() {
                eprintln!("pivot: the engine's type analysis is unavailable: {why}");
                self.analysis = Analysis::Failed { manifest: self.manifest(), why: String::new() };
            }
        }
        match &mut self.analysis {
            Analysis::Ready(a) => Some(a),
            _ => None,
        }
    }

    fn manifest(&self) -> Vec<u8> {
        std::fs::read(self.slot_dir().join("Cargo.toml")).unwrap_or_default()
    }

    /// What the next cell sees of the earlier ones, for our analysis.
    fn analysis_context(&self) -> Option<crate::analysis::EarlierCells> {
        if matches!(self.analysis, Analysis::Off) {
            return None;
        }
        let last = self.ctx.last_source().unwrap_or_default();
        Some(crate::analysis::EarlierCells::from_last_source(&last, self.variables()))
    }

    /// The types to write into `code` for evcxr (none where our analysis is off, failed, or the
    /// cell declares nothing).
    fn annotations(&mut self, code: &str) -> Vec<crate::analysis::Annotation> {
        if !code.contains("let") {
            return Vec::new();
        }
        let Some(ctx) = self.analysis_context() else { return Vec::new() };
        match self.ready_analysis().map(|a| catch(|| a.annotations(&ctx, code))) {
            Some(Ok(Ok(found))) => found,
            Some(Ok(Err(e))) => {
                eprintln!("pivot: no types written into the cell: {e:#}");
                Vec::new()
            }
            Some(Err(panic)) => {
                eprintln!("pivot: no types written into the cell: the analysis panicked: {panic}");
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    pub fn variables(&self) -> Vec<(String, String)> {
        self.ctx.variables_and_types().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }
}

/// One block expression that formats every expression with `{:?}` between `nonce` markers and
/// returns the whole text hex-encoded (evcxr shows a final `String` with `{:?}`; hex digits pass
/// through that unchanged). A block, so that no variable of it outlives the evaluation.
fn user_expressions_code(exprs: &[&str], nonce: &str) -> String {
    let mut code = String::from("{\nlet mut __pivot_ue = ::std::string::String::new();\n");
    for (i, e) in exprs.iter().enumerate() {
        code.push_str(&format!("__pivot_ue.push_str(\"\\u{{1e}}UE{nonce}:{i}\\u{{1e}}\");\n"));
        code.push_str(&format!("__pivot_ue.push_str(&::std::format!(\"{{:?}}\", &(\n{e}\n)));\n"));
    }
    code.push_str("__pivot_ue.bytes().map(|b| ::std::format!(\"{:02x}\", b)).collect::<::std::string::String>()\n}");
    code
}

/// Splits the value of `user_expressions_code` back into the `n` expressions' texts.
fn decode_user_expressions(value: &Map<String, Value>, nonce: &str, n: usize) -> Option<Vec<String>> {
    let hex = value.get("text/plain")?.as_str()?.trim().trim_matches('"');
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let start_marker = format!("\u{1e}UE{nonce}:{i}\u{1e}");
        let start = text.find(&start_marker)? + start_marker.len();
        let end = if i + 1 < n { text.find(&format!("\u{1e}UE{nonce}:{}\u{1e}", i + 1))? } else { text.len() };
        out.push(text.get(start..end)?.to_string());
    }
    Some(out)
}

/// A file to which every cell appends one JSON line: wall time, the time its code ran, the rest
/// (the engine's overhead: analysis, builds, loading), builds, and CPU seconds of this process and
/// its finished children (rust-analyzer, cargo, rustc, the linker; not the child running the code).
pub const CELL_STATS_ENV: &str = "PIVOT_CELL_STATS";

fn write_cell_stats(path: &Path, cell: u64, r: &CellResult, cpu: f64) {
    let wall = r.duration.as_secs_f64();
    let run = r.run_time.map(|d| d.as_secs_f64());
    let line = serde_json::json!({
        "pid": std::process::id(),
        "cell": cell,
        "wall_s": wall,
        "run_s": run,
        "overhead_s": run.map(|run| wall - run),
        "builds": r.builds,
        "fixes": r.fixes,
        "typed": r.typed,
        "engine_cpu_s": cpu,
        "error": r.error.as_ref().map(|e| e.ename.clone()),
    });
    crate::fastbuild::append_line(path, &line.to_string());
}

/// Wall and CPU seconds of each phase of `Session::start`, for the `PIVOT_CELL_STATS` file (one
/// line with `"cell": 0`): `context` is evcxr's context creation (its child process, its first
/// build of `42`, rust-analyzer's first load), `settings` our fixed `:` commands, `prelude_cell`
/// the `:dep pivot` cell (the dependency build, rust-analyzer loading the prelude's graph).
struct StartPhases {
    wall0: Instant,
    last: (Instant, f64),
    phases: Vec<(&'static str, f64, f64)>,
}

impl StartPhases {
    fn new() -> Self {
        let now = Instant::now();
        StartPhases { wall0: now, last: (now, cpu_seconds()), phases: Vec::new() }
    }

    fn done(&mut self, name: &'static str) {
        let (now, cpu) = (Instant::now(), cpu_seconds());
        self.phases.push((name, (now - self.last.0).as_secs_f64(), cpu - self.last.1));
        self.last = (now, cpu);
    }

    fn write(&self, path: &Path) {
        let mut phases = Map::new();
        for (name, wall, cpu) in &self.phases {
            phases.insert(name.to_string(), serde_json::json!({ "wall_s": wall, "engine_cpu_s": cpu }));
        }
        let line = serde_json::json!({
            "pid": std::process::id(),
            "cell": 0,
            "start_wall_s": self.wall0.elapsed().as_secs_f64(),
            "start_phases": phases,
        });
        crate::fastbuild::append_line(path, &line.to_string());
    }
}

/// User + system CPU of this process and its reaped children, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage fills the struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut u) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(u.ru_utime) + tv(u.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

/// Counts the builds in evcxr's phases of a cell that ran, and finds the time its code ran. A
/// successful cell ends with "Final compile" then "Execution"; every retry before it adds one
/// phase named after what was fixed ("Fallback", "Captured value", ...), returned in order.
fn build_phases(phases: &[(&str, Duration)]) -> (usize, Option<Duration>, Vec<String>) {
    let Some(last_build) = phases.iter().rposition(|(name, _)| *name == "Final compile") else { return (0, None, Vec::new()) };
    let run_time = phases.get(last_build + 1).filter(|(name, _)| *name == "Execution").map(|(_, d)| *d);
    let fixes = phases[..last_build].iter().map(|(name, _)| name.to_string()).collect();
    (last_build + 1, run_time, fixes)
}

/// The `?` and panic signals the child reported, as an error.
fn signal_error(s: &CellSignals, interrupted: bool) -> Option<CellError> {
    if let Some(p) = &s.panic {
        let msg = p.msg.clone();
        let mut tb = vec![format!("\x1b[31mpanic\x1b[0m: {msg}")];
        if !p.loc.is_empty() && !p.loc.starts_with("src/lib.rs") {
            tb.push(format!("  at {}", p.loc));
        }
        if !p.frames.is_empty() {
            tb.push("backtrace (innermost first):".into());
            tb.extend(p.frames.iter().map(|f| format!("  {f}")));
        }
        tb.push("Variables this cell defined are dropped; earlier ones it did not move are kept.".into());
        return Some(CellError { ename: "Panic".into(), evalue: msg, traceback: tb });
    }
    if let Some(lines) = &s.panic_notice {
        let text = lines.join("\n");
        let msg = lines.iter().skip_while(|l| !l.contains("panicked at")).nth(1).cloned().unwrap_or_else(|| text.clone());
        return Some(CellError { ename: "Panic".into(), evalue: msg, traceback: lines.clone() });
    }
    if let Some(lines) = &s.question_mark_error {
        let text = lines.join("\n").trim().to_string();
        let ename = if text.starts_with("interrupted by the user") || (interrupted && text.contains("interrupt")) { "Interrupted" } else { "Error" };
        let mut tb = vec![format!("\x1b[31m{ename}\x1b[0m: {text}")];
        tb.push("(returned with `?`; variables this cell defined are dropped, earlier ones are kept)".into());
        return Some(CellError { ename: ename.into(), evalue: text, traceback: tb });
    }
    None
}

fn internal_error(msg: &str) -> CellError {
    CellError::new("InternalError", format!("the evaluation engine failed ({msg}); the session continues, but if cells misbehave, restart the kernel"))
}

/// Runs `f`, turning a panic inside evcxr/rust-analyzer (evcxr #150, #422) into an error value
/// instead of a dead kernel.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Pins the slot's dependency versions to the workspace's, so the prelude builds in the cell
/// crate exactly as it does in the workspace (same tch, same torch-sys).
fn seed_cargo_lock(prelude_dir: &Path) {
    let Some(slot) = std::env::var_os("EVCXR_TMPDIR").map(PathBuf::from) else { return };
    let target = slot.join("Cargo.lock");
    if target.exists() {
        return;
    }
    if let Some(ws_lock) = prelude_dir.parent().map(|p| p.join("Cargo.lock")).filter(|p| p.exists()) {
        let _ = std::fs::copy(ws_lock, target);
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Line and column (1-based, in characters) of byte `at` of `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// Where each annotation sits in the annotated cell: (line, first column, column after it),
/// 1-based, in characters, as rustc's spans count (annotations hold no newline).
fn annotation_spans(code: &str, annotations: &[crate::analysis::Annotation]) -> Vec<(usize, usize, usize)> {
    let typed = crate::analysis::annotated(code, annotations);
    let mut shift = 0;
    annotations
        .iter()
        .map(|a| {
            let start = a.at + shift;
            shift += a.text.len();
            let ((line, c0), (_, c1)) = (line_col(&typed, start), line_col(&typed, start + a.text.len()));
            (line, c0, c1)
        })
        .collect()
}

/// True when the primary span of `e` (in the annotated cell) starts inside text we inserted, whose
/// places `annotation_spans` gave.
fn error_in_annotation(e: &evcxr::CompilationError, spans: &[(usize, usize, usize)]) -> bool {
    let Some(span) = e.primary_spanned_message().and_then(|m| m.span.clone()) else { return false };
    spans.iter().any(|&(line, c0, c1)| span.start_line == line && (c0..c1).contains(&span.start_column))
}

/// Takes the types we wrote out of the source lines a compile error shows, where nothing but
/// a comment follows them on the line (elsewhere the markers under the line point past them, so
/// the line stays as it was compiled). ariadne colours each character on its own, so the text is
/// found in the line without its colour codes and its characters are taken out between them.
fn hide_annotations(err: &mut CellError, annotations: &[crate::analysis::Annotation]) {
    for line in &mut err.traceback {
        for a in annotations {
            let visible = strip_ansi(line);
            let Some(at) = visible.find(&a.text) else { continue };
            let rest = visible[at + a.text.len()..].trim_start();
            if !(rest.is_empty() || rest.starts_with("//")) {
                continue;
            }
            let (first, count) = (visible[..at].chars().count(), a.text.chars().count());
            *line = without_visible_chars(line, first, count);
        }
    }
}

/// `line` without its visible characters `first..first + count` (colour codes stay).
fn without_visible_chars(line: &str, first: usize, count: usize) -> String {
    let mut out = String::with_capacity(line.len());
    let (mut chars, mut seen) = (line.chars().peekable(), 0);
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if !(first..first + count).contains(&seen) {
            out.push(c);
        }
        seen += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_found_and_hidden_where_rustc_and_ariadne_put_them() {
        use crate::analysis::Annotation;
        let code = "let a = 1;\nlet (b, c) = (2, 'é'); b + 1";
        let anns = vec![Annotation { at: 10, text: " let a: i32 = a;".into(), variables: 1 }, Annotation { at: code.find(" b +").unwrap(), text: " let b: i32 = b; let c: char = c;".into(), variables: 2 }];
        // Line 2 of the typed cell: `let (b, c) = (2, 'é');` is 22 characters, so the text starts at column 23.
        assert_eq!(annotation_spans(code, &anns), vec![(1, 11, 27), (2, 23, 56)]);
        let mut err = CellError::new("CompileError", "x");
        err.traceback = vec![" 1 │ let a = 1; let a: i32 = a;".into(), " 2 │ let (b, c) = (2, 'é'); let b: i32 = b; let c: char = c; b + 1".into()];
        hide_annotations(&mut err, &anns);
        assert_eq!(err.traceback, [" 1 │ let a = 1;", " 2 │ let (b, c) = (2, 'é'); let b: i32 = b; let c: char = c; b + 1"]);
        // As ariadne writes it: each character in its own colour.
        let paint = |s: &str| s.chars().map(|c| format!("\x1b[38;5;249m{c}\x1b[0m")).collect::<String>();
        err.traceback = vec![format!("\x1b[38;5;246m1 │\x1b[0m {}", paint("let a = 1; let a: i32 = a; // one"))];
        hide_annotations(&mut err, &anns);
        assert_eq!(strip_ansi(&err.traceback[0]), "1 │ let a = 1; // one");
    }

    #[test]
    fn a_process_is_seen_to_catch_a_signal_only_once_it_has_a_handler() {
        let me = std::process::id();
        // SAFETY: setting SIGUSR2's disposition in this test process.
        unsafe { libc::signal(libc::SIGUSR2, libc::SIG_DFL) };
        assert!(!catches(me, libc::SIGUSR2));
        extern "C" fn ignore(_: libc::c_int) {}
        unsafe { libc::signal(libc::SIGUSR2, ignore as extern "C" fn(libc::c_int) as libc::sighandler_t) };
        assert!(catches(me, libc::SIGUSR2));
        unsafe { libc::signal(libc::SIGUSR2, libc::SIG_DFL) };
        assert!(!catches(u32::MAX, libc::SIGUSR2), "no such process");
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\x1b[31mred\x1b[0m x"), "red x");
    }

    #[test]
    fn user_expressions_round_trip() {
        let code = user_expressions_code(&["1 + 1", "x"], "abc");
        assert!(code.starts_with("{\n") && code.ends_with("\n}"));
        assert!(code.contains("&(\n1 + 1\n)"));
        // What the child would return: the marked texts, hex-encoded, shown with `{:?}`.
        let text = "\u{1e}UEabc:0\u{1e}2\u{1e}UEabc:1\u{1e}\"a:b\"";
        let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
        let mut v = Map::new();
        v.insert("text/plain".into(), Value::String(format!("\"{hex}\"")));
        assert_eq!(decode_user_expressions(&v, "abc", 2), Some(vec!["2".to_string(), "\"a:b\"".to_string()]));
        assert_eq!(decode_user_expressions(&v, "other", 2), None);
    }

    #[test]
    fn builds_are_counted_from_phases() {
        let ms = Duration::from_millis;
        assert_eq!(build_phases(&[("Final compile", ms(900)), ("Execution", ms(5))]), (1, Some(ms(5)), vec![]));
        assert_eq!(
            build_phases(&[("Fallback", ms(800)), ("Final compile", ms(900)), ("Execution", ms(5))]),
            (2, Some(ms(5)), vec!["Fallback".to_string()])
        );
        assert_eq!(build_phases(&[("Execution", ms(1))]), (0, None, vec![]));
    }

    #[test]
    fn idle_detection_reads_proc() {
        // Our own main thread is running, not blocked in read(0).
        assert!(!child_is_idle(std::process::id()));
    }
}
