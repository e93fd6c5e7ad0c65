//! Pre-started engines ("spares"): a process that has already started a `Session` (evcxr context,
//! `:dep pivot`, the prelude cell) and made rust-analyzer do its first type inference, waiting
//! for a new kernel or REPL to adopt it. A warm start cost ~61 CPU-s in session 13, 53 of them
//! in rust-analyzer's first analysis of the prelude's crate graph (evcxr's then; since session 16
//! the engine's own, `analysis`); a spare moves that cost off the critical path.
//!
//! Design, and why:
//! - The spare does not hand its session to the new process (an evcxr context, its child process
//!   and rust-analyzer's database cannot move between processes). Instead the new process hands
//!   itself to the spare: it connects to the spare's Unix socket and sends its stdin, stdout and
//!   stderr (SCM_RIGHTS) and its arguments; the spare puts them on its fds 0/1/2 and runs the
//!   front end (the Jupyter server on the connection file, or the REPL on the user's terminal)
//!   with the session it has. The launched process stays alive as a thin proxy: it forwards every
//!   signal a front end or a terminal sends it (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH,
//!   SIGUSR1/2) to the spare and exits with the spare's exit status, so Jupyter's pid watching,
//!   its signals and shells' `$?` see what they see with a normal start. If the proxy dies
//!   (SIGKILL), the spare sees the socket close and ends too. Ctrl-Z, `fg` and `bg` stop and continue
//!   the two together (`jobctl`).
//! - Adoption is only correct if the spare was started exactly as the new process would start
//!   its own engine. The spare's socket is named after a key: a hash of everything that decides
//!   what a start produces: the executable (path, size, mtime), the front end, the prelude's
//!   path and the mtimes of its sources and of the workspace's Cargo.lock, the working directory
//!   (the evcxr child runs there), and the whole environment except a short list of variables
//!   that only describe one launch (`PER_LAUNCH_VARS`, documented there). Any difference means
//!   another socket name, so a mismatch is never adopted; `<key>.json` beside the socket lists
//!   the spare's fields, so the new process can say in its log which fields differ.
//! - The handshake is bounded (connect or fail at once, 10 s for the reply) and every failure
//!   (no spare, a stale socket, a dead spare, a refused or broken handover) falls back to a
//!   normal start with one line on stderr saying why: never a hang, never a wrong environment.
//!   A spare takes one adoption: it removes its socket before it answers.
//! - One spare per key: the spare holds an flock on `<key>.lock` (which holds its pid) until it is
//!   adopted or exits, binds the socket only once it is warm (under a temporary name, then
//!   renamed), and exits after an idle timeout (`PIVOT_SPARE_IDLE_SECS`, default 20 min). It holds
//!   its build slot's lock like any session. Adoption releases the key's lock, so the adopted
//!   engine can start the spare for the next launch of the same configuration (`make demo`'s
//!   chain of notebooks).
//! - A launch that finds the key locked but no socket yet meets a spare that is still warming up.
//!   It waits for it (up to `PIVOT_SPARE_WAIT_SECS`, default 40 s, inside the 60 s Jupyter clients
//!   give a kernel to answer) rather than start a second engine of the same configuration beside
//!   it: the spare began earlier and does the same work, so it is ready first, and two engines
//!   warming on the same cores would both be late. If it is not ready by then, the launch starts
//!   normally and the spare stays for the next one.
//! - Recycling (`PIVOT_SPARE_ENGINE=1`, `make demo`): an adopted kernel that shuts down cleanly,
//!   with its engine idle, gives the session back instead of ending the process. The engine takes
//!   its key's lock again (so the next launch waits for it), lets the launcher exit with status 0
//!   (`release_launcher`: its own stdin, stdout and stderr come back), and `Session::recycle`
//!   restarts the child and clears evcxr's state and settings while rust-analyzer's analysis and
//!   the build slot stay warm; then it waits for the next launch. Only an adopted engine can do
//!   this: a normally started kernel is the process Jupyter waits on at shutdown.
//! - The folder is `<cache>/spares`, mode 0700; sockets are 0600, and the spare also checks the
//!   peer's uid (SO_PEERCRED): only the same user can hand it a terminal or a connection file.
//!
//! std has no stable API for SCM_RIGHTS (`UnixStream::send_vectored_with_ancillary` is
//! unstable), so the two calls that pass descriptors use libc's sendmsg/recvmsg directly.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::output::{Event, Sink};
use crate::paths;
use crate::session::{cpu_seconds, Frontend, Session};

/// `1`: a kernel that starts (normally or by adoption) starts a spare for the next kernel with
/// its own configuration, once its engine is ready. `make demo` sets it.
pub const ENABLE_ENV: &str = "PIVOT_SPARE_ENGINE";
/// Set (to anything): never adopt a spare.
pub const DISABLE_ENV: &str = "PIVOT_NO_SPARE";
/// Seconds a spare waits to be adopted before it exits (default 1200).
pub const IDLE_ENV: &str = "PIVOT_SPARE_IDLE_SECS";
pub const DEFAULT_IDLE_SECS: u64 = 1200;
/// Seconds a launch waits for a spare of its configuration that is still warming up (default 40;
/// 0: never wait).
pub const WAIT_ENV: &str = "PIVOT_SPARE_WAIT_SECS";
pub const DEFAULT_WAIT_SECS: u64 = 40;
const PROTOCOL: &str = "pivot-spare-1";
/// How long a spare waits for a warm build slot to come free (`slots::acquire_warm`).
pub const SLOT_PATIENCE: Duration = Duration::from_secs(30);

