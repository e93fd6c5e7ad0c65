//! The kernel's `Session`, started in a background thread so the prompt appears at once.
//!
//! The session lives on its own thread for its whole life; the front end talks to it through a
//! channel. The first request that needs it waits for the start to finish.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use pivot_engine::{slots, CellResult, Frontend, Interrupter, Session, SessionOptions, Sink};

pub enum State {
    Starting,
    Ready(Interrupter),
    Failed(String),
}

/// (start byte, end byte, candidates with their kinds).
pub type Completions = (usize, usize, Vec<(String, String)>);

enum Request {
    Execute(String, Sender<CellResult>),
    Complete(String, usize, Sender<Completions>),
    /// Stop serving and hand the session and its slot back (`Engine::finish`).
    Finish(Sender<(Session, slots::Slot)>),
}

struct Shared {
    state: Arc<(Mutex<State>, Condvar)>,
    ready_after: Arc<Mutex<Option<Duration>>>,
    started: Instant,
}

pub struct Engine {
    state: Arc<(Mutex<State>, Condvar)>,
    tx: Sender<Request>,
    pub started: Instant,
    pub ready_after: Arc<Mutex<Option<Duration>>>,
    /// An input waits for the start: skip the rust-analyzer warm-up and run it at once.
    pending: Arc<std::sync::atomic::AtomicBool>,
}

/// What the front end reports while the engine starts.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

impl Engine {
    /// Starts the session on a new thread. `slot` is kept locked for the session's life.
    pub fn spawn(slot: slots::Slot, sink: Sink, progress: Progress, warmup: bool) -> Engine {
        let state = Arc::new((Mutex::new(State::Starting), Condvar::new()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let ready_after = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, ra, pe) = (state.clone(), ready_after.clone(), pending.clone());
        let warmup = move || warmup && !pe.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::Builder::new()
            .name("pivot-engine".into())
            .spawn(move || run(slot, sink, progress, Shared { state: st, ready_after: ra, started }, rx, &warmup))
            .expect("spawn engine thread");
        Engine { state, tx, started, ready_after, pending }
    }

    /// Serves a session a spare engine started before this REPL was launched.
    pub fn adopt(slot: slots::Slot, session: Session) -> Engine {
        let state = Arc::new((Mutex::new(State::Ready(session.interrupter())), Condvar::new()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let ready_after = Arc::new(Mutex::new(Some(Duration::ZERO)));
        let started = Instant::now();
        let pending = Arc::new(std::sync::atomic::AtomicBool::new(true));
        std::thread::Builder::new()
            .name("pivot-engine".into())
            .spawn(move || {
                // A recycled engine becomes the next spare itself when this REPL ends.
                if !pivot_engine::spare::recycling() {
                    pivot_engine::spare::keep_one(Frontend::Repl, &["--spare"]);
                }
                serve(session, slot, rx);
            })
            .expect("spawn engine thread");
        Engine { state, tx, started, ready_after, pending }
    }

    pub fn is_ready(&self) -> bool {
        matches!(*self.state.0.lock().unwrap_or_else(|e| e.into_inner()), State::Ready(_))
    }

    pub fn interrupter(&self) -> Option<Interrupter> {
        match &*self.state.0.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(i) => Some(i.clone()),
            _ => None,
        }
    }

    /// Waits until the start finished; `cancel` is polled (Ctrl-C). Ok(false) = cancelled.
    pub fn wait_ready(&self, cancel: &dyn Fn() -> bool) -> Result<bool, String> {
        self.pending.store(true, std::sync::atomic::Ordering::SeqCst);
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*g {
                State::Ready(_) => return Ok(true),
                State::Failed(m) => return Err(m.clone()),
                State::Starting => {}
            }
            if cancel() {
                return Ok(false);
            }
            g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Runs a cell (the engine must be ready).
    pub fn execute(&self, code: &str) -> CellResult {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Request::Execute(code.to_string(), tx)).is_err() {
            return dead();
        }
        rx.recv().unwrap_or_else(|_| dead())
    }

    /// The session and its build slot, back from the engine thread once it is idle: for a spare
    /// engine to serve the next REPL (`pivot_engine::spare::recycling`). None if the engine never
    /// started, has gone, or is still busy after 5 s (a completion; cells run on the caller's
    /// thread, so none is running).
    pub fn finish(&self) -> Option<(Session, slots::Slot)> {
        if !self.is_ready() {
            return None;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx.send(Request::Finish(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }

    /// Completions, or nothing while the engine is still starting or too slow to answer.
    pub fn complete(&self, code: &str, pos: usize) -> Completions {
        if !self.is_ready() {
            return (pos, pos, vec![]);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Request::Complete(code.to_string(), pos, tx)).is_err() {
            return (pos, pos, vec![]);
        }
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or((pos, pos, vec![]))
    }
}

fn dead() -> CellResult {
    CellResult {
        error: Some(pivot_engine::CellError::new("EngineGone", "the evaluation engine stopped; restart pivot-repl")),
        ..Default::default()
    }
}

fn run(
    slot: slots::Slot,
    sink: Sink,
    progress: Progress,
    shared: Shared,
    rx: Receiver<Request>,
    warmup: &dyn Fn() -> bool,
) {
    let Shared { state, ready_after, started } = shared;
    let set = |s: State| {
        *state.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
        state.1.notify_all();
    };
    if !slot.is_warm() {
        progress(&format!("build slot {} is cold: copying a warm one if there is one…", slot.index));
        slot.seed_if_cold();
        progress("building the prelude (tch, libtorch bindings); the first time takes minutes…");
    }
    let session = SessionOptions::new(Frontend::Repl).and_then(|opts| Session::start(opts, sink));
    crate::sys::release_stderr();
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            set(State::Failed(format!("{e:#}")));
            return;
        }
    };
    slot.mark_warm();
    *ready_after.lock().unwrap_or_else(|e| e.into_inner()) = Some(started.elapsed());
    set(State::Ready(session.interrupter()));
    progress(&format!("engine ready in {:.1} s (build slot {})", started.elapsed().as_secs_f64(), slot.index));
    // rust-analyzer loads the crate graph (std, tch, the prelude) on first use, which costs the
    // first `let` ~10 s; an interactive session does it now, while the user is still typing.
    if warmup() && std::env::var_os("PIVOT_REPL_NO_WARMUP").is_none() && rx.is_empty() {
        let code = "let _pivot_warmup = 1u8;\n_pivot_warm";
        let _ = session.complete(code, code.len());
    }
    pivot_engine::spare::keep_one(Frontend::Repl, &["--spare"]);
    serve(session, slot, rx);
}

/// Serves requests until the front end goes (the session ends with the thread, the slot's lock
/// with it) or asks for the session back.
fn serve(mut session: Session, slot: slots::Slot, rx: Receiver<Request>) {
    for req in rx {
        match req {
            Request::Execute(code, reply) => {
                let r = session.execute(&code, &read_input);
                let _ = reply.send(r);
            }
            Request::Complete(code, pos, reply) => {
                let _ = reply.send(session.complete(&code, pos));
            }
            Request::Finish(reply) => {
                let _ = reply.send((session, slot));
                return;
            }
        }
    }
}

/// Answers `evcxr_input` prompts from our own stdin (the terminal is in cooked mode while a cell
/// runs).
fn read_input(prompt: &str, _password: bool) -> String {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = write!(out, "{prompt}");
    let _ = out.flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    line.trim_end_matches(['\n', '\r']).to_string()
}
