//! The evcxr child process (our own executable started with `EVCXR_IS_RUNTIME=1`).
//!
//! Two things happen here before evcxr's runtime loop takes over:
//! 1. SIGINT sets `PIVOT_INTERRUPT_FLAG`, which the prelude finds with `dlsym` (cells cannot own
//!    it: each cell has its own copy of the prelude's statics). SIGUSR1 clears it; the parent sends
//!    it before each cell so that a stale request never stops the next one.
//! 2. A relay thread merges the child's stdout and stderr into one ordered stdout stream. This
//!    is how the parent learns about `?` errors at all: evcxr prints the error to stderr and an
//!    `EVCXR_ERROR_OCCURRED` line to stdout, which it consumes and then reports success. The
//!    relay sees that line first and emits a marker carrying the error text.
//!
//! Three hazards make that capture hard, and the relay is built around them:
//! - The two streams are read apart, so data of both that one wakeup finds has no known order. A
//!   cell that prints (a progress update) and then fails has both its last stdout line and the
//!   error's text waiting when the relay runs late; forwarding held stderr before that stdout
//!   line, as for lines that come later, sent the error's text out as plain stderr and left
//!   evcxr's notification an empty marker (`Error` with no message, seen after 2-rank launches).
//!   An ordinary stdout line therefore forwards only stderr read in earlier wakeups.
//! - Processes the cell starts inherit fds 1 and 2 and write to them at any time. Their bytes
//!   must never be glued to the child's own: a subprocess's unfinished line in front of
//!   `EVCXR_ERROR_OCCURRED` hides the line from evcxr and from us. So fds 1 and 2 are Unix
//!   stream sockets with `SO_PASSCRED`: every read then says which process wrote it (the kernel
//!   never merges two writers' data into one read), and each writer gets its own line buffer.
//!   Other processes' stderr can never be a `?` error's text, so it is forwarded at once.
//! - Between evcxr's `eprintln!` of the error and its `println!` of the notification, the
//!   cell's thread may be descheduled for any length of time on a loaded machine. Stderr the
//!   child writes itself is therefore held until that thread has demonstrably moved on (it ran
//!   [`MOVED_ON_CPU`] of CPU time since, or it waits in a system call other than a write or a
//!   lock), not for a fixed wall time; [`HOLD_MAX`] bounds the wait so that output is never
//!   held back indefinitely.
//!
//! `PIVOT_RELAY_TRACE=FILE` appends every read and decision of the relay to FILE (debugging).

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pivot_markers::{Marker, PARTIAL_PREFIX, STDERR_PREFIX};

/// The process-global interrupt flag (see prelude `runtime::interrupt_flag`), named
/// `pivot_markers::INTERRUPT_FLAG_SYMBOL`. Exported from the executable by the linker flag in the
/// kernel's and REPL's build.rs.
#[unsafe(no_mangle)]
#[used]
pub static PIVOT_INTERRUPT_FLAG: AtomicBool = AtomicBool::new(false);

pub const PANIC_NOTIFICATION: &str = "EVCXR_PANIC_NOTIFICATION";
pub const USER_ERROR_OCCURRED: &str = "EVCXR_ERROR_OCCURRED";

/// True when this process is evcxr's runtime child (then `child_main` must run).
pub fn is_runtime_child() -> bool {
    std::env::var_os("EVCXR_IS_RUNTIME").is_some()
}

/// Entry point of the child: never returns.
pub fn child_main() -> ! {
    install_signal_handlers();
    if std::env::var_os("PIVOT_NO_RELAY").is_none() {
        if let Err(e) = start_relay() {
            eprintln!("pivot: could not start the output relay ({e}); `?` errors will not be reported");
        }
    }
    // Keep the flag alive through LTO/linker GC: the prelude only reaches it via dlsym.
    let _ = PIVOT_INTERRUPT_FLAG.load(Ordering::Relaxed);
    evcxr::runtime_hook();
    std::process::exit(0)
}

extern "C" fn on_sigint(_: libc::c_int) {
    PIVOT_INTERRUPT_FLAG.store(true, Ordering::SeqCst);
}

