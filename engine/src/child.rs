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
    for (sig, handler) in [(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int)), (libc::SIGUSR1, on_sigusr1)] {
        // SAFETY: the handlers only store to an atomic; SA_RESTART keeps evcxr's blocking
        // stdin read going when a signal arrives while the child is idle.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn pipe() -> std::io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
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
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        if libc::dup2(out_w, 1) < 0 || libc::dup2(err_w, 2) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(out_w);
        libc::close(err_w);
        for fd in [out_r, err_r] {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let out = std::fs::File::from_raw_fd(real_out);
        std::thread::Builder::new().name("pivot-relay".into()).spawn(move || Relay::new(out).run(out_r, err_r))?;
    }
    Ok(())
}

struct Relay {
    out: std::fs::File,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    /// stderr lines not yet forwarded: held briefly so that a `?` error's text can be taken out
    /// of the stream and reported as the error instead of as stray stderr.
    held_err: Vec<String>,
    last_out_data: Instant,
    last_err_data: Instant,
}

const HOLD: Duration = Duration::from_millis(15);
const PARTIAL_AFTER: Duration = Duration::from_millis(60);

impl Relay {
    fn new(out: std::fs::File) -> Self {
        Relay {
            out,
            out_buf: Vec::new(),
            err_buf: Vec::new(),
            held_err: Vec::new(),
            last_out_data: Instant::now(),
            last_err_data: Instant::now(),
        }
    }

    fn run(mut self, out_r: RawFd, err_r: RawFd) {
        let mut out_open = true;
        let mut err_open = true;
        while out_open {
            let waiting = !self.held_err.is_empty() || !self.err_buf.is_empty() || !self.out_buf.is_empty();
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
            let mut outgoing = Vec::new();
            // stderr first: when both are ready, the stderr bytes were usually written first
            // (a panic message or `?` error precedes evcxr's stdout notification).
            if fds[1].revents != 0 && !read_into(err_r, &mut self.err_buf) {
                err_open = false;
            }
            if fds[1].revents != 0 {
                self.last_err_data = Instant::now();
                self.split_err_lines();
            }
            if fds[0].revents != 0 {
                if !read_into(out_r, &mut self.out_buf) {
                    out_open = false;
                }
                self.last_out_data = Instant::now();
                while let Some(pos) = self.out_buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.out_buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    self.handle_out_line(line, err_r, &mut outgoing);
                }
            }
            let now = Instant::now();
            if !self.held_err.is_empty() && now.duration_since(self.last_err_data) >= HOLD {
                self.flush_err(&mut outgoing);
            }
            if !self.err_buf.is_empty() && now.duration_since(self.last_err_data) >= PARTIAL_AFTER {
                let text = String::from_utf8_lossy(&std::mem::take(&mut self.err_buf)).into_owned();
                self.held_err.push(text);
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
                self.flush_err(&mut outgoing);
                outgoing.extend_from_slice(PARTIAL_PREFIX.as_bytes());
                outgoing.extend_from_slice(text.replace('\n', " ").as_bytes());
                outgoing.push(b'\n');
            }
            if !outgoing.is_empty() && self.out.write_all(&outgoing).is_err() {
                return;
            }
        }
        let mut outgoing = Vec::new();
        self.flush_err(&mut outgoing);
        let _ = self.out.write_all(&outgoing);
    }

    fn split_err_lines(&mut self) {
        while let Some(pos) = self.err_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.err_buf.drain(..=pos).collect();
            self.held_err.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
    }

    fn flush_err(&mut self, outgoing: &mut Vec<u8>) {
        for line in self.held_err.drain(..) {
            outgoing.extend_from_slice(STDERR_PREFIX.as_bytes());
            outgoing.extend_from_slice(line.as_bytes());
            outgoing.push(b'\n');
        }
    }

    fn handle_out_line(&mut self, line: String, err_r: RawFd, outgoing: &mut Vec<u8>) {
        if line == USER_ERROR_OCCURRED || line == PANIC_NOTIFICATION {
            // The error text was written to stderr before this line: it is in the pipe now.
            read_into(err_r, &mut self.err_buf);
            self.split_err_lines();
            if !self.err_buf.is_empty() {
                let rest = String::from_utf8_lossy(&std::mem::take(&mut self.err_buf)).into_owned();
                self.held_err.push(rest);
            }
            let lines = std::mem::take(&mut self.held_err);
            let marker = if line == USER_ERROR_OCCURRED { Marker::QuestionMarkError { lines } } else { Marker::PanicNotice { lines } };
            outgoing.extend_from_slice(marker.to_line().as_bytes());
            outgoing.push(b'\n');
        } else {
            self.flush_err(outgoing);
        }
        outgoing.extend_from_slice(line.as_bytes());
        outgoing.push(b'\n');
    }
}

/// Reads everything available. Returns false at end of file.
fn read_into(fd: RawFd, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 65536];
    loop {
        // SAFETY: chunk is a valid writable buffer of the given length.
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n > 0 {
            buf.extend_from_slice(&chunk[..n as usize]);
            continue;
        }
        if n == 0 {
            return false;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exported_flag_has_the_protocol_name() {
        // The static's name cannot be taken from the constant (`no_mangle` uses the item name),
        // and the kernel's and REPL's build.rs export it by this name too.
        assert_eq!(pivot_markers::INTERRUPT_FLAG_SYMBOL, "PIVOT_INTERRUPT_FLAG");
    }
}
