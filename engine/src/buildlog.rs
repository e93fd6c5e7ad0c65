//! Shows cargo's "Compiling …" lines to the user.
//!
//! evcxr writes them to the host process's own fd 2, which for a Jupyter kernel ends up in the
//! server log: a researcher waiting minutes for the first build would see nothing. We put a pipe
//! on fd 2, copy everything to the original stderr, and pass compile-progress lines to the
//! session's sink.

use std::io::{BufRead, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Mutex;

use crate::output::{Event, Sink, StreamName};

static SINK: Mutex<Option<Sink>> = Mutex::new(None);
/// The descriptor `install` copies fd 2 to (-1 before it ran): an adopted spare engine puts its
/// launcher's stderr there.
static ORIGINAL_STDERR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Where this process's stderr really goes: the build log's copy of fd 2, else fd 2.
pub fn original_stderr() -> RawFd {
    match ORIGINAL_STDERR.load(std::sync::atomic::Ordering::SeqCst) {
        fd if fd >= 0 => fd,
        _ => 2,
    }
}

/// Must run before other threads start (it replaces fd 2).
pub fn install() {
    let mut orig: Option<std::fs::File> = None;
    let saved = redirect_fd2(move |line, fd| {
        // SAFETY: `fd` is the saved original stderr, open for the life of the process.
        let out = orig.get_or_insert_with(|| unsafe { std::fs::File::from_raw_fd(fd) });
        let _ = out.write_all(line);
        let text = String::from_utf8_lossy(line);
        if text.trim_start().starts_with("Compiling ") {
            let sink = SINK.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(sink) = sink {
                sink(Event::Stream { name: StreamName::Stderr, text: text.into_owned() });
            }
        }
    });
    if let Some(fd) = saved {
        ORIGINAL_STDERR.store(fd, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Puts a pipe on fd 2 and hands every line written there (newline included) to `on_line`, with
/// the descriptor of the original stderr, on a reader thread. Returns that descriptor (close-on-exec),
/// or `None` if fd 2 was left alone. Shared by the kernel (which copies lines through) and the REPL
/// (which shows them behind its prompt). Must run before other threads start.
pub fn redirect_fd2(mut on_line: impl FnMut(&[u8], RawFd) + Send + 'static) -> Option<RawFd> {
    // SAFETY: descriptor juggling on fd 2 while single-threaded.
    unsafe {
        let orig = libc::dup(2);
        let mut fds = [0; 2];
        if orig < 0 || libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        libc::fcntl(orig, libc::F_SETFD, libc::FD_CLOEXEC);
        if libc::dup2(fds[1], 2) < 0 {
            return None;
        }
        libc::close(fds[1]);
        let reader = std::fs::File::from_raw_fd(fds[0]);
        let _ = std::thread::Builder::new().name("pivot-stderr".into()).spawn(move || {
            let mut r = std::io::BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => on_line(&line, orig),
                }
            }
        });
        Some(orig)
    }
}

pub fn set_sink(sink: Option<Sink>) {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = sink;
}