extern "C" fn on_sigusr1(_: libc::c_int) {
    PIVOT_INTERRUPT_FLAG.store(false, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // The handlers only store to an atomic; SA_RESTART keeps evcxr's blocking stdin read going
    // when a signal arrives while the child is idle.
    crate::signal::install(libc::SIGINT, on_sigint);
    crate::signal::install(libc::SIGUSR1, on_sigusr1);
}

/// A Unix stream socket pair whose read end (first, non-blocking) learns each writer's pid.
/// Both ends are close-on-exec; the write end is meant to be `dup2`ed onto fd 1 or 2.
fn output_channel() -> std::io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors; setsockopt gets a valid int.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Before any write: data sent earlier would carry no credentials.
        let on: libc::c_int = 1;
        if libc::setsockopt(fds[0], libc::SOL_SOCKET, libc::SO_PASSCRED, (&on as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fds[0]);
            libc::close(fds[1]);
            return Err(e);
        }
        let fl = libc::fcntl(fds[0], libc::F_GETFL);
        libc::fcntl(fds[0], libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((fds[0], fds[1]))
}

fn start_relay() -> std::io::Result<()> {
    // SAFETY: plain descriptor juggling on fds 1 and 2, before any other thread exists.
    unsafe {
        let real_out = libc::dup(1);
        if real_out < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::fcntl(real_out, libc::F_SETFD, libc::FD_CLOEXEC);
        let (out_r, out_w) = output_channel()?;
        let (err_r, err_w) = output_channel()?;
        if libc::dup2(out_w, 1) < 0 || libc::dup2(err_w, 2) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(out_w);
        libc::close(err_w);
        let out = std::fs::File::from_raw_fd(real_out);
        // evcxr runs every cell on this, the process's first thread.
        let cell_thread = CellThread::of(libc::getpid());
        std::thread::Builder::new()
            .name("pivot-relay".into())
            .spawn(move || Relay::new(out, Box::new(move || cell_thread.state())).run(out_r, err_r))?;
    }
    Ok(())
}

/// What the thread that runs the cells is doing, as far as the relay needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThreadState {
    /// CPU time it has run, in ns (`None`: unknown).
    pub cpu_ns: Option<u64>,
    /// It waits in a system call that cannot lie between evcxr's error print and its
    /// notification (a sleep, a poll, a read, a wait for a process): it has moved on.
    pub waiting_elsewhere: bool,
}

/// The cell thread's /proc entries.
struct CellThread {
    schedstat: String,
    syscall: String,
}

impl CellThread {
    fn of(tid: libc::pid_t) -> Self {
        CellThread { schedstat: format!("/proc/self/task/{tid}/schedstat"), syscall: format!("/proc/self/task/{tid}/syscall") }
    }

    fn state(&self) -> ThreadState {
        let cpu_ns = std::fs::read_to_string(&self.schedstat).ok().and_then(|s| s.split_whitespace().next()?.parse().ok());
        // "running", or the number of the system call it is in (then its arguments), or -1.
        let syscall = std::fs::read_to_string(&self.syscall).ok().and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok());
        // A write (the notification itself, or a full socket) and a futex (the stdout lock
        // another thread holds) may come between the two prints.
        let waiting_elsewhere = syscall.is_some_and(|nr| nr >= 0 && ![libc::SYS_write, libc::SYS_writev, libc::SYS_futex].contains(&nr));
        ThreadState { cpu_ns, waiting_elsewhere }
    }
}

/// Stderr of this process is held at least this long (it may be a `?` error's text).
const HOLD: Duration = Duration::from_millis(15);
/// CPU time the cell thread must run after stderr arrived before that stderr counts as not
/// followed by evcxr's error notification: the two prints are microseconds of CPU apart.
const MOVED_ON_CPU: u64 = 2_000_000;
/// Held stderr is forwarded after this long in any case (a cell thread that blocks on a lock
/// for long while its other threads print to stderr).
const HOLD_MAX: Duration = Duration::from_secs(1);
const PARTIAL_AFTER: Duration = Duration::from_millis(60);