/// Variables left out of the key: they describe one launch, not the engine, and differ between
/// two kernels of the same configuration (Jupyter's per-kernel bookkeeping, the shell's own,
/// pytest's name of the test that is running when a test starts a kernel), or they only control
/// spares. An adopted engine's evcxr child was started with the spare's values
/// of these; nothing in the engine or the prelude reads them.
const PER_LAUNCH_VARS: &[&str] = &[
    "JPY_PARENT_PID",
    "JPY_SESSION_NAME",
    "JPY_INTERRUPT_EVENT",
    "_",
    "OLDPWD",
    "SHLVL",
    "PYTEST_CURRENT_TEST",
    ENABLE_ENV,
    DISABLE_ENV,
    IDLE_ENV,
    WAIT_ENV,
];

static ORIGINAL: OnceLock<(Vec<(OsString, OsString)>, Option<PathBuf>)> = OnceLock::new();

/// Records the environment and working directory as the process found them, before
/// `prepare_process_env` changes them: keys and spawned spares use these. Call first in `main`.
pub fn snapshot_env() {
    let _ = ORIGINAL.get_or_init(|| (std::env::vars_os().collect(), std::env::current_dir().ok()));
}

fn original() -> &'static (Vec<(OsString, OsString)>, Option<PathBuf>) {
    ORIGINAL.get_or_init(|| (std::env::vars_os().collect(), std::env::current_dir().ok()))
}

/// What must match for an adoption to be correct (see the module doc), field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub fields: BTreeMap<String, String>,
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// Newest mtime and file count under `dir` (the prelude's sources).
fn tree_stamp(dir: &Path, newest: &mut i128, count: &mut u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            tree_stamp(&e.path(), newest, count);
        } else {
            *newest = (*newest).max(mtime_ns(&m));
            *count += 1;
        }
    }
}

