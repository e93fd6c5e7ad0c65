//! Process plumbing: SIGINT delivery to the front end, and fd 2 captured while the engine starts
//! behind the prompt.

use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

static SIGINT_PIPE: AtomicI32 = AtomicI32::new(-1);
static SIGINT_COUNT: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigint(_: libc::c_int) {
    SIGINT_COUNT.fetch_add(1, Ordering::SeqCst);
    let fd = SIGINT_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
        unsafe { libc::write(fd, b"i".as_ptr().cast(), 1) };
    }
}

/// What SIGINT calls now: `install_sigint` sets it, `clear_sigint` removes it. One pipe and one
/// thread serve every handler, because a recycled spare engine runs one REPL after another in
/// this process (`pivot_engine::spare::recycling`).
type SigintHandler = Box<dyn Fn() + Send>;
static SIGINT_HANDLER: Mutex<Option<SigintHandler>> = Mutex::new(None);

/// Ctrl-C while a cell runs (the terminal is in cooked mode then) reaches us as SIGINT; the
/// handler wakes a thread that calls `handler`. At the prompt rustyline reads Ctrl-C as a key.
/// A later call replaces the handler.
pub fn install_sigint(handler: impl Fn() + Send + 'static) {
    *SIGINT_HANDLER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(handler));
    if SIGINT_PIPE.load(Ordering::SeqCst) >= 0 {
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    SIGINT_PIPE.store(fds[1], Ordering::SeqCst);
    // The handler only touches atomics and write(2); SA_RESTART keeps blocking reads (stdin,
    // channels) going.
    pivot_engine::signal::install(libc::SIGINT, on_sigint);
    // SAFETY: fds[0] is a fresh descriptor we own.
    let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let _ = std::thread::Builder::new().name("pivot-sigint".into()).spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 64];
        while matches!(reader.read(&mut b), Ok(n) if n > 0) {
            if let Some(h) = SIGINT_HANDLER.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                h();
            }
        }
    });
}

/// SIGINT does nothing until the next `install_sigint` (a recycled engine between two REPLs).
pub fn clear_sigint() {
    drop(SIGINT_HANDLER.lock().unwrap_or_else(|e| e.into_inner()).take());
    take_sigints();
}

/// Empties std's stdin buffer, which outlives a REPL that stopped reading before its input's
/// end (`:quit` in piped input, an `input()` answered with lines to spare): the next REPL a
/// recycled engine serves must read only its own input. fd 0 is /dev/null meanwhile, so the
/// buffer drains without waiting for more input; fd 0 is restored after.
pub fn discard_buffered_stdin() {
    use std::io::BufRead;
    let Ok(null) = std::fs::File::open("/dev/null") else { return };
    // SAFETY: dup/dup2/close of descriptors this process owns; fd 0 is put back before return.
    unsafe {
        let saved = libc::dup(0);
        if saved < 0 {
            return;
        }
        libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0);
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.fill_buf().map(|b| b.len()) {
            if n == 0 {
                break;
            }
            stdin.consume(n);
        }
        drop(stdin);
        libc::dup2(saved, 0);
        libc::close(saved);
    }
}

/// Returns and resets the number of SIGINTs since the last call.
pub fn take_sigints() -> usize {
    SIGINT_COUNT.swap(0, Ordering::SeqCst)
}

static SAVED_STDERR: Mutex<Option<i32>> = Mutex::new(None);

/// Puts a pipe on fd 2 (cargo's "Compiling …" lines that evcxr copies there) and hands each line
/// to `forward`, until `release_stderr`. Must run before other threads start.
pub fn capture_stderr(forward: impl Fn(String) + Send + 'static) {
    let orig = pivot_engine::buildlog::redirect_fd2(move |line, _| {
        forward(String::from_utf8_lossy(line).trim_end_matches(['\n', '\r']).to_string())
    });
    *SAVED_STDERR.lock().unwrap_or_else(|e| e.into_inner()) = orig;
}

/// Writes to the terminal's stderr: the saved descriptor while fd 2 is captured (writing to fd 2
/// then would feed the capture pipe its own output), else fd 2.
pub fn write_stderr(bytes: &[u8]) {
    let saved = SAVED_STDERR.lock().unwrap_or_else(|e| e.into_inner());
    let fd = saved.unwrap_or(2);
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writing a valid buffer to a descriptor we keep open while the lock is held.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Gives fd 2 back to the terminal.
pub fn release_stderr() {
    if let Some(orig) = SAVED_STDERR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: orig is the descriptor we saved; dup2 atomically replaces fd 2.
        unsafe {
            libc::dup2(orig, 2);
            libc::close(orig);
        }
    }
}

/// Turns terminal echo off until dropped: keys typed ahead while the first input waits for the
/// engine are kept for the next prompt instead of being echoed over the spinner.
pub struct EchoOff(Option<libc::termios>);

pub fn echo_off() -> EchoOff {
    // SAFETY: termios calls on fd 0 with a zero-initialised struct that tcgetattr fills.
    unsafe {
        if libc::isatty(0) != 1 {
            return EchoOff(None);
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return EchoOff(None);
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        // TCSANOW: pending input must survive (TCSAFLUSH would drop what was typed ahead).
        libc::tcsetattr(0, libc::TCSANOW, &t);
        EchoOff(Some(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in echo_off.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