/// Bytes of one writer on one stream, not yet a whole line.
struct Pending {
    buf: Vec<u8>,
    last_data: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Stream {
    Out,
    Err,
}

pub(crate) struct Relay {
    out: std::fs::File,
    my_pid: i32,
    cell_thread: Box<dyn FnMut() -> ThreadState + Send>,
    err_r: RawFd,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    /// Other processes' unfinished lines, by stream and writer pid.
    others: HashMap<(Stream, i32), Pending>,
    /// This process's stderr lines not yet forwarded, with the wakeup (`batch`) that read them:
    /// held so that a `?` error's text can be taken out of the stream and reported as the error
    /// instead of as stray stderr.
    held_err: Vec<(u64, String)>,
    /// Counts the relay's wakeups. Data of both streams read in one wakeup has no known order.
    batch: u64,
    /// The cell thread's state when this process last wrote to stderr.
    err_mark: Option<ThreadState>,
    last_out_data: Instant,
    last_err_data: Instant,
    trace: Option<(std::fs::File, Instant)>,
}

impl Relay {
    pub(crate) fn new(out: std::fs::File, cell_thread: Box<dyn FnMut() -> ThreadState + Send>) -> Self {
        let trace = std::env::var_os("PIVOT_RELAY_TRACE")
            .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok())
            .map(|f| (f, Instant::now()));
        Relay {
            out,
            // SAFETY: getpid has no preconditions.
            my_pid: unsafe { libc::getpid() },
            cell_thread,
            err_r: -1,
            out_buf: Vec::new(),
            err_buf: Vec::new(),
            others: HashMap::new(),
            held_err: Vec::new(),
            batch: 0,
            err_mark: None,
            last_out_data: Instant::now(),
            last_err_data: Instant::now(),
            trace,
        }
    }

    fn trace(&mut self, what: impl FnOnce() -> String) {
        if let Some((f, t0)) = &mut self.trace {
            let _ = writeln!(f, "{:10.3} ms {}", t0.elapsed().as_secs_f64() * 1e3, what());
        }
    }