impl Config {
    /// This process's configuration for `frontend`, from the environment it started with.
    pub fn current(frontend: Frontend) -> Config {
        let mut f = BTreeMap::new();
        f.insert("protocol".into(), PROTOCOL.into());
        f.insert("frontend".into(), frontend.env_value().into());
        let exe = std::env::current_exe().ok();
        let exe_stamp = exe
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok().map(|m| format!("{} size={} mtime={}", p.display(), m.len(), mtime_ns(&m))))
            .unwrap_or_else(|| "unknown".into());
        f.insert("exe".into(), exe_stamp);
        let (env, cwd) = original();
        f.insert("cwd".into(), cwd.as_ref().map(|c| c.display().to_string()).unwrap_or_default());
        for (k, v) in env {
            let k = k.to_string_lossy().into_owned();
            if !PER_LAUNCH_VARS.contains(&k.as_str()) {
                f.insert(format!("env:{k}"), v.to_string_lossy().into_owned());
            }
        }
        // The prelude's path as this process resolves it (PIVOT_PRELUDE is in the environment
        // above, and no front end changes it; without it the path comes from the binary), and
        // the state of its sources.
        let prelude = paths::prelude_dir();
        let (mut newest, mut count) = (0i128, 0u64);
        tree_stamp(&prelude.join("src"), &mut newest, &mut count);
        tree_stamp(&prelude.join("dylib"), &mut newest, &mut count);
        for extra in [prelude.join("Cargo.toml"), prelude.join("../Cargo.lock")] {
            if let Ok(m) = std::fs::metadata(&extra) {
                newest = newest.max(mtime_ns(&m));
                count += 1;
            }
        }
        f.insert("prelude".into(), format!("{} files={count} newest={newest}", prelude.display()));
        Config { fields: f }
    }

    pub fn key(&self) -> String {
        let text = serde_json::to_string(&self.fields).unwrap_or_default();
        Sha256::digest(text.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    /// Names of the fields in which `other` differs from this (values are not shown: they may be
    /// secrets in the environment).
    pub fn differences(&self, other: &Config) -> Vec<String> {
        let mut names: Vec<String> = self.fields.keys().chain(other.fields.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names.into_iter().filter(|n| self.fields.get(n) != other.fields.get(n)).collect()
    }
}

/// `<cache>/spares`, created with mode 0700 (and set to it if it exists).
pub fn spares_dir() -> std::io::Result<PathBuf> {
    let dir = paths::cache_dir().join("spares");
    std::fs::create_dir_all(&dir)?;
    let m = std::fs::metadata(&dir)?;
    // SAFETY: getuid cannot fail.
    if m.uid() != unsafe { libc::getuid() } {
        return Err(std::io::Error::other(format!("{} belongs to another user", dir.display())));
    }
    if m.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(dir)
}

/// Forwards the session's events to the front end that adopts it; before that they go to the
/// spare's stderr (its log file).
#[derive(Clone, Default)]
pub struct SinkSwitch(Arc<Mutex<Option<Sink>>>);

impl SinkSwitch {
    pub fn sink(&self) -> Sink {
        let target = self.0.clone();
        Arc::new(move |e: Event| {
            let current = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match current {
                Some(s) => s(e),
                None => {
                    if let Event::Stream { text, .. } = e {
                        eprint!("{text}");
                    }
                }
            }
        })
    }
    pub fn set(&self, sink: Sink) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }
    /// Back to the spare's log (a recycled engine between two front ends).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The code whose completion makes rust-analyzer infer `let`s of common types (std, tch, the
/// prelude) the way a cell's first `let`s need them: in the engine's analysis (`analysis`) and in
/// evcxr's. Completion defines nothing, so no variable is left behind.
pub const WARMUP_COMPLETIONS: &[&str] = &[
    "let a = String::from(\"x\");\nlet b = 0.5_f64;\nlet c = 3usize;\nlet v = vec![1.0f32];\nlet t = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));\nlet n = a.len() + c;\nv.",
    "let lr = 3e-4;\nlet steps: usize = 20;\nlet run_name = String::from(\"warm\");\nlet p = std::path::PathBuf::from(&run_name);\nrun_name.",
];

/// A spare's engine: the session started in `slot` for `frontend` and warmed up, with the switch
/// that later points its output at the adopting front end. `program` names the spare in the
/// readiness line on stderr. The kernel's and the REPL's `spare` commands share it.
pub fn start_warm(frontend: Frontend, slot: &crate::slots::Slot, program: &str) -> anyhow::Result<(Warm, SinkSwitch)> {
    slot.seed_if_cold();
    let switch = SinkSwitch::default();
    let session = Session::start(crate::session::SessionOptions::new(frontend)?, switch.sink())?;
    slot.mark_warm();
    let warm = warm_up(session)?;
    eprintln!(
        "{program}: engine ready in {:.1} s (slot {}); rust-analyzer warm-up {:.1} s, {:.1} CPU-s",
        warm.session.startup.as_secs_f64(),
        slot.index,
        warm.wall_s,
        warm.cpu_s
    );
    Ok((warm, switch))
}

/// A session after the warm-up, with what the warm-up cost.
pub struct Warm {
    pub session: Session,
    /// When the session was up and the warm-up began.
    pub ready_at: Instant,
    pub wall_s: f64,
    pub cpu_s: f64,
}

/// Runs the `WARMUP_COMPLETIONS` and checks, with the session's own variable listing, that
/// nothing was defined: an adopted engine must look exactly like a fresh one.
pub fn warm_up(mut session: Session) -> anyhow::Result<Warm> {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for code in WARMUP_COMPLETIONS {
        let _ = session.complete(code, code.len());
        // evcxr's own rust-analyzer still reads every cell (over the standard library only, where
        // the engine's analysis answers for the rest): its first inference, too, before a user waits.
        session.warm_evcxr_analysis(code);
    }
    let vars = session.variables();
    if !vars.is_empty() {
        anyhow::bail!("the warm-up left variables behind: {vars:?}");
    }
    Ok(Warm { session, ready_at: t0, wall_s: t0.elapsed().as_secs_f64(), cpu_s: cpu_seconds() - c0 })
}

/// Appends the adoption to the `PIVOT_CELL_STATS` file, as a `"cell": 0` line with `adopted`
/// (the line of the start itself was written when the spare started).
pub fn record_adoption(a: &Adoption, startup: Duration, warm_up_cpu_s: f64, served: u64) {
    let Some(path) = std::env::var_os(crate::session::CELL_STATS_ENV) else { return };
    let line = json!({
        "pid": std::process::id(),
        "cell": 0,
        "adopted": {
            "launcher_pid": a.launcher_pid,
            "waited_s": a.waited.as_secs_f64(),
            "handover_s": a.handover.as_secs_f64(),
            "launcher_waited_s": a.launcher_waited.as_secs_f64(),
            "spare_start_wall_s": startup.as_secs_f64(),
            "warm_up_cpu_s": warm_up_cpu_s,
            "kernel_of_this_engine": served,
        },
    });
    crate::fastbuild::append_line(Path::new(&path), &line.to_string());
}

/// A spare that holds the lock for its key and will wait on the socket.
pub struct Claim {
    pub config: Config,
    pub key: String,
    dir: PathBuf,
    _lock: File,
}

/// Takes the lock for this configuration's spare; `Ok(None)` when another spare holds it.
pub fn claim(frontend: Frontend) -> anyhow::Result<Option<Claim>> {
    let config = Config::current(frontend);
    let key = config.key();
    let dir = spares_dir()?;
    claim_in(&dir, config, key)
}

fn claim_in(dir: &Path, config: Config, key: String) -> anyhow::Result<Option<Claim>> {
    let mut lock = File::options().create(true).truncate(false).write(true).open(dir.join(format!("{key}.lock")))?;
    // A few tries: a launch's `warming_spare` holds a shared lock for a moment while it looks.
    let mut tries = 0;
    // SAFETY: flock on an open descriptor.
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tries += 1;
        if tries == 5 {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pid, for a launch that finds this spare warming (`warming_spare`).
    lock.set_len(0)?;
    lock.write_all(std::process::id().to_string().as_bytes())?;
    Ok(Some(Claim { config, key, dir: dir.to_path_buf(), _lock: lock }))
}

/// The pid of the spare that holds `key`'s lock (one that is warming up, or waiting), if any.
fn warming_spare(dir: &Path, key: &str) -> Option<i32> {
    let path = dir.join(format!("{key}.lock"));
    let f = File::open(&path).ok()?;
    // SAFETY: flock on an open descriptor; a lock we get is released when `f` closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return None;
    }
    Some(std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0))
}

/// A front end handed over to this process.
pub struct Adoption {
    /// The launched process's arguments (without argv[0]).
    pub args: Vec<String>,
    pub launcher_pid: i32,
    /// How long the spare waited for it.
    pub waited: Duration,
    /// Time from the launcher's connect to the fds being in place.
    pub handover: Duration,
    /// How long the launcher waited for this spare's warm-up to finish.
    pub launcher_waited: Duration,
}

static HANDOVER: Mutex<Option<UnixStream>> = Mutex::new(None);
/// This process's own stdin, stdout and stderr (the spare's log) while a launcher's are in their
/// place, and the descriptor that stderr goes back to.
static OWN_FDS: Mutex<Option<([RawFd; 3], RawFd)>> = Mutex::new(None);
/// Adoptions so far, and the last one whose launcher the engine let go on purpose
/// (`release_launcher`): that adoption's watcher must not end the process.
static ADOPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static RELEASED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Claim {
    fn sock(&self) -> PathBuf {
        self.dir.join(format!("{}.sock", self.key))
    }

    /// Binds the socket (the session must be warm by now) and waits for a launcher. `Ok(None)`
    /// after `idle` without one. On adoption the launcher's stdin/stdout/stderr are on fds 0, 1
    /// and `stderr_fd` (2, or where the build log copies fd 2 to), `on_orphaned` runs (then the
    /// process exits) when the launcher goes away, and the key's lock is released: the adopted
    /// engine may start the next spare of its configuration.
    pub fn wait(self, idle: Duration, stderr_fd: RawFd, on_orphaned: impl FnOnce() + Send + 'static) -> anyhow::Result<Option<Adoption>> {
        let sock = self.sock();
        let tmp = self.dir.join(format!("{}.sock.{}", self.key, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let desc: Value = json!({"pid": std::process::id(), "fields": self.config.fields});
        let json_path = self.dir.join(format!("{}.json", self.key));
        write_private(&json_path, desc.to_string().as_bytes())?;
        std::fs::rename(&tmp, &sock)?;
        let cleanup = || {
            let _ = std::fs::remove_file(&sock);
            let _ = std::fs::remove_file(&json_path);
        };
        // A spare that is told to stop before it is adopted removes its socket first; the front
        // end installs its own handlers after the adoption.
        set_stop_handlers(true);
        eprintln!("pivot spare: waiting on {} (key {}, idle timeout {} s)", sock.display(), self.key, idle.as_secs());
        let since = Instant::now();
        loop {
            let left = idle.saturating_sub(since.elapsed());
            let sig = STOP.load(Ordering::SeqCst);
            if sig != 0 {
                cleanup();
                eprintln!("pivot spare: stopped by signal {sig} before anyone adopted it");
                return Ok(None);
            }
            if left.is_zero() {
                cleanup();
                eprintln!("pivot spare: nobody adopted this engine in {} s; exiting", idle.as_secs());
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // Short slices: a stop signal may land on another thread and not interrupt this poll.
            // SAFETY: one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(500) as i32) };
            if r <= 0 {
                continue;
            }
            let Ok((stream, _)) = listener.accept() else { continue };
            let t0 = Instant::now();
            match self.handshake(&stream) {
                Ok((args, pid, launcher_waited, fds)) => {
                    // One adoption per spare: nobody else may connect from here on.
                    cleanup();
                    set_stop_handlers(false);
                    let reply = json!({"adopted": true, "pid": std::process::id()}).to_string() + "\n";
                    if (&stream).write_all(reply.as_bytes()).is_err() {
                        eprintln!("pivot spare: the launcher went away during the handover; exiting");
                        return Ok(None);
                    }
                    // SAFETY: descriptors received from the launcher, placed on our standard fds;
                    // our own are kept for `release_launcher` (a recycled engine's log).
                    unsafe {
                        let own = [libc::dup(0), libc::dup(1), libc::dup(stderr_fd)];
                        for fd in own {
                            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                        }
                        *OWN_FDS.lock().unwrap_or_else(|e| e.into_inner()) = Some((own, stderr_fd));
                        libc::dup2(fds[0], 0);
                        libc::dup2(fds[1], 1);
                        libc::dup2(fds[2], stderr_fd);
                        for fd in fds {
                            libc::close(fd);
                        }
                    }
                    // The handshake's timeouts are the socket's, shared by every clone: the
                    // watcher below must block for the kernel's whole life.
                    stream.set_read_timeout(None)?;
                    stream.set_write_timeout(None)?;
                    let watch = stream.try_clone()?;
                    let adoption = ADOPTIONS.fetch_add(1, Ordering::SeqCst) + 1;
                    *HANDOVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                    crate::jobctl::set_launcher(Some(pid));
                    std::thread::Builder::new().name("pivot-spare-watch".into()).spawn(move || {
                        let mut b = [0u8; 64];
                        let mut w = watch;
                        loop {
                            match w.read(&mut b) {
                                Ok(0) => break,
                                Ok(_) => {}
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
                                Err(_) => break,
                            }
                        }
                        if RELEASED.load(Ordering::SeqCst) >= adoption {
                            return; // the engine let its launcher go to serve the next one
                        }
                        eprintln!("pivot: the launched process (pid {pid}) is gone; this adopted engine exits");
                        on_orphaned();
                        std::process::exit(1);
                    })?;
                    drop(self);
                    return Ok(Some(Adoption { args, launcher_pid: pid, waited: since.elapsed(), handover: t0.elapsed(), launcher_waited }));
                }
                Err(e) => {
                    eprintln!("pivot spare: refused a handover: {e:#}");
                    let reply = json!({"adopted": false, "reason": format!("{e:#}")}).to_string() + "\n";
                    let _ = (&stream).write_all(reply.as_bytes());
                }
            }
        }
    }

    fn handshake(&self, stream: &UnixStream) -> anyhow::Result<(Vec<String>, i32, Duration, [RawFd; 3])> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let peer = peer_uid(stream)?;
        // SAFETY: getuid cannot fail.
        if peer != unsafe { libc::getuid() } {
            anyhow::bail!("the peer runs as uid {peer}, not as this user");
        }
        let (line, fds) = recv_line_with_fds(stream)?;
        let close = |fds: &[RawFd]| {
            for &fd in fds {
                // SAFETY: descriptors we received and own.
                unsafe { libc::close(fd) };
            }
        };
        let req: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                close(&fds);
                anyhow::bail!("bad request: {e}");
            }
        };
        if req.get("key").and_then(Value::as_str) != Some(self.key.as_str()) || fds.len() != 3 {
            close(&fds);
            anyhow::bail!("the request is for another configuration or lacks stdin/stdout/stderr");
        }
        let args = req.get("args").and_then(Value::as_array).map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default();
        let pid = req.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32;
        let waited = Duration::from_secs_f64(req.get("waited_s").and_then(Value::as_f64).unwrap_or(0.0).clamp(0.0, 1e6));
        Ok((args, pid, waited, [fds[0], fds[1], fds[2]]))
    }
}

static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_stop(sig: libc::c_int) {
    STOP.store(sig, Ordering::SeqCst);
}

const STOPPING: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// While waiting (`on`): SIGTERM, SIGINT and SIGHUP end the wait (checked between polls). Off:
/// their default dispositions again.
fn set_stop_handlers(on: bool) {
    for &sig in STOPPING {
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = if on { note_stop as extern "C" fn(libc::c_int) as usize } else { libc::SIG_DFL };
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = File::options().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(data)
}

fn peer_uid(stream: &UnixStream) -> anyhow::Result<u32> {
    // SAFETY: getsockopt fills a ucred of the size we pass.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    if r != 0 {
        anyhow::bail!("SO_PEERCRED: {}", std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Sends `data` with `fds` attached to its first byte.
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_* compute sizes and offsets inside the buffer we allocate here; sendmsg reads
    // the iovec and control buffer, which outlive the call.
    unsafe {
        let space = libc::CMSG_SPACE(payload) as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), fds.len());
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut rest = &data[n as usize..];
        let mut s = stream;
        while !rest.is_empty() {
            let k = s.write(rest)?;
            rest = &rest[k..];
        }
    }
    Ok(())
}

/// Reads one newline-terminated message and the descriptors that came with it.
fn recv_line_with_fds(stream: &UnixStream) -> anyhow::Result<(Vec<u8>, Vec<RawFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !line.contains(&b'\n') {
        if line.len() > 1 << 20 {
            anyhow::bail!("request too long");
        }
        // SAFETY: as in `send_with_fds`; received descriptors are copied out of the buffer.
        unsafe {
            let space = libc::CMSG_SPACE((8 * std::mem::size_of::<RawFd>()) as u32) as usize;
            let mut cbuf = vec![0u64; space.div_ceil(8)];
            let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                for fd in fds {
                    libc::close(fd);
                }
                anyhow::bail!("reading the request: {e}");
            }
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(std::ptr::read_unaligned(data.add(i)));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            if n == 0 {
                for fd in fds {
                    libc::close(fd);
                }
                anyhow::bail!("the launcher closed the connection");
            }
            line.extend_from_slice(&buf[..n as usize]);
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok((line, fds))
}

/// Ends the process with `code`; an adopted engine first tells its launcher, which exits with it.
pub fn exit(code: i32) -> ! {
    // The launcher exits as soon as it reads the status, closing the socket: the watcher must not
    // take that for a launcher that died (it printed "is gone" and raced this exit with its own).
    RELEASED.store(ADOPTIONS.load(Ordering::SeqCst), Ordering::SeqCst);
    if let Some(s) = HANDOVER.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        tell_exit(s, code);
    }
    std::process::exit(code)
}

/// The line that makes the launcher (`Adopted::proxy`) exit with `code`.
fn tell_exit(launcher: &mut UnixStream, code: i32) {
    let _ = launcher.write_all(format!("{}\n", json!({"exit": code})).as_bytes());
    let _ = launcher.flush();
}

/// Whether this process is an adopted spare.
pub fn adopted() -> bool {
    HANDOVER.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Whether an adopted engine, when its front end shuts down cleanly, is recycled into the spare
/// for the next launch (`PIVOT_SPARE_ENGINE=1`, `make demo`) instead of ending.
pub fn recycling() -> bool {
    adopted() && std::env::var(ENABLE_ENV).is_ok_and(|v| v == "1")
}

/// Ends the adoption without ending the process: the launcher exits with `code`, and this
/// process's own stdin, stdout and stderr come back, so the engine can wait for the next launch.
pub fn release_launcher(code: i32) {
    RELEASED.store(ADOPTIONS.load(Ordering::SeqCst), Ordering::SeqCst);
    crate::jobctl::set_launcher(None);
    if let Some(mut s) = HANDOVER.lock().unwrap_or_else(|e| e.into_inner()).take() {
        tell_exit(&mut s, code);
    }
    if let Some((own, stderr_fd)) = OWN_FDS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: descriptors this process duplicated at the adoption and still owns.
        unsafe {
            for (fd, target) in own.into_iter().zip([0, 1, stderr_fd]) {
                libc::dup2(fd, target);
                libc::close(fd);
            }
        }
    }
}

/// After an adopted front end ended with its engine idle and exit status `code` (`recycling`):
/// takes this configuration's key again before the launcher goes, so a launch that follows at once
/// waits for the recycling instead of starting a second engine; runs `before_release` (what the
/// front end must undo while the launcher's descriptors are still ours); lets the launcher exit
/// with `code`; and recycles `session`, its output back on the spare's log. Returns the claim to
/// wait on for the next launch, or None (said on stderr) when recycling failed. Ends the process
/// with `code` when another spare took the key meanwhile. The kernel's and the REPL's spares share it.
pub fn recycle_for_next(
    frontend: Frontend,
    session: &mut Session,
    switch: &SinkSwitch,
    code: i32,
    served: u64,
    slot_index: usize,
    before_release: impl FnOnce(),
) -> Option<Claim> {
    let program = match frontend {
        Frontend::Jupyter => "pivot-kernel spare",
        Frontend::Repl => "pivot-repl --spare",
    };
    let claim = match claim(frontend) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("{program}: another spare of this configuration started meanwhile; exiting");
            exit(code)
        }
        Err(e) => {
            eprintln!("{program}: cannot take this configuration's spare lock again ({e:#}); exiting");
            exit(code)
        }
    };
    before_release();
    release_launcher(code);
    switch.clear();
    let t0 = Instant::now();
    if let Err(e) = session.recycle() {
        eprintln!("{program}: recycling the engine failed ({e:#}); exiting");
        return None;
    }
    eprintln!("{program}: engine recycled in {:.1} s after launch {served} (slot {slot_index})", t0.elapsed().as_secs_f64());
    Some(claim)
}

