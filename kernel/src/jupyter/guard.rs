//! ZMTP guard: the kernel's five public endpoints are served here, and every byte a peer sends is
//! checked against ZMTP framing limits *before* libzmq sees it.
//!
//! Each libzmq socket binds a private ipc endpoint (in a 0700 directory only this user can
//! enter); the guard listens on the connection file's endpoint, opens one private connection per
//! peer, and copies bytes both ways. Towards the kernel it follows ZMTP 3 (RFC 23/37: a 64-byte
//! greeting, then frames of `flags, 1- or 8-byte length, body`) and drops the peer as soon as a
//! frame header breaks a limit: a frame or message over [`Limits::max_message`], more than
//! [`Limits::max_frames`] frames in one message, a command over [`Limits::max_command`], reserved
//! flag bits, or a greeting that is not ZMTP 3. The private connection carries the peer's own
//! bytes, so routing identities, subscriptions and the NULL handshake work as before.
//!
//! Why the guard stays with libzmq: libzmq's `ZMQ_MAXMSGSIZE` (set on every kernel socket, so a
//! frame declaring 2^50 bytes is refused there too) limits one *frame*, not a message. A peer may
//! still send an endless multipart message (2 bytes per empty frame) or many frames each under the
//! limit, and libzmq hands them on frame by frame while the application has no way to drop one
//! ROUTER peer: the kernel would have to keep or skip them for as long as the peer likes. Only a
//! layer that sees the connection can close it at the first frame over a message limit. Reading
//! only frame headers is a small, exhaustively testable state machine ([`Validator`],
//! property-tested below and fuzzed live by tests/kernel/test_wire_fuzz.py).
//!
//! Towards the peer, bytes are queued in the guard rather than written with the kernel waiting: a
//! peer that stops reading is dropped once [`Limits::max_backlog`] bytes wait for it, so one stuck
//! client cannot hold a connection's memory without bound.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// What one peer may send and have waiting. Jupyter messages are JSON plus optional buffers; the
/// kernel has no comm targets, so 64 MiB leaves room for any code cell or input reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes in all frames of one message (so also in one frame).
    pub max_message: u64,
    /// Frames in one message: routing ids, delimiter, signature, four dicts and buffers.
    pub max_frames: u32,
    /// Bytes in one command frame (READY with its properties, PING, SUBSCRIBE, ERROR).
    pub max_command: u64,
    /// Bytes queued for a peer that does not read before it is dropped.
    pub max_backlog: usize,
    /// Peers connected to one endpoint at once; more are refused at accept.
    pub max_peers: usize,
}

/// [`Limits::max_message`] by default; also the kernel sockets' `ZMQ_MAXMSGSIZE`.
pub const DEFAULT_MAX_MESSAGE: u64 = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits { max_message: DEFAULT_MAX_MESSAGE, max_frames: 1024, max_command: 64 << 10, max_backlog: 64 << 20, max_peers: 64 }
    }
}

/// Why a peer was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    BadGreeting(&'static str),
    ReservedFlags(u8),
    CommandWithMore,
    CommandTooLarge { declared: u64, limit: u64 },
    MessageTooLarge { declared: u64, limit: u64 },
    TooManyFrames { limit: u32 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::BadGreeting(why) => write!(f, "bad ZMTP greeting: {why}"),
            Violation::ReservedFlags(flags) => write!(f, "frame flags {flags:#04x} set reserved bits"),
            Violation::CommandWithMore => write!(f, "command frame with the MORE flag"),
            Violation::CommandTooLarge { declared, limit } => {
                write!(f, "command frame declares {declared} bytes (limit {limit})")
            }
            Violation::MessageTooLarge { declared, limit } => {
                write!(f, "message would reach {declared} bytes (limit {limit})")
            }
            Violation::TooManyFrames { limit } => write!(f, "message has more than {limit} frames"),
        }
    }
}