    /// Relays until end of file on `out_r` (every writer of fd 1 has closed it).
    pub(crate) fn run(mut self, out_r: RawFd, err_r: RawFd) {
        self.err_r = err_r;
        let mut out_open = true;
        let mut err_open = true;
        while out_open {
            let waiting = !self.held_err.is_empty() || !self.err_buf.is_empty() || !self.out_buf.is_empty() || !self.others.is_empty();
            let timeout = if waiting { 10 } else { -1 };
            let mut fds = [
                libc::pollfd { fd: out_r, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: if err_open { err_r } else { -1 }, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of two pollfd.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            self.batch += 1;
            let mut outgoing = Vec::new();
            // stderr first: when both are ready, the stderr bytes were usually written first
            // (a panic message or `?` error precedes evcxr's stdout notification).
            if fds[1].revents != 0 && !self.read(err_r, Stream::Err, &mut outgoing) {
                err_open = false;
            }
            if fds[0].revents != 0 && !self.read(out_r, Stream::Out, &mut outgoing) {
                out_open = false;
            }
            let now = Instant::now();
            let err_age = now.duration_since(self.last_err_data);
            if !self.held_err.is_empty() && err_age >= HOLD && self.cell_thread_moved_on(err_age) {
                let n = self.held_err.len();
                self.trace(|| format!("{n} held stderr line(s) forwarded as stderr"));
                self.flush_err(&mut outgoing);
            }
            if !self.err_buf.is_empty() && err_age >= PARTIAL_AFTER && self.cell_thread_moved_on(err_age) {
                let text = String::from_utf8_lossy(&std::mem::take(&mut self.err_buf)).into_owned();
                self.held_err.push((self.batch, text));
                self.flush_err(&mut outgoing);
            }
            // `print!` + flush without a newline (progress dots): show it without waiting for
            // the rest of the line, unless it could be the start of a protocol line.
            if !self.out_buf.is_empty()
                && now.duration_since(self.last_out_data) >= PARTIAL_AFTER
                && !self.out_buf.starts_with(b"\x1e")
                && !self.out_buf.starts_with(b"EVCXR_")
            {
                let text = String::from_utf8_lossy(&std::mem::take(&mut self.out_buf)).into_owned();
                if self.cell_thread_moved_on(err_age) {
                    self.flush_err(&mut outgoing);
                }
                partial_line(&mut outgoing, &text);
            }
            // Other processes' unfinished lines (progress bars): shown after a pause, as the
            // child's own. Their stderr travels as ordinary relayed stderr.
            let stale: Vec<(Stream, i32)> = self.others.iter().filter(|(_, p)| now.duration_since(p.last_data) >= PARTIAL_AFTER).map(|(k, _)| *k).collect();
            for key in stale {
                if let Some(p) = self.others.remove(&key) {
                    let text = String::from_utf8_lossy(&p.buf).into_owned();
                    match key.0 {
                        Stream::Out => partial_line(&mut outgoing, &text),
                        Stream::Err => relayed_stderr(&mut outgoing, &text),
                    }
                }
            }
            if !outgoing.is_empty() && self.out.write_all(&outgoing).is_err() {
                return;
            }
        }
        let mut outgoing = Vec::new();
        self.flush_err(&mut outgoing);
        for ((stream, _), p) in std::mem::take(&mut self.others) {
            let text = String::from_utf8_lossy(&p.buf).into_owned();
            match stream {
                Stream::Out => partial_line(&mut outgoing, &text),
                Stream::Err => relayed_stderr(&mut outgoing, &text),
            }
        }
        let _ = self.out.write_all(&outgoing);
    }

    /// Whether this process's stderr, last written `age` ago, can no longer be followed by
    /// evcxr's notification (see the module doc).
    fn cell_thread_moved_on(&mut self, age: Duration) -> bool {
        if age >= HOLD_MAX {
            return true;
        }
        let now = (self.cell_thread)();
        let ran = match (self.err_mark.and_then(|m| m.cpu_ns), now.cpu_ns) {
            (Some(then), Some(cpu)) => cpu.saturating_sub(then),
            _ => 0,
        };
        ran >= MOVED_ON_CPU || now.waiting_elsewhere
    }

    /// Reads everything available on one stream, each piece into its writer's buffer, and
    /// handles the lines it completes. Returns false at end of file.
    fn read(&mut self, fd: RawFd, stream: Stream, outgoing: &mut Vec<u8>) -> bool {
        let mut chunk = vec![0u8; 65536];
        let mut own_err = false;
        let open = loop {
            let (n, pid) = match recv_with_pid(fd, &mut chunk) {
                Ok(Some(got)) => got,
                Ok(None) => break true,
                Err(()) => break false,
            };
            if n == 0 {
                break false;
            }
            let data = &chunk[..n];
            self.trace(|| format!("{stream:?} from pid {pid:?}: {:?}", String::from_utf8_lossy(data)));
            // No credentials (they cannot be had): treated as this process's, as before.
            let own = pid.is_none_or(|p| p == self.my_pid);
            match (stream, own) {
                (Stream::Out, true) => {
                    self.out_buf.extend_from_slice(data);
                    self.last_out_data = Instant::now();
                    while let Some(pos) = self.out_buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = self.out_buf.drain(..=pos).collect();
                        let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                        self.handle_out_line(line, outgoing);
                    }
                }
                (Stream::Err, true) => {
                    self.err_buf.extend_from_slice(data);
                    self.last_err_data = Instant::now();
                    own_err = true;
                    self.split_err_lines();
                }
                (_, false) => {
                    let key = (stream, pid.unwrap_or_default());
                    let pending = self.others.entry(key).or_insert_with(|| Pending { buf: Vec::new(), last_data: Instant::now() });
                    pending.buf.extend_from_slice(data);
                    pending.last_data = Instant::now();
                    while let Some(pos) = pending.buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.buf.drain(..=pos).collect();
                        let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                        match stream {
                            Stream::Out => {
                                outgoing.extend_from_slice(line.as_bytes());
                                outgoing.push(b'\n');
                            }
                            Stream::Err => relayed_stderr(outgoing, &line),
                        }
                    }
                    if pending.buf.is_empty() {
                        self.others.remove(&key);
                    }
                }
            }
        };
        if own_err {
            self.err_mark = Some((self.cell_thread)());
        }
        open
    }