/// The spare that took this launch over.
pub struct Adopted {
    pub spare_pid: i32,
    /// How long this launch waited for the spare's warm-up (zero when it was ready).
    pub waited: Duration,
    stream: UnixStream,
}

/// Hands this launch (stdin, stdout, stderr, `args`) to a spare of this configuration, if one is
/// waiting. `None` means start normally; `log` gets one line saying why when a spare was there
/// (or a mismatching one), and nothing when there is none at all.
pub fn try_adopt(frontend: Frontend, args: &[String], log: &dyn Fn(&str)) -> Option<Adopted> {
    if std::env::var_os(DISABLE_ENV).is_some() {
        return None;
    }
    let config = Config::current(frontend);
    let key = config.key();
    let dir = match spares_dir() {
        Ok(d) => d,
        Err(e) => {
            log(&format!("no spare engine (cannot use the spares folder: {e}); starting normally"));
            return None;
        }
    };
    let sock = dir.join(format!("{key}.sock"));
    let t0 = Instant::now();
    let mut waiting_for: Option<i32> = None;
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                log(&format!("the spare engine at {} does not answer ({e}: a stale socket); starting normally", sock.display()));
                return None;
            }
        }
        let limit = wait_limit();
        match (warming_spare(&dir, &key), waiting_for) {
            (Some(pid), None) if !limit.is_zero() => {
                log(&format!("the spare engine of this configuration (pid {pid}) is still warming up; waiting up to {} s for it", limit.as_secs()));
                waiting_for = Some(pid);
            }
            (Some(pid), Some(_)) => {
                if t0.elapsed() >= limit {
                    log(&format!(
                        "the spare engine (pid {pid}) was not ready after {:.0} s; starting normally (it stays for the next launch)",
                        t0.elapsed().as_secs_f64()
                    ));
                    return None;
                }
            }
            (None, Some(pid)) => {
                // Between its last check and this one the spare bound its socket and was taken,
                // or it ended.
                if let Ok(s) = UnixStream::connect(&sock) {
                    break s;
                }
                log(&format!("the spare engine (pid {pid}) ended or was taken by another launch before it was ready; starting normally"));
                return None;
            }
            _ => {
                if let Some(why) = mismatches(&dir, &config, frontend) {
                    log(&format!("no spare engine for this configuration ({why}); starting normally"));
                }
                return None;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = t0.elapsed();
    match handover(&stream, &key, args, waited) {
        Ok(pid) => Some(Adopted { spare_pid: pid, waited, stream }),
        Err(e) => {
            log(&format!("the handover to the spare engine failed ({e:#}); starting normally"));
            None
        }
    }
}

/// How long a launch waits for a warming spare: `PIVOT_SPARE_WAIT_SECS` or 40 s.
fn wait_limit() -> Duration {
    Duration::from_secs(std::env::var(WAIT_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_WAIT_SECS))
}

fn handover(stream: &UnixStream, key: &str, args: &[String], waited: Duration) -> anyhow::Result<i32> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let req = json!({"key": key, "args": args, "pid": std::process::id(), "waited_s": waited.as_secs_f64()}).to_string() + "\n";
    send_with_fds(stream, req.as_bytes(), &[0, 1, 2])?;
    // Byte by byte: a buffered reader could swallow the exit line of a spare that ends at once,
    // which `proxy` must read.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut s = stream;
    while line.last() != Some(&b'\n') {
        match s.read(&mut byte)? {
            0 => anyhow::bail!("the spare closed the connection"),
            _ => line.push(byte[0]),
        }
        if line.len() > 1 << 16 {
            anyhow::bail!("the spare's reply is too long");
        }
    }
    let line = String::from_utf8_lossy(&line);
    let reply: Value = serde_json::from_str(&line)?;
    if reply.get("adopted").and_then(Value::as_bool) != Some(true) {
        anyhow::bail!("refused: {}", reply.get("reason").and_then(Value::as_str).unwrap_or("no reason given"));
    }
    Ok(reply.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32)
}

