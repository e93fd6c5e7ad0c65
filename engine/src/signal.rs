//! Signal dispositions, as the engine, its child and the front ends set them: one place for the
//! `sigaction` boilerplate. Both functions are async-signal-safe (a signal handler may call them).

/// Runs `handler` on `sig`, with SA_RESTART (a blocking read or wait goes on after the handler) and
/// nothing else blocked while it runs.
pub fn install(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction with an empty mask and a handler of the right signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Gives `sig` its default action again.
pub fn reset(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction with an empty mask and SIG_DFL.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}