    fn split_err_lines(&mut self) {
        while let Some(pos) = self.err_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.err_buf.drain(..=pos).collect();
            self.held_err.push((self.batch, String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()));
        }
    }

    fn flush_err(&mut self, outgoing: &mut Vec<u8>) {
        for (_, line) in self.held_err.drain(..) {
            relayed_stderr(outgoing, &line);
        }
    }

    /// Forwards the held stderr lines known to precede a stdout line of this wakeup: those read
    /// in earlier wakeups. Lines read in this one may have been written after it (the relay reads
    /// stderr first), such as a `?` error's text after a progress line the cell printed just
    /// before failing, with evcxr's notification still to come.
    fn flush_err_before_this_batch(&mut self, outgoing: &mut Vec<u8>) {
        let earlier = self.held_err.iter().take_while(|(b, _)| *b < self.batch).count();
        for (_, line) in self.held_err.drain(..earlier) {
            relayed_stderr(outgoing, &line);
        }
    }

    fn handle_out_line(&mut self, line: String, outgoing: &mut Vec<u8>) {
        if line == USER_ERROR_OCCURRED || line == PANIC_NOTIFICATION {
            // The error text was written to stderr before this line: it is in the socket now.
            let err_r = self.err_r;
            if err_r >= 0 {
                self.read(err_r, Stream::Err, outgoing);
            }
            if !self.err_buf.is_empty() {
                let rest = String::from_utf8_lossy(&std::mem::take(&mut self.err_buf)).into_owned();
                self.held_err.push((self.batch, rest));
            }
            let lines: Vec<String> = std::mem::take(&mut self.held_err).into_iter().map(|(_, l)| l).collect();
            self.trace(|| format!("{line}: marker with {} line(s) {lines:?}", lines.len()));
            let marker = if line == USER_ERROR_OCCURRED { Marker::QuestionMarkError { lines } } else { Marker::PanicNotice { lines } };
            outgoing.extend_from_slice(marker.to_line().as_bytes());
            outgoing.push(b'\n');
        } else if line.starts_with("EVCXR_") {
            // evcxr's runtime writes these after the cell's code has run (its end, its value):
            // every stderr line of the cell comes before them.
            self.flush_err(outgoing);
        } else {
            self.flush_err_before_this_batch(outgoing);
        }
        outgoing.extend_from_slice(line.as_bytes());
        outgoing.push(b'\n');
    }
}

fn relayed_stderr(outgoing: &mut Vec<u8>, line: &str) {
    outgoing.extend_from_slice(STDERR_PREFIX.as_bytes());
    outgoing.extend_from_slice(line.as_bytes());
    outgoing.push(b'\n');
}

fn partial_line(outgoing: &mut Vec<u8>, text: &str) {
    outgoing.extend_from_slice(PARTIAL_PREFIX.as_bytes());
    outgoing.extend_from_slice(text.replace('\n', " ").as_bytes());
    outgoing.push(b'\n');
}