/// Says which fields differ from the spares of the same front end that are waiting, if any.
fn mismatches(dir: &Path, config: &Config, frontend: Frontend) -> Option<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Ok(v) = std::fs::read_to_string(&p).map_err(|_| ()).and_then(|t| serde_json::from_str::<Value>(&t).map_err(|_| ())) else { continue };
        let fields: BTreeMap<String, String> = v
            .get("fields")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
            .unwrap_or_default();
        if fields.get("frontend").map(String::as_str) != Some(frontend.env_value()) {
            continue;
        }
        let other = Config { fields };
        let pid = v.get("pid").and_then(Value::as_i64).unwrap_or(0);
        // SAFETY: signal 0 only checks that the process exists.
        if pid <= 0 || unsafe { libc::kill(pid as i32, 0) } != 0 {
            continue; // left by a spare that was killed
        }
        let diff = config.differences(&other);
        found.push(format!("spare pid {pid} differs in {}", diff.join(", ")));
    }
    (!found.is_empty()).then(|| found.join("; "))
}

static SPARE_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = SPARE_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Signals a front end or a terminal sends the launched process, passed on to the spare.
const FORWARDED: &[libc::c_int] = &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGWINCH, libc::SIGUSR1, libc::SIGUSR2];

impl Adopted {
    /// Serves as the spare's stand-in until it exits, then exits with its status.
    pub fn proxy(self) -> ! {
        SPARE_PID.store(self.spare_pid, Ordering::SeqCst);
        crate::jobctl::arm_launcher(self.spare_pid);
        for &sig in FORWARDED {
            // The handler only calls kill(2).
            crate::signal::install(sig, forward_signal);
        }
        let _ = self.stream.set_read_timeout(None);
        let mut r = BufReader::new(&self.stream);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    eprintln!("pivot: the adopted engine (pid {}) ended without an exit status", self.spare_pid);
                    std::process::exit(1);
                }
                Ok(_) => {
                    if let Some(code) = serde_json::from_str::<Value>(&line).ok().and_then(|v| v.get("exit").and_then(Value::as_i64)) {
                        std::process::exit(code as i32);
                    }
                }
            }
        }
    }
}

