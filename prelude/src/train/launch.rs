//! Data-parallel training started from a notebook cell: [`Launch`] runs
//! `torchrun --standalone --nproc-per-node N --no-python pivot-train CONFIG` as a child, follows
//! rank 0's metrics as they come (a live progress line, and in Jupyter the loss curve, as the
//! in-process trainers show them), and on an interrupt (the prelude's interrupt flag: the kernel's
//! interrupt button, Ctrl-C in the REPL) stops every rank. [`load_checkpoint`] loads a run's
//! checkpoints back into a model; its final model is a `save_pretrained` folder
//! (`Mllm::from_pretrained`).
//!
//! ```no_run
//! # use pivot::prelude::*;
//! # fn main() -> pivot::error::Result<()> {
//! let run = pivot::train::launch::Launch::new("runs/dpo.toml", 2).run()?;
//! println!("{} steps, final loss {:?}", run.log.len(), run.log.last().and_then(|r| r.get("loss")));
//! let model = Mllm::from_pretrained("runs/out/dpo", Device::Cpu)?;
//! # Ok(()) }
//! ```
//!
//! Metrics: `pivot-train` appends each step's `StepMetrics` as a JSON line to the file named by
//! `PIVOT_METRICS_JSONL` (rank 0 only); the launcher reads the lines as they are written. Stage 1's
//! two parts make one count (the full part's steps follow the projector part's).
//!
//! Stopping: torchrun starts each rank in a session of its own, so no single signal reaches them
//! all. The launcher starts torchrun in a new process group and keeps the ranks' pids (children of
//! torchrun, read from /proc while the run goes). On interrupt it sends SIGINT to every rank (they
//! stop together at the end of a micro-batch, the run's own interrupt path) and SIGTERM to
//! torchrun's group; whatever still lives after the grace period gets SIGKILL (each rank's group,
//! torchrun's group). The run then ends with `PivotError::Interrupted`.

use super::checkpoint::{self, TrainerState};
use super::log::{LiveView, StepMetrics, TrainLog};
use crate::error::{PivotError, Result};
use crate::model::Mllm;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A torchrun launch of `pivot-train` (see the module doc).
pub struct Launch {
    config: PathBuf,
    nproc: usize,
    bin: Option<PathBuf>,
    torchrun: Option<PathBuf>,
    grace: Duration,
    live: bool,
    env: Vec<(String, String)>,
    on_step: Vec<Box<dyn FnMut(&StepMetrics)>>,
}

/// What a finished launch leaves: rank 0's metrics and what the ranks printed.
pub struct LaunchedRun {
    /// Rank 0's steps, as the in-process trainers' logs.
    pub log: TrainLog,
    /// torchrun's and the ranks' standard output and error (interleaved per stream).
    pub stdout: String,
    pub stderr: String,
    /// The pids the ranks had (all gone when `run` returns).
    pub ranks: Vec<u32>,
}