impl std::error::Error for Violation {}

const GREETING_LEN: usize = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Bytes of the greeting still to come.
    Greeting { seen: usize },
    Flags,
    /// Length bytes: `have` of `need` (1 or 8) collected so far.
    Length { flags: u8, len: u64, have: u8, need: u8 },
    Body { remaining: u64 },
}

/// Checks a peer's byte stream (peer → kernel) against ZMTP 3 framing and [`Limits`], in chunks
/// of any size: the verdict depends only on the bytes, never on how they were split.
#[derive(Debug, Clone)]
pub struct Validator {
    limits: Limits,
    state: State,
    /// Bytes and frames of the message in progress (commands do not count).
    message_bytes: u64,
    message_frames: u32,
}

impl Validator {
    pub fn new(limits: Limits) -> Self {
        Validator { limits, state: State::Greeting { seen: 0 }, message_bytes: 0, message_frames: 0 }
    }

    /// Accepts `data` or says which limit it breaks; after an error the peer must be dropped.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        while !data.is_empty() {
            match self.state {
                State::Greeting { seen } => {
                    let take = (GREETING_LEN - seen).min(data.len());
                    for (i, &b) in data[..take].iter().enumerate() {
                        check_greeting_byte(seen + i, b)?;
                    }
                    data = &data[take..];
                    let seen = seen + take;
                    self.state = if seen == GREETING_LEN { State::Flags } else { State::Greeting { seen } };
                }
                State::Flags => {
                    let flags = data[0];
                    data = &data[1..];
                    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
                        return Err(Violation::ReservedFlags(flags));
                    }
                    if flags & FLAG_COMMAND != 0 && flags & FLAG_MORE != 0 {
                        return Err(Violation::CommandWithMore);
                    }
                    let need = if flags & FLAG_LONG != 0 { 8 } else { 1 };
                    self.state = State::Length { flags, len: 0, have: 0, need };
                }
                State::Length { flags, mut len, mut have, need } => {
                    while have < need && !data.is_empty() {
                        len = (len << 8) | u64::from(data[0]);
                        data = &data[1..];
                        have += 1;
                    }
                    if have < need {
                        self.state = State::Length { flags, len, have, need };
                        continue;
                    }
                    self.frame_header(flags, len)?;
                    self.state = if len == 0 { State::Flags } else { State::Body { remaining: len } };
                }
                State::Body { remaining } => {
                    let take = remaining.min(data.len() as u64);
                    data = &data[take as usize..];
                    let remaining = remaining - take;
                    self.state = if remaining == 0 { State::Flags } else { State::Body { remaining } };
                }
            }
        }
        Ok(())
    }

    /// A complete frame header: checked before a single byte of its body is forwarded.
    fn frame_header(&mut self, flags: u8, len: u64) -> Result<(), Violation> {
        if flags & FLAG_COMMAND != 0 {
            if len > self.limits.max_command {
                return Err(Violation::CommandTooLarge { declared: len, limit: self.limits.max_command });
            }
            return Ok(());
        }
        let total = self.message_bytes.saturating_add(len);
        if total > self.limits.max_message {
            return Err(Violation::MessageTooLarge { declared: total, limit: self.limits.max_message });
        }
        if self.message_frames >= self.limits.max_frames {
            return Err(Violation::TooManyFrames { limit: self.limits.max_frames });
        }
        if flags & FLAG_MORE != 0 {
            self.message_bytes = total;
            self.message_frames += 1;
        } else {
            self.message_bytes = 0;
            self.message_frames = 0;
        }
        Ok(())
    }
}