/// Starts a spare for the next launch of this configuration, detached (own session, so a front
/// end that signals this kernel's process group does not reach it), with the environment and
/// working directory this process started with; its output goes to `<key>.log` in the spares
/// folder. `args` is the spare subcommand of this executable.
pub fn spawn(frontend: Frontend, args: &[&str]) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let key = Config::current(frontend).key();
    let dir = spares_dir()?;
    let log = File::options().create(true).append(true).open(dir.join(format!("{key}.log")))?;
    let (env, cwd) = original();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).env_clear().envs(env.iter().map(|(k, v)| (k, v))).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let _ = std::thread::Builder::new().name("pivot-spare-reaper".into()).spawn(move || child.wait());
    Ok(pid)
}

/// A spare that `prestart` saw ready.
pub struct ReadySpare {
    pub pid: i32,
    /// Time from the call to the spare's socket being bound (zero when one was ready already).
    pub waited: Duration,
    /// True when this call started the spare, false when it found one (warming up or ready).
    pub started_here: bool,
}

/// Makes sure a spare of this process's configuration is ready to be adopted, and waits for it:
/// one already waiting is kept, one warming up is waited for, otherwise one is started (`spawn`
/// with `args`). For a launcher that knows the next launches' environment and working directory
/// (tools/run_study.py, before its first notebook), so that the engine's start happens before
/// the first notebook instead of inside it. Fails, with the end of the spare's log, if the spare
/// ends before it is ready or is not ready within `limit`.
pub fn prestart(frontend: Frontend, args: &[&str], limit: Duration) -> anyhow::Result<ReadySpare> {
    let key = Config::current(frontend).key();
    let dir = spares_dir()?;
    let (sock, log) = (dir.join(format!("{key}.sock")), dir.join(format!("{key}.log")));
    let t0 = Instant::now();
    // What the log held before: an error shows only what this spare wrote.
    let log_len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let (pid, started_here) = match (sock.exists(), warming_spare(&dir, &key)) {
        (true, Some(pid)) => return Ok(ReadySpare { pid, waited: Duration::ZERO, started_here: false }),
        (_, Some(pid)) => (pid, false),
        (_, None) => {
            let pid = spawn(frontend, args)? as i32;
            // The lock shows the spare's own pid once it has claimed the key; until then (it
            // is still execing) only the pid we started is known.
            let claimed = loop {
                if let Some(p) = warming_spare(&dir, &key).filter(|&p| p == pid) {
                    break p;
                }
                if !alive(pid) {
                    anyhow::bail!("the spare engine (pid {pid}) ended before it claimed its configuration:\n{}", log_tail(&log, log_len));
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    anyhow::bail!("the spare engine (pid {pid}) did not claim its configuration within 30 s:\n{}", log_tail(&log, log_len));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            (claimed, true)
        }
    };
    loop {
        let holder = warming_spare(&dir, &key);
        if sock.exists() && holder == Some(pid) {
            return Ok(ReadySpare { pid, waited: t0.elapsed(), started_here });
        }
        if !alive(pid) {
            anyhow::bail!("the spare engine (pid {pid}) ended before it was ready:\n{}", log_tail(&log, log_len));
        }
        if holder.is_none_or(|h| h != pid && h != 0) {
            // It let go of its configuration while alive: a launch adopted it between two looks.
            // (0: the lock file was being rewritten as we read it.)
            anyhow::bail!("the spare engine (pid {pid}) was adopted by another launch as soon as it was ready");
        }
        if t0.elapsed() > limit {
            anyhow::bail!("the spare engine (pid {pid}) was not ready after {} s; it keeps warming up for the next launch", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl std::fmt::Display for ReadySpare {
    /// The line `pivot-kernel spare --detach` and `pivot-repl --spare --detach` print (run_study.py
    /// and the tests read it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.started_here { "started" } else if self.waited.is_zero() { "found waiting" } else { "found warming up" };
        write!(f, "spare engine pid {} {how}, ready after {:.1} s", self.pid, self.waited.as_secs_f64())
    }
}

/// With `PIVOT_SPARE_ENGINE=1`, once a front end's engine is up: a spare for the next launch of
/// its configuration (`spawn` with `args`, the front end's spare subcommand), with one line on
/// stderr saying so. The kernel and the REPL call it.
pub fn keep_one(frontend: Frontend, args: &[&str]) {
    if !std::env::var(ENABLE_ENV).is_ok_and(|v| v == "1") {
        return;
    }
    let (program, next) = match frontend {
        Frontend::Jupyter => ("pivot-kernel", "kernel"),
        Frontend::Repl => ("pivot-repl", "REPL"),
    };
    match spawn(frontend, args) {
        Ok(pid) => eprintln!("{program}: started spare engine pid {pid} for the next {next} ({ENABLE_ENV}=1)"),
        Err(e) => eprintln!("{program}: could not start a spare engine: {e:#}"),
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists. A zombie (exited, not yet reaped by
    // `spawn`'s reaper thread) counts as ended.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// The last lines of a spare's log written after byte `from`.
fn log_tail(log: &Path, from: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    format!("{} (the whole log: {})", lines[lines.len().saturating_sub(20)..].join("\n"), log.display())
}

/// The idle timeout: `PIVOT_SPARE_IDLE_SECS` or 20 min.
pub fn idle_timeout() -> Duration {
    Duration::from_secs(std::env::var(IDLE_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_IDLE_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_the_request_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile_fd();
        send_with_fds(&a, b"{\"k\":1}\n", &[f, f, f]).unwrap();
        let (line, fds) = recv_line_with_fds(&b).unwrap();
        assert_eq!(line, b"{\"k\":1}");
        assert_eq!(fds.len(), 3);
        for fd in fds {
            assert!(fd != f && fd > 2);
            unsafe { libc::close(fd) };
        }
    }

    fn tempfile_fd() -> RawFd {
        let f = File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        std::mem::forget(f);
        fd
    }

    #[test]
    fn a_launch_sees_a_spare_warming_while_it_holds_its_key_and_not_after() {
        let dir = std::env::temp_dir().join(format!("pivot-spare-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config { fields: BTreeMap::new() };
        let key = config.key();
        assert_eq!(warming_spare(&dir, &key), None, "no lock file: no spare");
        let claim = claim_in(&dir, config.clone(), key.clone()).unwrap().expect("a free key is claimed");
        assert_eq!(warming_spare(&dir, &key), Some(std::process::id() as i32));
        assert!(claim_in(&dir, config.clone(), key.clone()).unwrap().is_none(), "one spare per key");
        drop(claim);
        assert_eq!(warming_spare(&dir, &key), None, "the lock file stays, but nobody holds it");
        assert!(claim_in(&dir, config, key).unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn differences_name_fields_not_values() {
        let mut a = Config { fields: BTreeMap::new() };
        a.fields.insert("env:A".into(), "1".into());
        a.fields.insert("cwd".into(), "/x".into());
        let mut b = a.clone();
        b.fields.insert("env:A".into(), "2".into());
        b.fields.insert("env:B".into(), "secret".into());
        assert_eq!(a.differences(&b), vec!["env:A".to_string(), "env:B".to_string()]);
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key(), a.clone().key());
    }
}