impl Launch {
    /// `nproc` ranks (torchrun's `--nproc-per-node`) of `pivot-train CONFIG`.
    pub fn new(config: impl AsRef<Path>, nproc: usize) -> Self {
        Launch { config: config.as_ref().to_path_buf(), nproc, bin: None, torchrun: None, grace: Duration::from_secs(10), live: true, env: Vec::new(), on_step: Vec::new() }
    }
    /// The `pivot-train` binary (default: `$PIVOT_TRAIN_BIN`, else `pivot-train` on PATH).
    pub fn bin(mut self, path: impl AsRef<Path>) -> Self {
        self.bin = Some(path.as_ref().to_path_buf());
        self
    }
    /// torchrun (default: the one beside `$PIVOT_PYTHON`, the venv's, else `torchrun` on PATH).
    pub fn torchrun(mut self, path: impl AsRef<Path>) -> Self {
        self.torchrun = Some(path.as_ref().to_path_buf());
        self
    }
    /// How long the ranks get to stop after an interrupt before they are killed (default 10 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
    /// Progress line and loss curve while it runs (default on).
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }
    /// One more environment variable for every rank.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// Called with each of rank 0's steps as the launcher reads it.
    pub fn on_step(mut self, f: impl FnMut(&StepMetrics) + 'static) -> Self {
        self.on_step.push(Box::new(f));
        self
    }

    fn command(&self, metrics: &Path, out: &Path, err: &Path) -> Result<Command> {
        if self.nproc == 0 {
            return Err(PivotError::invalid("Launch: nproc must be at least 1"));
        }
        if !self.config.is_file() {
            return Err(PivotError::file(&self.config, "no such config file"));
        }
        let bin = self.bin.clone().or_else(|| std::env::var_os("PIVOT_TRAIN_BIN").map(PathBuf::from)).unwrap_or_else(|| "pivot-train".into());
        let bin = executable(&bin).ok_or_else(|| {
            PivotError::file(&bin, "no pivot-train binary here (build it with `make train-bin`, or `cargo build -p pivot --features cli --bin pivot-train`, and set PIVOT_TRAIN_BIN to it)")
        })?;
        let torchrun = self.torchrun.clone().unwrap_or_else(|| {
            std::env::var_os("PIVOT_PYTHON").map(|py| Path::new(&py).with_file_name("torchrun")).filter(|p| p.is_file()).unwrap_or_else(|| "torchrun".into())
        });
        let torchrun = executable(&torchrun).ok_or_else(|| PivotError::file(&torchrun, "no torchrun here (it comes with torch: PIVOT_PYTHON's venv, or PATH)"))?;
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| PivotError::file(p, e));
        let mut cmd = Command::new(&torchrun);
        cmd.args(["--standalone", "--nproc-per-node", &self.nproc.to_string(), "--no-python"])
            .arg(&bin)
            .arg(&self.config)
            .env("PIVOT_METRICS_JSONL", metrics)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file(out)?)
            .stderr(file(err)?)
            // Its own group: a signal for torchrun does not reach the kernel, and vice versa.
            .process_group(0);
        Ok(cmd)
    }

    /// Runs to the end (or to an interrupt, see the module doc), showing progress.
    pub fn run(mut self) -> Result<LaunchedRun> {
        let dir = RunDir::new()?;
        let (metrics, out, err) = (dir.0.join("metrics.jsonl"), dir.0.join("stdout.txt"), dir.0.join("stderr.txt"));
        std::fs::File::create(&metrics).map_err(|e| PivotError::file(&metrics, e))?;
        let mut cmd = self.command(&metrics, &out, &err)?;
        let child = cmd.spawn().map_err(|e| PivotError::invalid(format!("cannot start {:?}: {e}", cmd.get_program())))?;
        let mut group = Group { child, ranks: Vec::new() };
        let label = format!("pivot-train ×{}", self.nproc);
        let mut live = LiveView::new(&label, 0, self.live);
        let mut log = TrainLog::new(label.as_str());
        let mut reader = Lines::new(&metrics)?;
        let status = loop {
            group.refresh_ranks();
            for row in reader.read()? {
                self.on_step.iter_mut().for_each(|f| f(&row));
                log.rows.push(row.clone());
                live.update(&log, &row, false);
            }
            // Consumed, as `check_interrupt` does, so the next cell starts clean.
            if crate::runtime::interrupt_flag().swap(false, std::sync::atomic::Ordering::SeqCst) {
                group.stop(self.grace);
                live.finish(&log);
                return Err(PivotError::Interrupted { at: format!("pivot-train ×{} after {} steps (every rank has ended)", self.nproc, log.len()) });
            }
            match group.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    group.stop(self.grace);
                    return Err(PivotError::invalid(format!("waiting for torchrun: {e}")));
                }
            }
        };
        for row in reader.read()? {
            self.on_step.iter_mut().for_each(|f| f(&row));
            log.rows.push(row);
        }
        live.finish(&log);
        // torchrun has ended; a rank it could not reap must not outlive it.
        group.kill_all();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let (stdout, stderr) = (read(&out), read(&err));
        if !status.success() {
            return Err(PivotError::invalid(format!("pivot-train ×{} failed ({status}) after {} steps:\n{}", self.nproc, log.len(), failure_report(&stderr))));
        }
        Ok(LaunchedRun { log, stdout, stderr, ranks: group.ranks })
    }
}