/// ZMTP 3.x greeting: signature `FF 00*8 7F`, major version 3 or more (a 3.1 peer talks 3.0 with
/// a 3.0 server), mechanism and filler left to libzmq.
fn check_greeting_byte(i: usize, b: u8) -> Result<(), Violation> {
    match i {
        0 if b != 0xFF => Err(Violation::BadGreeting("signature must start with 0xFF")),
        9 if b & 0x01 != 0x01 => Err(Violation::BadGreeting("signature must end with 0x7F")),
        10 if b < 3 => Err(Violation::BadGreeting("ZMTP versions before 3.0 are not supported")),
        _ => Ok(()),
    }
}

/// A private directory for the libzmq sockets' ipc endpoints, readable by this user only and
/// removed when dropped.
pub struct PrivateDir {
    pub path: PathBuf,
}

impl PrivateDir {
    pub fn create() -> anyhow::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        // sun_path holds 108 bytes: prefer a short base when TMPDIR is long.
        let base = std::env::temp_dir();
        let base = if base.as_os_str().len() > 60 { PathBuf::from("/tmp") } else { base };
        let path = base.join(format!("pivot-kernel-{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        Ok(PrivateDir { path })
    }

    pub fn endpoint(&self, name: &str) -> String {
        format!("ipc://{}", self.path.join(name).display())
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Binds `public` (a `tcp://host:port` or `ipc://path` endpoint from the connection file) and
/// serves it in front of the libzmq socket bound at `inner` (an ipc path). Returns once bound, so
/// a port in use is reported at start-up; the serving runs as a task.
pub async fn serve(name: &'static str, public: &str, inner: &Path, limits: Limits) -> anyhow::Result<()> {
    let listener = if let Some(addr) = public.strip_prefix("tcp://") {
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("{public}: no port"))?;
        let port: u16 = port.parse().map_err(|e| anyhow::anyhow!("{public}: bad port: {e}"))?;
        // ZeroMQ spells "all interfaces" `*`; IPv6 addresses may come bracketed.
        let host = match host.trim_start_matches('[').trim_end_matches(']') {
            "*" => "0.0.0.0",
            h => h,
        };
        let l = TcpListener::bind((host, port)).await.map_err(|e| anyhow::anyhow!("cannot bind {public}: {e}"))?;
        Listener::Tcp(l)
    } else if let Some(path) = public.strip_prefix("ipc://") {
        let l = UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot bind {public}: {e}"))?;
        Listener::Unix(l, PathBuf::from(path))
    } else {
        anyhow::bail!("unsupported endpoint {public:?} (tcp:// and ipc:// are supported)");
    };
    let inner = inner.to_path_buf();
    let peers = Arc::new(Semaphore::new(limits.max_peers));
    tokio::spawn(async move {
        loop {
            let accepted: std::io::Result<(Box<dyn Stream>, String)> = match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Box::new(s) as Box<dyn Stream>, a.to_string())
                }),
                Listener::Unix(l, path) => l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn Stream>, path.display().to_string())),
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    eprintln!("pivot-kernel: {name}: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = peers.clone().try_acquire_owned() else {
                eprintln!("pivot-kernel: {name}: refused {peer}: {} peers connected already", limits.max_peers);
                continue;
            };
            let inner = inner.clone();
            tokio::spawn(async move {
                if let Err(why) = relay(stream, &inner, limits).await {
                    eprintln!("pivot-kernel: dropped {name} peer {peer}: {why}");
                }
                drop(permit);
            });
        }
    });
    Ok(())
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Why a relay ended early (a peer closing normally is not an error).
enum Dropped {
    Violation(Violation),
    Backlog(usize),
    Inner(std::io::Error),
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dropped::Violation(v) => write!(f, "{v}"),
            Dropped::Backlog(n) => write!(f, "it stopped reading with {n} bytes waiting"),
            Dropped::Inner(e) => write!(f, "kernel socket unavailable: {e}"),
        }
    }
}

