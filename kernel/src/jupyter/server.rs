//! The Jupyter kernel: sockets, message dispatch, execution queue, iopub ordering.
//!
//! Threads: one I/O thread owns the five libzmq sockets (libzmq sockets are not thread-safe) and
//! waits in `zmq::poll` on them and on a wake-up pipe; one engine thread owns the `Session` and
//! runs executes, completions and inspections in arrival order. Every message the kernel sends,
//! from any thread, goes through one queue ([`Outbox`]) that the I/O thread drains in order, so a
//! cell's `busy`, outputs, result, reply and `idle` keep their order. Requests that need no engine
//! (kernel_info, is_complete, history, comms, control) are answered by the I/O thread at once, and
//! the heartbeat is echoed there too, even while a cell runs or the prelude is still building.
//! Control is read before shell in every round, so interrupt and shutdown never wait behind it.
//!
//! The libzmq sockets listen on private ipc endpoints with `ZMQ_MAXMSGSIZE` set; the connection
//! file's endpoints are served by the ZMTP guard (`guard.rs`, a small tokio runtime), which
//! enforces the per-message limits libzmq lacks before libzmq sees a byte. Signatures are
//! verified and checked against replay in `wire.rs`.

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::guard::{self, Limits, PrivateDir};
use super::history::History;
use super::wire::{self, HeaderFactory, Message, Signer};
use crate::engine::{self, buildlog, slots, CellResult, Event, Frontend, Interrupter, Session, SessionOptions};
use crate::scan::{self, Completeness};

#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionInfo {
    #[serde(default = "default_transport")]
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl ConnectionInfo {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Whether other machines can reach the sockets: tcp on anything but a loopback address
    /// (0.0.0.0, `*`, a LAN address, a host name other than localhost).
    pub fn reachable_beyond_loopback(&self) -> bool {
        if self.transport != "tcp" {
            return false;
        }
        let host = self.ip.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => !ip.is_loopback(),
            Err(_) => !host.eq_ignore_ascii_case("localhost"),
        }
    }

    /// jupyter_client's naming: `ipc://{ip}-{port}` for ipc (a path prefix), `tcp://ip:port`.
    pub fn endpoint(&self, port: u16) -> String {
        if self.transport == "ipc" {
            format!("ipc://{}-{}", self.ip, port)
        } else {
            format!("{}://{}:{}", self.transport, self.ip, port)
        }
    }
}

enum Job {
    /// With its arrival time: only cells queued before a failure are aborted by it.
    Execute(Message, std::time::Instant),
    Complete(Message),
    Inspect(Message),
    /// The kernel shuts down and its engine is recycled (`engine::spare::recycling`): the session
    /// goes back through the sender, and the engine thread ends.
    Recycle(crossbeam_channel::Sender<Recycled>),
}

/// The socket a message leaves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Shell,
    Control,
    Stdin,
    Iopub,
}

/// Messages for the sockets, from any thread, in one queue: the I/O thread sends them in the
/// order they were queued. A byte on `wake` rouses it from `zmq::poll`.
struct Outbox {
    queue: crossbeam_channel::Sender<(Channel, Message)>,
    wake: UnixStream,
}