/// The launch's own folder (metrics, captured output), removed when the launch ends.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pivot-launch-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| PivotError::file(&dir, e))?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// torchrun and the ranks it started.
struct Group {
    child: Child,
    ranks: Vec<u32>,
}

impl Group {
    /// Adds torchrun's children (the ranks) that appeared since the last look.
    fn refresh_ranks(&mut self) {
        for pid in children(self.child.id()) {
            if !self.ranks.contains(&pid) {
                self.ranks.push(pid);
            }
        }
    }

    fn stop(&mut self, grace: Duration) {
        self.refresh_ranks();
        let leader = self.child.id() as i32;
        // SAFETY: kill(2) on pids this launcher started (torchrun's group) or saw as its children.
        unsafe {
            for &pid in &self.ranks {
                libc::kill(pid as i32, libc::SIGINT);
            }
            libc::killpg(leader, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            let torchrun_done = matches!(self.child.try_wait(), Ok(Some(_)));
            if torchrun_done && self.ranks.iter().all(|&p| !alive(p)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_all();
    }

    /// SIGKILL to every rank's group and torchrun's, then reaps torchrun.
    fn kill_all(&mut self) {
        // SAFETY: as in `stop`. A rank leads its own group (torchrun starts it in a new session).
        unsafe {
            for &pid in &self.ranks {
                if alive(pid) {
                    libc::killpg(pid as i32, libc::SIGKILL);
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            libc::killpg(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ranks.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a failed run said: first each rank's own error line (`pivot-train rank N: ...`), which
/// torchrun's long report of the failed workers would otherwise push out of view, then the last
/// lines of the captured stderr.
fn failure_report(stderr: &str) -> String {
    let own: Vec<&str> = stderr.lines().filter(|l| l.starts_with("pivot-train rank ") || l.starts_with("pivot-train: ")).collect();
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if own.is_empty() { tail } else { format!("{}\n--- torchrun's stderr, last lines:\n{tail}", own.join("\n")) }
}

/// `path` itself when it names a file; a bare name (no `/`) is looked up on PATH, as exec does.
fn executable(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 || path.is_absolute() {
        return path.is_file().then(|| path.to_path_buf());
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs).map(|d| d.join(path)).find(|p| p.is_file())
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped, counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pids whose parent is `parent` (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()))
                == Some(parent)
        })
        .collect()
}

/// Follows a JSON-lines file that another process appends to: whole lines only.
struct Lines {
    file: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    partial: String,
    line: usize,
}

impl Lines {
    fn new(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| PivotError::file(path, e))?;
        Ok(Lines { file: std::io::BufReader::new(file), path: path.to_path_buf(), partial: String::new(), line: 0 })
    }

    fn read(&mut self) -> Result<Vec<StepMetrics>> {
        let mut rows = Vec::new();
        loop {
            let n = self.file.read_line(&mut self.partial).map_err(|e| PivotError::file(&self.path, e))?;
            if n == 0 || !self.partial.ends_with('\n') {
                // Nothing more yet, or half a line: the rest comes with the writer's next write.
                return Ok(rows);
            }
            self.line += 1;
            let row = serde_json::from_str(self.partial.trim_end()).map_err(|e| PivotError::file(format!("{}:{}", self.path.display(), self.line), format!("not a step's metrics: {e}")))?;
            rows.push(row);
            self.partial.clear();
        }
    }
}

/// Loads the newest complete checkpoint under `dir` (or `dir` itself, when it is one) into
/// `mllm`, which must have the run's architecture; returns the checkpoint's trainer state (its
/// step, and the log up to it).
pub fn load_checkpoint(mllm: &Mllm, dir: impl AsRef<Path>) -> Result<TrainerState> {
    let loaded = checkpoint::open(dir.as_ref())?;
    checkpoint::load_model(mllm, &loaded.model, "")?;
    Ok(loaded.state)
}