async fn relay(peer: Box<dyn Stream>, inner: &Path, limits: Limits) -> Result<(), Dropped> {
    let kernel = UnixStream::connect(inner).await.map_err(Dropped::Inner)?;
    let (mut kernel_rx, mut kernel_tx) = kernel.into_split();
    let (mut peer_rx, mut peer_tx) = tokio::io::split(peer);

    // Peer → kernel: validated before forwarding.
    let inbound = async {
        let mut validator = Validator::new(limits);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match peer_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            if let Err(v) = validator.feed(&buf[..n]) {
                return Err(Dropped::Violation(v));
            }
            if kernel_tx.write_all(&buf[..n]).await.is_err() {
                return Ok(());
            }
        }
    };

    // Kernel → peer: read at once, queued here, written as fast as the peer takes it.
    let waiting = AtomicUsize::new(0);
    let (queue_tx, mut queue_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let from_kernel = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match kernel_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            let now = waiting.fetch_add(n, Ordering::SeqCst) + n;
            if now > limits.max_backlog {
                return Err(Dropped::Backlog(now));
            }
            if queue_tx.send(buf[..n].to_vec()).is_err() {
                return Ok(());
            }
        }
    };
    let to_peer = async {
        while let Some(chunk) = queue_rx.recv().await {
            if peer_tx.write_all(&chunk).await.is_err() {
                return Ok(());
            }
            waiting.fetch_sub(chunk.len(), Ordering::SeqCst);
        }
        Ok::<(), Dropped>(())
    };

    // The first direction to finish ends the relay; dropping the halves closes both connections,
    // and the libzmq socket discards the peer with any partial message.
    tokio::select! {
        r = inbound => r,
        r = from_kernel => r,
        r = to_peer => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GREETING: [u8; 64] = {
        let mut g = [0u8; 64];
        g[0] = 0xFF;
        g[9] = 0x7F;
        g[10] = 3;
        g[12] = b'N';
        g[13] = b'U';
        g[14] = b'L';
        g[15] = b'L';
        g
    };

    fn header(flags: u8, len: u64, long: bool) -> Vec<u8> {
        if long {
            let mut h = vec![flags | FLAG_LONG];
            h.extend_from_slice(&len.to_be_bytes());
            h
        } else {
            vec![flags, len as u8]
        }
    }

    fn small() -> Limits {
        Limits { max_message: 1000, max_frames: 4, max_command: 100, ..Limits::default() }
    }

    #[test]
    fn a_header_declaring_2_pow_50_bytes_is_refused_before_its_body() {
        let mut v = Validator::new(Limits::default());
        v.feed(&GREETING).unwrap();
        let err = v.feed(&header(0, 1 << 50, true)).unwrap_err();
        assert_eq!(err, Violation::MessageTooLarge { declared: 1 << 50, limit: 64 << 20 });
    }

    #[test]
    fn limits_count_the_whole_message_and_reset_after_it() {
        let mut v = Validator::new(small());
        v.feed(&GREETING).unwrap();
        for _ in 0..3 {
            v.feed(&header(FLAG_MORE, 200, false)).unwrap();
            v.feed(&[0; 200]).unwrap();
        }
        v.feed(&header(0, 400, true)).unwrap();
        v.feed(&[0; 400]).unwrap();
        // A new message starts from zero.
        v.feed(&header(FLAG_MORE, 255, false)).unwrap();
        v.feed(&[0; 255]).unwrap();
        assert_eq!(v.feed(&header(0, 746, true)), Err(Violation::MessageTooLarge { declared: 1001, limit: 1000 }));
        let mut v = Validator::new(small());
        v.feed(&GREETING).unwrap();
        for _ in 0..4 {
            v.feed(&header(FLAG_MORE, 0, false)).unwrap();
        }
        assert_eq!(v.feed(&header(0, 0, false)), Err(Violation::TooManyFrames { limit: 4 }));
    }

    #[test]
    fn commands_reserved_bits_and_greetings() {
        let mut v = Validator::new(small());
        v.feed(&GREETING).unwrap();
        v.feed(&header(FLAG_COMMAND, 100, false)).unwrap();
        v.feed(&[0; 100]).unwrap();
        assert!(matches!(v.clone().feed(&header(FLAG_COMMAND, 101, false)), Err(Violation::CommandTooLarge { .. })));
        assert_eq!(v.clone().feed(&[FLAG_COMMAND | FLAG_MORE, 0]), Err(Violation::CommandWithMore));
        assert_eq!(v.clone().feed(&[0x80, 0]), Err(Violation::ReservedFlags(0x80)));
        let mut g = GREETING;
        g[10] = 2;
        assert!(matches!(Validator::new(small()).feed(&g), Err(Violation::BadGreeting(_))));
        assert!(matches!(Validator::new(small()).feed(b"GET / HTTP/1.1\r\n"), Err(Violation::BadGreeting(_))));
    }

    /// A stream of frames, valid and not, as (flags, declared length, long encoding, body bytes sent).
    fn frames() -> impl Strategy<Value = Vec<(u8, u64, bool, usize)>> {
        let len = prop_oneof![0u64..300, 900u64..1100, any::<u64>(), Just(1 << 50)];
        prop::collection::vec((prop_oneof![0u8..8, any::<u8>()], len, any::<bool>(), 0usize..1200), 0..12)
    }

    fn wire(frames: &[(u8, u64, bool, usize)]) -> Vec<u8> {
        let mut out = GREETING.to_vec();
        for &(flags, len, long, body) in frames {
            let long = long || len > 255;
            out.extend(header(flags & !FLAG_LONG, len, long));
            out.extend(std::iter::repeat_n(7u8, body.min(len as usize)));
            if (body as u64) < len {
                break; // the stream ends inside this frame's body
            }
        }
        out
    }

    /// The reference verdict: the first frame header that breaks a limit, computed over whole frames.
    fn reference(frames: &[(u8, u64, bool, usize)], l: &Limits) -> Option<usize> {
        let (mut bytes, mut count) = (0u64, 0u32);
        for (i, &(flags, len, _, body)) in frames.iter().enumerate() {
            let flags = flags & !FLAG_LONG;
            let bad = flags & 0xF8 != 0
                || (flags & FLAG_COMMAND != 0 && (flags & FLAG_MORE != 0 || len > l.max_command))
                || (flags & FLAG_COMMAND == 0 && (bytes.saturating_add(len) > l.max_message || count >= l.max_frames));
            if bad {
                return Some(i);
            }
            if flags & FLAG_COMMAND == 0 {
                if flags & FLAG_MORE != 0 {
                    bytes += len;
                    count += 1;
                } else {
                    (bytes, count) = (0, 0);
                }
            }
            if (body as u64) < len {
                return None; // the stream ends inside this frame's body
            }
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any byte stream, cut anywhere: never a panic, and the same verdict however it is cut.
        #[test]
        fn verdict_is_independent_of_chunking(data in prop::collection::vec(any::<u8>(), 0..600), cuts in prop::collection::vec(0usize..600, 0..8)) {
            let mut stream = GREETING.to_vec();
            stream.extend(&data);
            let whole = Validator::new(small()).feed(&stream);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort();
            let mut v = Validator::new(small());
            let mut at = 0;
            let mut chunked = Ok(());
            for c in cuts.into_iter().chain([stream.len()]) {
                chunked = v.feed(&stream[at..c]);
                at = c;
                if chunked.is_err() { break; }
            }
            prop_assert_eq!(whole, chunked);
        }

        /// Structured frames: a violation is reported exactly when the reference finds one, so
        /// no header over a limit is ever forwarded and no valid stream is refused.
        #[test]
        fn refuses_exactly_the_frames_over_a_limit(frames in frames()) {
            let l = small();
            let got = Validator::new(l).feed(&wire(&frames));
            prop_assert_eq!(got.is_err(), reference(&frames, &l).is_some(), "{:?}", got);
        }
    }
}