impl Outbox {
    fn send(&self, channel: Channel, msg: Message) {
        if self.queue.send((channel, msg)).is_ok() {
            // Non-blocking: a full pipe already holds a wake-up the I/O thread has yet to read.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

struct Shared {
    hf: HeaderFactory,
    out: Outbox,
    /// Holds at most one reply: only the input_reply to the pending input_request is let in.
    stdin_replies: crossbeam_channel::Receiver<Message>,
    /// msg_id of the input_request a cell is waiting on. Replies that arrive while none is
    /// pending are dropped: kept, every signed input_reply a peer sends would stay in memory
    /// for the life of the kernel (2 KB each, measured with the wire fuzzer).
    awaiting_input: Mutex<Option<String>>,
    /// Header of the request whose output is being produced (iopub parent for engine events).
    current_parent: Mutex<Value>,
    ready: AtomicBool,
    /// Executes whose `busy` and warm-up notice were already published while the engine started.
    announced: Mutex<HashSet<String>>,
    interrupter: Mutex<Option<Interrupter>>,
    history: Mutex<History>,
    count: AtomicU64,
    rustc_version: String,
    jobs: crossbeam_channel::Sender<Job>,
    shutdown: tokio::sync::Notify,
    /// The I/O thread ends at its next wake-up (a recycled kernel closing its sockets).
    stopping: AtomicBool,
}

/// Ends the kernel after a short grace period, in which the I/O thread sends the reply and `idle`.
fn shut_down_soon(shared: &Arc<Shared>) {
    let shared = shared.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        shared.shutdown.notify_one();
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn publish(&self, parent: &Value, msg_type: &str, content: Value) {
        self.out.send(Channel::Iopub, self.hf.broadcast(parent, msg_type, content));
    }
    fn status(&self, parent: &Value, state: &str) {
        self.publish(parent, "status", json!({"execution_state": state}));
    }
    fn reply(&self, req: &Message, msg_type: &str, content: Value) {
        self.out.send(Channel::Shell, self.hf.child_of(req, msg_type, content));
    }
    fn stream(&self, parent: &Value, name: &str, text: &str) {
        self.publish(parent, "stream", json!({"name": name, "text": text}));
    }
    /// Whether `reply` answers the input_request a cell is waiting on. jupyter_client sends
    /// input_reply without a parent header, so a reply with none is taken as the answer (as in
    /// ipykernel); one whose parent names another request is not.
    fn expects_input_reply(&self, reply: &Message) -> bool {
        let awaiting = lock(&self.awaiting_input);
        let Some(request_id) = awaiting.as_deref() else { return false };
        match reply.parent_header.get("msg_id").and_then(Value::as_str) {
            None | Some("") => true,
            Some(parent) => parent == request_id,
        }
    }
}

/// A session started ahead of time by a spare engine (`pivot-kernel spare`), adopted by this
/// kernel: its events reach the kernel's sink through `switch`.
pub struct Prestarted {
    pub session: Session,
    pub switch: engine::spare::SinkSwitch,
}

/// What a recycled kernel hands back when it shuts down: the session, still in `slot`, to be
/// recycled into the spare for the next launch.
pub struct Recycled {
    pub session: Session,
    pub slot: slots::Slot,
    pub switch: engine::spare::SinkSwitch,
}

/// Runs the kernel until shutdown. `slot` must already be locked and exported to the
/// environment (see `engine::prepare_process_env`). With `prestarted`, the kernel serves that
/// session instead of starting one. The process ends at shutdown, except for an adopted engine
/// that is recycled (`engine::spare::recycling`), which gets its session back.
pub fn run(conn: ConnectionInfo, slot: slots::Slot, prestarted: Option<Prestarted>) -> anyhow::Result<Recycled> {
    // The runtime only carries the guard's relays (plain tokio I/O, no blocking locks), so the
    // two workers of a 2-core machine suffice. The zeromq crate's blocking `peer_disconnected`
    // lock, which stopped a two-worker runtime for good under connection churn, is gone with it.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(conn, slot, prestarted))
}

/// Largest frame libzmq accepts from a peer; a frame header declaring more drops the peer
/// before anything is allocated. The guard also caps whole messages at this size.
const MAX_FRAME: u64 = guard::DEFAULT_MAX_MESSAGE;

/// The kernel's five sockets, owned by the I/O thread.
struct Sockets {
    shell: zmq::Socket,
    control: zmq::Socket,
    stdin: zmq::Socket,
    iopub: zmq::Socket,
    hb: zmq::Socket,
}

impl Sockets {
    fn bind(ctx: &zmq::Context, private: &PrivateDir) -> anyhow::Result<Sockets> {
        let open = |kind: zmq::SocketType, name: &str| -> anyhow::Result<zmq::Socket> {
            let endpoint = private.endpoint(name);
            let s = ctx.socket(kind).map_err(|e| anyhow::anyhow!("cannot create the {name} socket: {e}"))?;
            s.set_maxmsgsize(MAX_FRAME as i64).map_err(|e| anyhow::anyhow!("{name}: ZMQ_MAXMSGSIZE: {e}"))?;
            // The process exits without closing sockets; nothing should wait for peers then.
            s.set_linger(0).map_err(|e| anyhow::anyhow!("{name}: ZMQ_LINGER: {e}"))?;
            if kind == zmq::XPUB {
                // Every SUBSCRIBE reaches the kernel, not only a topic's first: each client is
                // welcomed (JEP 65), also the second one subscribing to "".
                s.set_xpub_verbose(true).map_err(|e| anyhow::anyhow!("{name}: ZMQ_XPUB_VERBOSE: {e}"))?;
            }
            s.bind(&endpoint).map_err(|e| anyhow::anyhow!("cannot bind {endpoint}: {e}"))?;
            Ok(s)
        };
        Ok(Sockets {
            shell: open(zmq::ROUTER, "shell")?,
            control: open(zmq::ROUTER, "control")?,
            stdin: open(zmq::ROUTER, "stdin")?,
            iopub: open(zmq::XPUB, "iopub")?,
            hb: open(zmq::REP, "hb")?,
        })
    }
}

async fn serve(conn: ConnectionInfo, slot: slots::Slot, prestarted: Option<Prestarted>) -> anyhow::Result<Recycled> {
    let signer = Signer::new(&conn.signature_scheme, &conn.key)?;
    if conn.key.is_empty() && conn.reachable_beyond_loopback() {
        eprintln!(
            "pivot-kernel: WARNING: serving on {} with an empty key: anyone who can reach these ports can run \
             code as this user. Put a key in the connection file (Jupyter does by default) or use 127.0.0.1.",
            conn.ip
        );
    }
    // Each libzmq socket listens privately; the guard serves the public endpoint in front of it.
    let private = PrivateDir::create()?;
    let ctx = zmq::Context::new();
    let sockets = Sockets::bind(&ctx, &private)?;
    let limits = Limits::default();
    for (name, port) in
        [("shell", conn.shell_port), ("control", conn.control_port), ("stdin", conn.stdin_port), ("iopub", conn.iopub_port), ("hb", conn.hb_port)]
    {
        guard::serve(name, &conn.endpoint(port), &private.path.join(name), limits).await?;
    }

    let (wake_tx, wake_rx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let (stdin_reply_tx, stdin_reply_rx) = crossbeam_channel::bounded(1);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        hf: HeaderFactory::new(),
        out: Outbox { queue: out_tx, wake: wake_tx },
        stdin_replies: stdin_reply_rx,
        awaiting_input: Mutex::new(None),
        current_parent: Mutex::new(json!({})),
        ready: AtomicBool::new(false),
        announced: Mutex::new(HashSet::new()),
        interrupter: Mutex::new(None),
        history: Mutex::new(History::default()),
        count: AtomicU64::new(0),
        rustc_version: engine::paths::rustc_version(),
        jobs: jobs_tx,
        shutdown: tokio::sync::Notify::new(),
        stopping: AtomicBool::new(false),
    });

    let io_thread = {
        let io = IoThread { sockets, outbox: out_rx, wake: wake_rx, signer, shared: shared.clone(), stdin_replies: stdin_reply_tx };
        std::thread::Builder::new().name("pivot-zmq".into()).spawn(move || io.run())?
    };
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("pivot-engine".into())
            .spawn(move || engine_thread(shared, jobs_rx, slot, prestarted))?;
    }

    // SIGTERM (a front end giving up on shutdown_request) ends the kernel the same way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let requested = tokio::select! {
        _ = shared.shutdown.notified() => true,
        _ = term.recv() => false,
    };
    if requested && engine::spare::recycling() {
        // The engine comes back only if it is idle: a cell still running ends with the process.
        let (tx, rx) = crossbeam_channel::bounded(1);
        if shared.jobs.send(Job::Recycle(tx)).is_ok() {
            if let Ok(recycled) = rx.recv_timeout(Duration::from_secs(2)) {
                shared.stopping.store(true, Ordering::SeqCst);
                let _ = (&shared.out.wake).write(&[1]);
                let _ = io_thread.join();
                drop(private);
                return Ok(recycled);
            }
        }
    }
    if let Some(i) = lock(&shared.interrupter).as_ref() {
        i.kill_child();
    }
    drop(private);
    // The engine thread may be inside a long cell; exiting the process ends it, and the lock on
    // the build slot goes with the process. An adopted spare tells its launcher first.
    engine::spare::exit(0)
}

