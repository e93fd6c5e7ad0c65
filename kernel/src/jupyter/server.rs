//! The Jupyter kernel: sockets, message dispatch, execution queue, iopub ordering.
//!
//! Threads: tokio tasks own the sockets; one engine thread owns the `Session` and runs executes,
//! completions and inspections in arrival order. Everything published on iopub goes through one
//! channel into one writer task, so a cell's outputs, its result and `idle` keep their order.
//! Requests that need no engine (kernel_info, is_complete, history, comms) are answered at once,
//! even while a cell runs or the prelude is still building.
//!
//! The zeromq sockets listen on private ipc endpoints; the connection file's endpoints are served
//! by the ZMTP guard (`guard.rs`), which enforces frame and message limits before the zeromq crate
//! allocates anything. Signatures are verified and checked against replay in `wire.rs`.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

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
}

struct Shared {
    hf: HeaderFactory,
    iopub: UnboundedSender<Message>,
    shell_out: UnboundedSender<Message>,
    stdin_out: UnboundedSender<Message>,
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn publish(&self, parent: &Value, msg_type: &str, content: Value) {
        let _ = self.iopub.send(self.hf.broadcast(parent, msg_type, content));
    }
    fn status(&self, parent: &Value, state: &str) {
        self.publish(parent, "status", json!({"execution_state": state}));
    }
    fn reply(&self, req: &Message, msg_type: &str, content: Value) {
        let _ = self.shell_out.send(self.hf.child_of(req, msg_type, content));
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

/// Runs the kernel until shutdown. `slot` must already be locked and exported to the
/// environment (see `engine::prepare_process_env`).
pub fn run(conn: ConnectionInfo, slot: slots::Slot) -> anyhow::Result<()> {
    // zeromq 0.7 removes a disconnected peer with a blocking lock (`scc::HashMap::remove_sync` in
    // `peer_disconnected`) from inside its async tasks, and both the receive half and the peer's
    // writer call it for the same peer. With two workers both can block there while the lock is
    // promised to an async task that needs a worker to run: the runtime stops for good (seen twice
    // under the wire fuzzer with seed 1 at load 16; backtraces in benches/README.md). More workers
    // make that need more simultaneous disconnects; only a binding without blocking locks in its
    // async paths removes it.
    // glibc gives each thread that allocates its own arena; six workers with freshly split
    // arenas each kept their own high-water mark (wire fuzzer: +8.6 % RSS over 100,000 frames,
    // against +3.7 % with two workers). Two arenas are plenty for a process that mostly waits.
    // SAFETY: mallopt only sets an allocator parameter, and glibc's takes its own lock.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(6).enable_all().build()?;
    rt.block_on(serve(conn, slot))
}

async fn bind<S: Socket>(socket: &mut S, endpoint: &str) -> anyhow::Result<()> {
    socket.bind(endpoint).await.map_err(|e| anyhow::anyhow!("cannot bind {endpoint}: {e}"))?;
    Ok(())
}

fn to_zmq(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

async fn serve(conn: ConnectionInfo, slot: slots::Slot) -> anyhow::Result<()> {
    let signer = Signer::new(&conn.signature_scheme, &conn.key)?;
    if conn.key.is_empty() && conn.reachable_beyond_loopback() {
        eprintln!(
            "pivot-kernel: WARNING: serving on {} with an empty key: anyone who can reach these ports can run \
             code as this user. Put a key in the connection file (Jupyter does by default) or use 127.0.0.1.",
            conn.ip
        );
    }
    // Each zeromq socket listens privately; the guard serves the public endpoint in front of it.
    let private = PrivateDir::create()?;
    let limits = Limits::default();
    let mut shell = zeromq::RouterSocket::new();
    bind(&mut shell, &private.endpoint("shell")).await?;
    let mut control = zeromq::RouterSocket::new();
    bind(&mut control, &private.endpoint("control")).await?;
    let mut stdin = zeromq::RouterSocket::new();
    bind(&mut stdin, &private.endpoint("stdin")).await?;
    let mut iopub = zeromq::XPubSocket::new();
    bind(&mut iopub, &private.endpoint("iopub")).await?;
    let mut hb = zeromq::RepSocket::new();
    bind(&mut hb, &private.endpoint("hb")).await?;
    for (name, port) in
        [("shell", conn.shell_port), ("control", conn.control_port), ("stdin", conn.stdin_port), ("iopub", conn.iopub_port), ("hb", conn.hb_port)]
    {
        guard::serve(name, &conn.endpoint(port), &private.path.join(name), limits).await?;
    }

    let (iopub_tx, iopub_rx) = unbounded_channel();
    let (shell_tx, shell_rx) = unbounded_channel();
    let (stdin_tx, stdin_rx) = unbounded_channel();
    let (stdin_reply_tx, stdin_reply_rx) = crossbeam_channel::bounded(1);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        hf: HeaderFactory::new(),
        iopub: iopub_tx,
        shell_out: shell_tx,
        stdin_out: stdin_tx,
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
    });

    // Heartbeat: echo whatever arrives.
    // A client that disconnects mid-exchange makes recv/send fail; the heartbeat must outlive it.
    tokio::spawn(async move {
        loop {
            match hb.recv().await {
                Ok(m) => {
                    let _ = hb.send(m).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });

    tokio::spawn(iopub_task(iopub, iopub_rx, signer.clone(), shared.hf.clone()));

    let (shell_send, mut shell_recv) = shell.split();
    tokio::spawn(writer_task(shell_send, shell_rx, signer.clone()));
    let (stdin_send, mut stdin_recv) = stdin.split();
    tokio::spawn(writer_task(stdin_send, stdin_rx, signer.clone()));

    {
        let signer = signer.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = stdin_recv.recv().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match wire::decode(m.into_vec(), &signer) {
                    Ok(msg) if msg.msg_type() == "input_reply" => {
                        if shared.expects_input_reply(&msg) {
                            // A second reply to the same request finds the slot full and is dropped.
                            let _ = stdin_reply_tx.try_send(msg);
                        } else {
                            eprintln!("pivot-kernel: dropped input_reply: no input_request is waiting for it");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("pivot-kernel: dropped stdin message: {e}"),
                }
            }
        });
    }

    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("pivot-engine".into())
            .spawn(move || engine_thread(shared, jobs_rx, slot))?;
    }

    {
        let shared = shared.clone();
        let signer = signer.clone();
        tokio::spawn(async move {
            loop {
                let Ok(m) = shell_recv.recv().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match wire::decode(m.into_vec(), &signer) {
                    Ok(msg) => handle_shell(&shared, msg),
                    Err(e) => eprintln!("pivot-kernel: dropped shell message: {e}"),
                }
            }
        });
    }

    {
        let shared = shared.clone();
        let signer = signer.clone();
        tokio::spawn(async move {
            let (mut send, mut recv) = control.split();
            loop {
                let Ok(m) = recv.recv().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let msg = match wire::decode(m.into_vec(), &signer) {
                    Ok(msg) => msg,
                    Err(e) => {
                        eprintln!("pivot-kernel: dropped control message: {e}");
                        continue;
                    }
                };
                let (reply_type, content, exit) = handle_control(&shared, &msg);
                let Some(reply_type) = reply_type else { continue };
                shared.status(&msg.header, "busy");
                let reply = shared.hf.child_of(&msg, &reply_type, content);
                if let Some(z) = to_zmq(wire::encode(&reply, &signer)) {
                    let _ = send.send(z).await;
                }
                shared.status(&msg.header, "idle");
                if exit {
                    // Let the writers flush the reply and idle before the process ends.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    shared.shutdown.notify_one();
                }
            }
        });
    }

    // SIGTERM (a front end giving up on shutdown_request) ends the kernel the same way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = shared.shutdown.notified() => {}
        _ = term.recv() => {}
    }
    if let Some(i) = lock(&shared.interrupter).as_ref() {
        i.kill_child();
    }
    drop(private);
    // The engine thread may be inside a long cell; exiting the process ends it, and the lock on
    // the build slot goes with the process.
    std::process::exit(0)
}

async fn iopub_task(mut sock: zeromq::XPubSocket, mut rx: UnboundedReceiver<Message>, signer: Signer, hf: HeaderFactory) {
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let topic = Bytes::from(format!("kernel.{}.{}", hf.session, msg.msg_type()));
                let mut frames = vec![topic];
                frames.extend(wire::encode(&msg, &signer));
                if let Some(z) = to_zmq(frames) {
                    let _ = sock.send(z).await;
                }
            }
            sub = sock.recv() => {
                // JEP 65: greet each new subscriber so clients know iopub is connected before
                // they send requests (avoids losing the first outputs to the PUB/SUB race).
                if let Ok(sub) = sub {
                    if let Some(frame) = sub.get(0) {
                        if frame.first() == Some(&1) {
                            let topic = String::from_utf8_lossy(&frame[1..]).into_owned();
                            let msg = hf.broadcast(&json!({}), "iopub_welcome", json!({"subscription": topic}));
                            let mut frames = vec![Bytes::from(topic.into_bytes())];
                            frames.extend(wire::encode(&msg, &signer));
                            if let Some(z) = to_zmq(frames) {
                                let _ = sock.send(z).await;
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn writer_task(mut send: zeromq::RouterSendHalf, mut rx: UnboundedReceiver<Message>, signer: Signer) {
    while let Some(msg) = rx.recv().await {
        if let Some(z) = to_zmq(wire::encode(&msg, &signer)) {
            if let Err(e) = send.send(z).await {
                eprintln!("pivot-kernel: could not send {}: {e}", msg.msg_type());
            }
        }
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
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    shared.shutdown.notify_one();
                });
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

fn engine_thread(shared: Arc<Shared>, jobs: crossbeam_channel::Receiver<Job>, slot: slots::Slot) {
    let sink = engine_sink(&shared);
    buildlog::set_sink(Some(sink.clone()));
    slot.seed_if_cold();
    let mut session: Option<Session> = None;
    let mut start_error: Option<String> = None;
    let start = |session: &mut Option<Session>, start_error: &mut Option<String>| {
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
    start(&mut session, &mut start_error);

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
                    start(&mut session, &mut start_error);
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
                let _ = shared.stdin_out.send(req);
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