/// One `recvmsg`: the bytes and the pid of the process that wrote them (the kernel never
/// returns two writers' data from one call). `Ok(None)`: nothing available now; `Err`: the
/// stream failed. A descriptor that is not a socket (a test's pipe) is read plainly.
fn recv_with_pid(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, Option<i32>)>, ()> {
    // Room for one SCM_CREDENTIALS message, aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msg points at live buffers of the lengths it states.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::ENOTSOCK) => {
                    // SAFETY: buf is valid for writes of its length.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    return match n {
                        n if n >= 0 => Ok(Some((n as usize, None))),
                        _ => match std::io::Error::last_os_error().raw_os_error() {
                            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                            _ => Err(()),
                        },
                    };
                }
                _ => return Err(()),
            }
        }
        let mut pid = None;
        // SAFETY: the CMSG_* walk stays inside msg's control buffer, as the kernel filled it.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS {
                    let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    // 0: the data was sent before the reader asked for credentials.
                    pid = (cred.pid > 0).then_some(cred.pid);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        return Ok(Some((n as usize, pid)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pivot_markers::{split_line, Line};
    use std::io::Read;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    #[test]
    fn exported_flag_has_the_protocol_name() {
        // The static's name cannot be taken from the constant (`no_mangle` uses the item name),
        // and the kernel's and REPL's build.rs export it by this name too.
        assert_eq!(pivot_markers::INTERRUPT_FLAG_SYMBOL, "PIVOT_INTERRUPT_FLAG");
    }

    /// A relay over fresh output channels, its cell thread's state set by the test. Returns the
    /// write ends (stdout, stderr), the state, and the relay's thread, which yields all it wrote
    /// once both write ends (and every copy a subprocess held) are closed.
    fn relay() -> (OwnedFd, OwnedFd, Arc<Mutex<ThreadState>>, std::thread::JoinHandle<String>) {
        let (out_r, out_w) = output_channel().unwrap();
        let (err_r, err_w) = output_channel().unwrap();
        // A cell thread that is runnable but not running (descheduled): it gains no CPU time.
        let state = Arc::new(Mutex::new(ThreadState { cpu_ns: Some(1_000), waiting_elsewhere: false }));
        let seen = state.clone();
        let handle = std::thread::spawn(move || {
            let mut sink = tempfile_in_target();
            let writer = sink.try_clone().unwrap();
            Relay::new(writer, Box::new(move || *seen.lock().unwrap())).run(out_r, err_r);
            // SAFETY: the relay has returned; these fds are ours.
            unsafe {
                libc::close(out_r);
                libc::close(err_r);
            }
            let mut text = String::new();
            use std::io::Seek;
            sink.seek(std::io::SeekFrom::Start(0)).unwrap();
            sink.read_to_string(&mut text).unwrap();
            text
        });
        // SAFETY: fresh descriptors that nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(out_w), OwnedFd::from_raw_fd(err_w), state, handle) }
    }

    fn tempfile_in_target() -> std::fs::File {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!("pivot-relay-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }

    fn write(fd: &OwnedFd, bytes: &str) {
        // SAFETY: a valid buffer and descriptor; test writes are small enough for one call.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn qerr_lines(relayed: &str) -> Vec<Vec<String>> {
        relayed
            .lines()
            .filter_map(|l| match split_line(l) {
                Line::Marker { marker: Some(Marker::QuestionMarkError { lines }), .. } => Some(lines),
                _ => None,
            })
            .collect()
    }

    const ERROR_TEXT: &str = "interrupted by the user at pivot-train ×2 after 3 steps (every rank has ended); the model keeps its state as of that point";

    #[test]
    fn a_question_mark_error_keeps_its_text_however_long_the_cell_thread_is_descheduled() {
        let (out_w, err_w, _state, relay) = relay();
        // evcxr's `eprintln!` of the error, written in pieces as `Display` does...
        write(&err_w, "interrupted by the user at ");
        write(&err_w, &ERROR_TEXT["interrupted by the user at ".len()..]);
        write(&err_w, "\n");
        // ...then the thread waits for a CPU far longer than any fixed hold before its
        // `println!` of the notification.
        std::thread::sleep(Duration::from_millis(400));
        write(&out_w, &format!("{USER_ERROR_OCCURRED}\n"));
        drop((out_w, err_w));
        let relayed = relay.join().unwrap();
        assert_eq!(qerr_lines(&relayed), vec![vec![ERROR_TEXT.to_string()]], "{relayed:?}");
        assert!(!relayed.contains(STDERR_PREFIX), "the error's text was also relayed as stderr: {relayed:?}");
        assert!(relayed.lines().any(|l| l == USER_ERROR_OCCURRED), "{relayed:?}");
    }

    /// Starts a relay on channels that already hold everything the cell wrote, so that its first
    /// wakeup reads both streams at once (a relay thread that ran late).
    fn relay_after(writes: &[(bool, &str)], then: impl FnOnce(&OwnedFd)) -> String {
        let (out_r, out_w) = output_channel().unwrap();
        let (err_r, err_w) = output_channel().unwrap();
        // SAFETY: fresh descriptors that nothing else owns.
        let (out_w, err_w) = unsafe { (OwnedFd::from_raw_fd(out_w), OwnedFd::from_raw_fd(err_w)) };
        for (to_stdout, text) in writes {
            write(if *to_stdout { &out_w } else { &err_w }, text);
        }
        let mut sink = tempfile_in_target();
        let writer = sink.try_clone().unwrap();
        let descheduled = ThreadState { cpu_ns: Some(1_000), waiting_elsewhere: false };
        let relay = std::thread::spawn(move || Relay::new(writer, Box::new(move || descheduled)).run(out_r, err_r));
        then(&out_w);
        drop((out_w, err_w));
        relay.join().unwrap();
        let mut text = String::new();
        use std::io::Seek;
        sink.seek(std::io::SeekFrom::Start(0)).unwrap();
        sink.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn a_line_printed_just_before_the_error_does_not_push_the_error_text_out() {
        // The launcher's last progress update, then the `?` error: the relay woke after both.
        let progress = Marker::Clear { wait: true }.to_line();
        let writes = [(true, format!("{progress}\n")), (false, format!("{ERROR_TEXT}\n"))];
        let writes: Vec<(bool, &str)> = writes.iter().map(|(o, t)| (*o, t.as_str())).collect();
        // The notification in the same wakeup...
        let mut all = writes.clone();
        let note = format!("{USER_ERROR_OCCURRED}\n");
        all.push((true, &note));
        let relayed = relay_after(&all, |_| {});
        assert_eq!(qerr_lines(&relayed), vec![vec![ERROR_TEXT.to_string()]], "{relayed:?}");
        assert!(relayed.starts_with(&progress), "{relayed:?}");
        // ...or in a later one.
        let relayed = relay_after(&writes, |out_w| {
            std::thread::sleep(Duration::from_millis(200));
            write(out_w, &note);
        });
        assert_eq!(qerr_lines(&relayed), vec![vec![ERROR_TEXT.to_string()]], "{relayed:?}");
    }

    #[test]
    fn stderr_is_forwarded_once_the_cell_thread_has_moved_on() {
        let (out_w, err_w, state, relay) = relay();
        write(&err_w, "warning: first\n");
        std::thread::sleep(Duration::from_millis(100));
        // It ran on (2 ms of CPU more): the line cannot be an error's text any more.
        state.lock().unwrap().cpu_ns = Some(1_000 + MOVED_ON_CPU);
        std::thread::sleep(Duration::from_millis(100));
        // It sleeps in a system call: same.
        *state.lock().unwrap() = ThreadState { cpu_ns: Some(1_000 + MOVED_ON_CPU), waiting_elsewhere: true };
        write(&err_w, "warning: second\n");
        std::thread::sleep(Duration::from_millis(100));
        write(&out_w, "after\n");
        drop((out_w, err_w));
        let relayed = relay.join().unwrap();
        let expected = format!("{STDERR_PREFIX}warning: first\n{STDERR_PREFIX}warning: second\nafter\n");
        assert_eq!(relayed, expected);
    }

    #[test]
    fn subprocesses_writing_to_the_inherited_fds_cannot_split_the_error_or_its_notification() {
        let (out_w, err_w, _state, relay) = relay();
        // A subprocess (a rank, a tool the cell started) leaves unfinished lines on both
        // streams and keeps the descriptors open while the cell fails.
        let mut sub = std::process::Command::new("sh")
            .args(["-c", "printf 'rank 1: saving step 3'; printf 'rank 1: 50%%' >&2; exec sleep 1"])
            .stdin(std::process::Stdio::null())
            .stdout(out_w.try_clone().unwrap())
            .stderr(err_w.try_clone().unwrap())
            .spawn()
            .unwrap();
        // Its writes are in the channels before the cell's (it would print before exec-ing sleep).
        let t0 = Instant::now();
        while std::fs::read_to_string(format!("/proc/{}/comm", sub.id())).unwrap_or_default().trim() != "sleep" {
            assert!(t0.elapsed() < Duration::from_secs(10), "the subprocess did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        write(&err_w, &format!("{ERROR_TEXT}\n"));
        write(&out_w, &format!("{USER_ERROR_OCCURRED}\n"));
        drop((out_w, err_w));
        sub.wait().unwrap();
        let relayed = relay.join().unwrap();
        assert_eq!(qerr_lines(&relayed), vec![vec![ERROR_TEXT.to_string()]], "{relayed:?}");
        assert!(relayed.lines().any(|l| l == USER_ERROR_OCCURRED), "evcxr would not see its notification: {relayed:?}");
        assert!(relayed.contains("rank 1: saving step 3") && relayed.contains(&format!("{STDERR_PREFIX}rank 1: 50%")), "{relayed:?}");
    }
}