/// Messages read from one socket per round before the others get their turn: a peer flooding
/// one socket cannot starve the rest, and control is always read first.
const BATCH: usize = 64;

/// The thread that owns the sockets: reads requests, answers what needs no engine, echoes the
/// heartbeat, and sends everything queued in the [`Outbox`].
struct IoThread {
    sockets: Sockets,
    outbox: crossbeam_channel::Receiver<(Channel, Message)>,
    wake: UnixStream,
    signer: Signer,
    shared: Arc<Shared>,
    /// Holds at most one reply: only the input_reply to the pending input_request is let in.
    stdin_replies: crossbeam_channel::Sender<Message>,
}

impl IoThread {
    fn run(self) {
        loop {
            let ready = {
                let s = &self.sockets;
                let mut items = [
                    s.control.as_poll_item(zmq::POLLIN),
                    s.shell.as_poll_item(zmq::POLLIN),
                    s.stdin.as_poll_item(zmq::POLLIN),
                    s.iopub.as_poll_item(zmq::POLLIN),
                    s.hb.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.wake.as_raw_fd(), zmq::POLLIN),
                ];
                if let Err(e) = zmq::poll(&mut items, -1) {
                    if e != zmq::Error::EINTR {
                        eprintln!("pivot-kernel: zmq_poll failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
                items.map(|i| i.is_readable())
            };
            if ready[0] {
                self.drain(&self.sockets.control, |io, frames| io.on_control(frames));
            }
            if ready[4] {
                self.drain(&self.sockets.hb, |io, frames| {
                    let _ = io.sockets.hb.send_multipart(frames, zmq::DONTWAIT);
                });
            }
            if ready[1] {
                self.drain(&self.sockets.shell, |io, frames| io.on_shell(frames));
            }
            if ready[2] {
                self.drain(&self.sockets.stdin, |io, frames| io.on_stdin(frames));
            }
            if ready[3] {
                self.drain(&self.sockets.iopub, |io, frames| io.on_subscription(frames));
            }
            if ready[5] {
                let mut buf = [0u8; 256];
                while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
            }
            // Replies queued by the handlers above go out in this same round.
            for (channel, msg) in self.outbox.try_iter() {
                self.send(channel, &msg);
            }
            if self.shared.stopping.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    fn drain(&self, socket: &zmq::Socket, mut handle: impl FnMut(&Self, Vec<Vec<u8>>)) {
        for _ in 0..BATCH {
            match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => handle(self, frames),
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    eprintln!("pivot-kernel: receive failed: {e}");
                    return;
                }
            }
        }
    }

    fn send(&self, channel: Channel, msg: &Message) {
        let mut frames: Vec<Bytes> = Vec::new();
        let socket = match channel {
            Channel::Shell => &self.sockets.shell,
            Channel::Control => &self.sockets.control,
            Channel::Stdin => &self.sockets.stdin,
            Channel::Iopub => {
                frames.push(Bytes::from(format!("kernel.{}.{}", self.shared.hf.session, msg.msg_type())));
                &self.sockets.iopub
            }
        };
        frames.extend(wire::encode(msg, &self.signer));
        // Never blocks: a ROUTER drops a message for a peer that is gone or over its high-water
        // mark, and so does XPUB for a subscriber that does not read.
        if let Err(e) = socket.send_multipart(frames.iter().map(|f| f.as_ref()), zmq::DONTWAIT) {
            eprintln!("pivot-kernel: could not send {}: {e}", msg.msg_type());
        }
    }

    fn decode(&self, frames: Vec<Vec<u8>>, socket: &str) -> Option<Message> {
        match wire::decode(frames.into_iter().map(Bytes::from).collect(), &self.signer) {
            Ok(msg) => Some(msg),
            Err(e) => {
                eprintln!("pivot-kernel: dropped {socket} message: {e}");
                None
            }
        }
    }

    fn on_shell(&self, frames: Vec<Vec<u8>>) {
        if let Some(msg) = self.decode(frames, "shell") {
            handle_shell(&self.shared, msg);
        }
    }

    fn on_control(&self, frames: Vec<Vec<u8>>) {
        let Some(msg) = self.decode(frames, "control") else { return };
        let shared = &self.shared;
        let (reply_type, content, exit) = handle_control(shared, &msg);
        let Some(reply_type) = reply_type else { return };
        shared.status(&msg.header, "busy");
        shared.out.send(Channel::Control, shared.hf.child_of(&msg, &reply_type, content));
        shared.status(&msg.header, "idle");
        if exit {
            shut_down_soon(shared);
        }
    }

    fn on_stdin(&self, frames: Vec<Vec<u8>>) {
        let Some(msg) = self.decode(frames, "stdin") else { return };
        if msg.msg_type() != "input_reply" {
            return;
        }
        if self.shared.expects_input_reply(&msg) {
            // A second reply to the same request finds the slot full and is dropped.
            let _ = self.stdin_replies.try_send(msg);
        } else {
            eprintln!("pivot-kernel: dropped input_reply: no input_request is waiting for it");
        }
    }

    /// JEP 65: greet each new subscriber so clients know iopub is connected before they send
    /// requests (avoids losing the first outputs to the PUB/SUB race).
    fn on_subscription(&self, frames: Vec<Vec<u8>>) {
        let Some(frame) = frames.first() else { return };
        if frame.first() != Some(&1) {
            return;
        }
        let topic = String::from_utf8_lossy(&frame[1..]).into_owned();
        let msg = self.shared.hf.broadcast(&json!({}), "iopub_welcome", json!({"subscription": topic}));
        let mut out = vec![Bytes::from(topic.into_bytes())];
        out.extend(wire::encode(&msg, &self.signer));
        let _ = self.sockets.iopub.send_multipart(out.iter().map(|f| f.as_ref()), zmq::DONTWAIT);
    }
}

fn kernel_info(shared: &Shared) -> Value {
    json!({
        "status": "ok",
        "protocol_version": wire::PROTOCOL_VERSION,
        "implementation": "pivot-kernel",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rust",
            "version": shared.rustc_version,
            "mimetype": "text/rust",
            "file_extension": ".rs",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": "PIVOT Lab — Rust (evcxr 0.22) with `use pivot::prelude::*;` preloaded",
        "help_links": [{"text": "evcxr commands (:help)", "url": "https://github.com/evcxr/evcxr/blob/main/COMMON.md"}],
        "debugger": false,
    })
}

fn handle_control(shared: &Shared, msg: &Message) -> (Option<String>, Value, bool) {
    match msg.msg_type() {
        "kernel_info_request" => (Some("kernel_info_reply".into()), kernel_info(shared), false),
        "shutdown_request" => {
            let restart = msg.content.get("restart").and_then(Value::as_bool).unwrap_or(false);
            (Some("shutdown_reply".into()), json!({"status": "ok", "restart": restart}), true)
        }
        "interrupt_request" => {
            if let Some(i) = lock(&shared.interrupter).as_ref() {
                i.interrupt();
            }
            (Some("interrupt_reply".into()), json!({"status": "ok"}), false)
        }
        "debug_request" => (None, json!({}), false),
        other => {
            eprintln!("pivot-kernel: ignoring control message {other}");
            (None, json!({}), false)
        }
    }
}

fn handle_shell(shared: &Arc<Shared>, msg: Message) {
    let parent = msg.header.clone();
    let immediate = |reply_type: &str, content: Value| {
        shared.status(&parent, "busy");
        shared.reply(&msg, reply_type, content);
        shared.status(&parent, "idle");
    };
    match msg.msg_type() {
        "kernel_info_request" => immediate("kernel_info_reply", kernel_info(shared)),
        "is_complete_request" => {
            let code = msg.content.get("code").and_then(Value::as_str).unwrap_or("");
            let content = match scan::check(code) {
                Completeness::Complete => json!({"status": "complete"}),
                Completeness::Incomplete { indent } => json!({"status": "incomplete", "indent": indent}),
                Completeness::Invalid => json!({"status": "invalid"}),
            };
            immediate("is_complete_reply", content)
        }
        "history_request" => {
            let history = lock(&shared.history).reply(&msg.content);
            immediate("history_reply", json!({"status": "ok", "history": history}))
        }
        "comm_info_request" => immediate("comm_info_reply", json!({"status": "ok", "comms": {}})),
        "comm_open" => {
            // No comm targets exist: close at once so the front end does not wait forever.
            shared.status(&parent, "busy");
            let comm_id = msg.content.get("comm_id").cloned().unwrap_or(Value::Null);
            shared.publish(&parent, "comm_close", json!({"comm_id": comm_id, "data": {}}));
            shared.status(&parent, "idle");
        }
        "comm_msg" | "comm_close" => {
            shared.status(&parent, "busy");
            shared.status(&parent, "idle");
        }
        "shutdown_request" | "interrupt_request" => {
            let (t, content, exit) = handle_control(shared, &msg);
            if let Some(t) = t {
                immediate(&t, content);
            }
            if exit {
                shut_down_soon(shared);
            }
        }
        "execute_request" => {
            if !shared.ready.load(Ordering::SeqCst) {
                let mut announced = lock(&shared.announced);
                if announced.is_empty() {
                    // The first cell waits for the prelude: say why, under that cell.
                    shared.status(&parent, "busy");
                    *lock(&shared.current_parent) = parent.clone();
                    shared.stream(
                        &parent,
                        "stderr",
                        "PIVOT: starting the Rust engine and loading the prelude (a new build slot compiles \
                         libtorch bindings once, which takes minutes; later starts take seconds)…\n",
                    );
                    announced.insert(msg.msg_id().to_string());
                }
            }
            let _ = shared.jobs.send(Job::Execute(msg, std::time::Instant::now()));
        }
        "complete_request" | "inspect_request" if !shared.ready.load(Ordering::SeqCst) => {
            // No analysis is possible before the engine is up; an empty answer beats a stall.
            let cursor = msg.content.get("cursor_pos").and_then(Value::as_u64).unwrap_or(0);
            if msg.msg_type() == "complete_request" {
                immediate(
                    "complete_reply",
                    json!({"status": "ok", "matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {}}),
                )
            } else {
                immediate("inspect_reply", json!({"status": "ok", "found": false, "data": {}, "metadata": {}}))
            }
        }
        "complete_request" => {
            let _ = shared.jobs.send(Job::Complete(msg));
        }
        "inspect_request" => {
            let _ = shared.jobs.send(Job::Inspect(msg));
        }
        other => eprintln!("pivot-kernel: ignoring shell message {other}"),
    }
}

fn engine_sink(shared: &Arc<Shared>) -> engine::Sink {
    let shared = shared.clone();
    Arc::new(move |e: Event| {
        let parent = lock(&shared.current_parent).clone();
        match e {
            Event::Stream { name, text } => shared.stream(&parent, name.as_str(), &text),
            Event::Display { data, metadata, display_id, update } => {
                let mut content = json!({"data": data, "metadata": metadata, "transient": {}});
                if let Some(id) = display_id {
                    content["transient"] = json!({"display_id": id});
                }
                shared.publish(&parent, if update { "update_display_data" } else { "display_data" }, content);
            }
            Event::Clear { wait } => shared.publish(&parent, "clear_output", json!({"wait": wait})),
            Event::Progress(_) => {}
        }
    })
}

fn engine_thread(shared: Arc<Shared>, jobs: crossbeam_channel::Receiver<Job>, slot: slots::Slot, prestarted: Option<Prestarted>) {
    let sink = engine_sink(&shared);
    buildlog::set_sink(Some(sink.clone()));
    slot.seed_if_cold();
    let mut session: Option<Session> = None;
    let mut switch: Option<engine::spare::SinkSwitch> = None;
    let mut start_error: Option<String> = None;
    if let Some(p) = prestarted {
        p.switch.set(sink.clone());
        *lock(&shared.interrupter) = Some(p.session.interrupter());
        session = Some(p.session);
        switch = Some(p.switch);
        shared.ready.store(true, Ordering::SeqCst);
        // A recycled engine becomes the next spare itself when this kernel ends.
        if !engine::spare::recycling() {
            engine::spare::keep_one(Frontend::Jupyter, &["spare"]);
        }
    }
    let start = |session: &mut Option<Session>, start_error: &mut Option<String>, slot: &slots::Slot| {
        let opts = match SessionOptions::new(Frontend::Jupyter) {
            Ok(o) => o,
            Err(e) => {
                *start_error = Some(e.to_string());
                return;
            }
        };
        match Session::start(opts, sink.clone()) {
            Ok(s) => {
                slot.mark_warm();
                eprintln!("pivot-kernel: engine ready in {:.1} s (slot {})", s.startup.as_secs_f64(), slot.index);
                *lock(&shared.interrupter) = Some(s.interrupter());
                *session = Some(s);
                *start_error = None;
            }
            Err(e) => {
                eprintln!("pivot-kernel: engine failed to start: {e:#}");
                *start_error = Some(format!("{e:#}"));
            }
        }
        shared.ready.store(true, Ordering::SeqCst);
    };
    if session.is_none() {
        start(&mut session, &mut start_error, &slot);
        if session.is_some() {
            engine::spare::keep_one(Frontend::Jupyter, &["spare"]);
        }
    }

    let mut backlog: VecDeque<Job> = VecDeque::new();
    loop {
        let job = match backlog.pop_front() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        match job {
            Job::Execute(msg, _) => {
                if session.is_none() {
                    // A broken prelude may have been fixed on disk meanwhile: try again.
                    start(&mut session, &mut start_error, &slot);
                }
                let failed_at = execute(&shared, session.as_mut(), start_error.as_deref(), &msg);
                let stop_on_error = msg.content.get("stop_on_error").and_then(Value::as_bool).unwrap_or(true);
                if let (Some(failed_at), true) = (failed_at, stop_on_error) {
                    // Cells queued behind the failed one are aborted, as in ipykernel; cells sent
                    // after its reply (a client reacting to the error) run normally.
                    for j in jobs.try_iter() {
                        match j {
                            Job::Execute(m, arrived) if arrived < failed_at => abort(&shared, &m),
                            other => backlog.push_back(other),
                        }
                    }
                }
            }
            Job::Complete(msg) => complete(&shared, session.as_mut(), &msg),
            Job::Inspect(msg) => inspect(&shared, session.as_mut(), &msg),
            Job::Recycle(back) => {
                if let (Some(session), Some(switch)) = (session.take(), switch.take()) {
                    buildlog::set_sink(None);
                    let _ = back.send(Recycled { session, slot, switch });
                }
                return;
            }
        }
    }
}

fn abort(shared: &Shared, msg: &Message) {
    shared.status(&msg.header, "busy");
    let n = shared.count.load(Ordering::SeqCst);
    shared.reply(msg, "execute_reply", json!({"status": "aborted", "execution_count": n}));
    shared.status(&msg.header, "idle");
}

/// Runs one execute_request; when it failed, returns when its reply was sent.
fn execute(shared: &Shared, session: Option<&mut Session>, start_error: Option<&str>, msg: &Message) -> Option<std::time::Instant> {
    let c = &msg.content;
    let code = c.get("code").and_then(Value::as_str).unwrap_or("").to_string();
    let silent = c.get("silent").and_then(Value::as_bool).unwrap_or(false);
    let store_history = c.get("store_history").and_then(Value::as_bool).unwrap_or(true) && !silent;
    let allow_stdin = c.get("allow_stdin").and_then(Value::as_bool).unwrap_or(false);
    let parent = msg.header.clone();
    let was_announced = lock(&shared.announced).remove(msg.msg_id());
    if !was_announced {
        shared.status(&parent, "busy");
    } else {
        // Remove the warm-up notice and build log from the cell's output.
        shared.publish(&parent, "clear_output", json!({"wait": false}));
    }
    *lock(&shared.current_parent) = parent.clone();
    let n = if store_history { shared.count.fetch_add(1, Ordering::SeqCst) + 1 } else { shared.count.load(Ordering::SeqCst) };
    if !silent {
        shared.publish(&parent, "execute_input", json!({"code": code, "execution_count": n}));
    }
    if store_history {
        lock(&shared.history).add(n, &code);
    }
    let mut session = session;
    let result = match session.as_deref_mut() {
        None => CellResult {
            error: Some(engine::CellError::new(
                "EngineUnavailable",
                format!("the Rust engine could not start: {}", start_error.unwrap_or("unknown error")),
            )),
            ..Default::default()
        },
        Some(_) if code.trim().is_empty() => CellResult::default(),
        Some(s) => {
            let input = |prompt: &str, password: bool| -> String {
                if !allow_stdin {
                    shared.stream(&parent, "stderr", "input requested, but this front end does not allow stdin; using \"\"\n");
                    return String::new();
                }
                let req = shared.hf.child_of(msg, "input_request", json!({"prompt": prompt, "password": password}));
                *lock(&shared.awaiting_input) = Some(req.msg_id().to_string());
                while shared.stdin_replies.try_recv().is_ok() {}
                shared.out.send(Channel::Stdin, req);
                let value = match shared.stdin_replies.recv() {
                    Ok(r) => r.content.get("value").and_then(Value::as_str).unwrap_or("").to_string(),
                    Err(_) => String::new(),
                };
                *lock(&shared.awaiting_input) = None;
                value
            };
            s.execute(&code, &input)
        }
    };
    if let Some(value) = &result.value {
        if !silent {
            shared.publish(&parent, "execute_result", json!({"execution_count": n, "data": value, "metadata": {}}));
        }
        if store_history {
            if let Some(t) = value.get("text/plain").and_then(Value::as_str) {
                lock(&shared.history).set_output(n, t.to_string());
            }
        }
    }
    let failed = result.error.is_some();
    let content = match &result.error {
        Some(e) => {
            let err = json!({"ename": e.ename, "evalue": e.evalue, "traceback": e.traceback});
            shared.publish(&parent, "error", err.clone());
            let mut content = err;
            content["status"] = json!("error");
            content["execution_count"] = json!(n);
            content
        }
        None => {
            let exprs = user_expressions(session, c.get("user_expressions"));
            json!({"status": "ok", "execution_count": n, "user_expressions": exprs, "payload": []})
        }
    };
    let replied = std::time::Instant::now();
    shared.reply(msg, "execute_reply", content);
    shared.status(&parent, "idle");
    failed.then_some(replied)
}

/// Evaluates the request's `user_expressions` (after a successful cell) in the same session:
/// not stored in history, not counted, nothing published on iopub. Each entry is answered on
/// its own, as `{status:"ok", data:{"text/plain"}, metadata}` or `{status:"error", ename, evalue, traceback}`.
fn user_expressions(session: Option<&mut Session>, requested: Option<&Value>) -> serde_json::Map<String, Value> {
    let Some(requested) = requested.and_then(Value::as_object).filter(|m| !m.is_empty()) else {
        return serde_json::Map::new();
    };
    let names: Vec<&String> = requested.keys().collect();
    let exprs: Vec<String> = requested.values().map(|v| v.as_str().unwrap_or("").to_string()).collect();
    let results: Vec<Result<String, engine::CellError>> = match session {
        Some(s) => s.eval_user_expressions(&exprs),
        None => exprs.iter().map(|_| Err(engine::CellError::new("EngineUnavailable", "the Rust engine is not running"))).collect(),
    };
    names
        .into_iter()
        .zip(results)
        .map(|(name, r)| {
            let v = match r {
                Ok(text) => json!({"status": "ok", "data": {"text/plain": text}, "metadata": {}}),
                Err(e) => json!({"status": "error", "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback}),
            };
            (name.clone(), v)
        })
        .collect()
}

fn complete(shared: &Shared, session: Option<&mut Session>, msg: &Message) {
    shared.status(&msg.header, "busy");
    let code = msg.content.get("code").and_then(Value::as_str).unwrap_or("");
    let cursor = msg.content.get("cursor_pos").and_then(Value::as_u64).unwrap_or(code.chars().count() as u64) as usize;
    let byte = wire::cursor_to_byte(code, cursor);
    let (start, end, items) = match session {
        Some(s) => s.complete(code, byte),
        None => (byte, byte, vec![]),
    };
    let (cs, ce) = (wire::byte_to_cursor(code, start), wire::byte_to_cursor(code, end));
    let matches: Vec<&String> = items.iter().map(|(c, _)| c).collect();
    let types: Vec<Value> = items.iter().map(|(c, k)| json!({"start": cs, "end": ce, "text": c, "type": k})).collect();
    shared.reply(
        msg,
        "complete_reply",
        json!({"status": "ok", "matches": matches, "cursor_start": cs, "cursor_end": ce,
               "metadata": {"_jupyter_types_experimental": types}}),
    );
    shared.status(&msg.header, "idle");
}

fn inspect(shared: &Shared, session: Option<&mut Session>, msg: &Message) {
    shared.status(&msg.header, "busy");
    let code = msg.content.get("code").and_then(Value::as_str).unwrap_or("");
    let cursor = msg.content.get("cursor_pos").and_then(Value::as_u64).unwrap_or(code.chars().count() as u64) as usize;
    let mut byte = wire::cursor_to_byte(code, cursor);
    // evcxr documents the expression that ends at the position: move a cursor that sits inside
    // a word to the word's end (Shift-Tab in the middle of `Vec` means `Vec`).
    byte += code[byte..].find(|c: char| !c.is_alphanumeric() && c != '_').unwrap_or(code.len() - byte);
    let found = session.and_then(|s| s.inspect(code, byte));
    let content = match found {
        Some((plain, html)) => json!({"status": "ok", "found": true, "data": {"text/plain": plain, "text/html": html}, "metadata": {}}),
        None => json!({"status": "ok", "found": false, "data": {}, "metadata": {}}),
    };
    shared.reply(msg, "inspect_reply", content);
    shared.status(&msg.header, "idle");
}
