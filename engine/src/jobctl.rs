//! Job control (Ctrl-Z, `fg`, `bg`) across a spare's adoption.
//!
//! An adopted engine runs in a session of its own (`spare::spawn` calls setsid), so its process
//! group is orphaned: the kernel discards a stop signal sent to it from a terminal or by itself
//! (rustyline's Ctrl-Z is `kill(0, SIGTSTP)`), and Ctrl-Z at an adopted REPL's prompt did nothing.
//! The shell watches the launcher, a thin proxy in the shell's job. So the two stop and continue
//! together, driven from the launcher:
//! - the launcher's SIGTSTP handler (Ctrl-Z while a cell runs, or the engine's request below)
//!   stops the engine's process group with SIGSTOP, which works in any group, then stops itself
//!   as SIGTSTP's default action would, so the shell reports the job stopped;
//! - the launcher's SIGCONT handler (`fg`) continues the engine's group. Continued in the
//!   background (`bg`) with the terminal on its stdin, it stops again as a background job that
//!   reads the terminal would (SIGTTIN) and leaves the engine stopped: the engine would otherwise
//!   read the keys typed at the shell. A launcher without a terminal (a Jupyter kernel) always
//!   continues the engine;
//! - at the prompt the REPL binds Ctrl-Z to [`suspend_with_launcher`]: it asks the launcher to
//!   stop (SIGTSTP) and returns once the launcher's SIGCONT has continued this process.
//!
//! Everything a handler does is async-signal-safe: kill, raise, sigaction, sigprocmask,
//! tcgetpgrp, getpgrp and atomics.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::signal;

/// Launcher side: what its handlers signal (the engine's pid, or minus its process group when
/// the engine leads a group of its own).
static ENGINE_TARGET: AtomicI32 = AtomicI32::new(0);

/// Engine side: the launcher of the current adoption (0 when none).
static LAUNCHER: AtomicI32 = AtomicI32::new(0);
static CONTINUED: AtomicBool = AtomicBool::new(false);
static ON_CONTINUE: Once = Once::new();

extern "C" fn stop_with_engine(_: libc::c_int) {
    let target = ENGINE_TARGET.load(Ordering::SeqCst);
    if target != 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(target, libc::SIGSTOP) };
    }
    // SIGTSTP is blocked while this handler runs: unblock it to take its default action (stop)
    // here, then block it again until the handler returns. Continued (`fg` or `bg`), SIGCONT's
    // handler decides about the engine, and this handler is installed again.
    signal::reset(libc::SIGTSTP);
    // SAFETY: async-signal-safe calls on a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTSTP);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGTSTP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    signal::install(libc::SIGTSTP, stop_with_engine);
}

extern "C" fn continue_engine(_: libc::c_int) {
    // SAFETY: async-signal-safe calls only; errno is restored for the code this interrupted.
    unsafe {
        let errno = *libc::__errno_location();
        let foreground = libc::tcgetpgrp(0);
        if foreground >= 0 && foreground != libc::getpgrp() {
            libc::raise(libc::SIGTTIN);
        } else {
            let target = ENGINE_TARGET.load(Ordering::SeqCst);
            if target != 0 {
                libc::kill(target, libc::SIGCONT);
            }
        }
        *libc::__errno_location() = errno;
    }
}

/// Launcher side: from now on SIGTSTP stops the engine `engine_pid` with this process, and
/// SIGCONT continues it.
pub(crate) fn arm_launcher(engine_pid: i32) {
    // SAFETY: getpgid and getpgrp have no preconditions.
    let (group, own) = unsafe { (libc::getpgid(engine_pid), libc::getpgrp()) };
    // The engine's group holds its evcxr child (and cargo or rustc while they run): stop them all,
    // unless the engine shares this process's group (a spare started without its own session).
    let target = if group == engine_pid && group != own { -engine_pid } else { engine_pid };
    ENGINE_TARGET.store(target, Ordering::SeqCst);
    signal::install(libc::SIGTSTP, stop_with_engine);
    signal::install(libc::SIGCONT, continue_engine);
}

extern "C" fn note_continued(_: libc::c_int) {
    CONTINUED.store(true, Ordering::SeqCst);
}

/// Engine side: the launcher of this adoption (`None` when it is let go).
pub(crate) fn set_launcher(pid: Option<i32>) {
    LAUNCHER.store(pid.unwrap_or(0), Ordering::SeqCst);
}

/// Whether this process is an adopted engine whose Ctrl-Z has to go through its launcher.
pub fn has_launcher() -> bool {
    LAUNCHER.load(Ordering::SeqCst) > 0
}

/// Suspends this adopted engine with its launcher, as Ctrl-Z suspends a process the shell started:
/// asks the launcher to stop, which stops this process too, and returns `true` once `fg` has
/// continued both. `false` when there is no launcher, or it did not stop this process within 2 s.
/// The caller puts the terminal back in the mode the shell expects before, and its own after.
pub fn suspend_with_launcher() -> bool {
    let launcher = LAUNCHER.load(Ordering::SeqCst);
    if launcher <= 0 {
        return false;
    }
    ON_CONTINUE.call_once(|| signal::install(libc::SIGCONT, note_continued));
    CONTINUED.store(false, Ordering::SeqCst);
    // SAFETY: signals the launcher process of this adoption.
    if unsafe { libc::kill(launcher, libc::SIGTSTP) } != 0 {
        return false;
    }
    // The launcher stops this process within milliseconds, and `fg` continues it: SIGCONT's
    // handler may run on another thread a moment after this one resumes, hence the last look.
    let t0 = Instant::now();
    while !CONTINUED.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if !CONTINUED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    CONTINUED.load(Ordering::SeqCst)
}
