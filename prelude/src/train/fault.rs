//! Fault injection for tests of the non-finite guard and of interrupts: a NaN loss, or an
//! interrupt request, at a chosen optimizer step.
//!
//! Kept out of `TrainConfig`: no user setting can turn it on by accident. Two switches:
//! * `PIVOT_INJECT_NAN=STEP` (every rank) or `STEP@RANK` (one rank of a distributed run): what
//!   the torchrun suites set, since torchrun gives every worker the same environment; likewise
//!   `PIVOT_INJECT_INTERRUPT`, which raises the interrupt flag before the last micro-batch of
//!   that step (as a Ctrl-C on that rank alone would), and `PIVOT_INJECT_KILL`, which makes that
//!   rank SIGKILL itself there (a crashed worker: no handler, no cleanup) in the first attempt of
//!   a torchrun job only (`TORCHELASTIC_RESTART_COUNT` unset or 0), so that the attempt torchrun
//!   restarts can finish.
//! * [`inject_nan_at`] (feature `test-hooks`, which the prelude's own tests enable): per thread,
//!   so tests that run side by side in one process do not see each other's fault.

use crate::error::{PivotError, Result};

#[cfg(feature = "test-hooks")]
thread_local! {
    static NAN_AT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Makes the loss of optimizer step `step` (1-based) NaN in runs started on this thread.
#[cfg(feature = "test-hooks")]
pub fn inject_nan_at(step: Option<usize>) {
    NAN_AT.with(|c| c.set(step));
}

/// The step whose loss becomes NaN on rank `rank`, if any.
pub(crate) fn nan_step(rank: usize) -> Result<Option<usize>> {
    #[cfg(feature = "test-hooks")]
    if let Some(step) = NAN_AT.with(|c| c.get()) {
        return Ok(Some(step));
    }
    match std::env::var("PIVOT_INJECT_NAN") {
        Ok(spec) if !spec.trim().is_empty() => parse(&spec, rank),
        _ => Ok(None),
    }
}

/// The step in whose last micro-batch rank `rank` sees an interrupt request, if any.
pub(crate) fn interrupt_step(rank: usize) -> Result<Option<usize>> {
    match std::env::var("PIVOT_INJECT_INTERRUPT") {
        Ok(spec) if !spec.trim().is_empty() => parse_var("PIVOT_INJECT_INTERRUPT", &spec, rank),
        _ => Ok(None),
    }
}

/// The step in whose last micro-batch rank `rank` kills itself, if any (first attempt only).
pub(crate) fn kill_step(rank: usize) -> Result<Option<usize>> {
    let restarted = std::env::var("TORCHELASTIC_RESTART_COUNT").is_ok_and(|c| c.trim() != "0");
    match std::env::var("PIVOT_INJECT_KILL") {
        Ok(spec) if !spec.trim().is_empty() && !restarted => parse_var("PIVOT_INJECT_KILL", &spec, rank),
        _ => Ok(None),
    }
}

/// SIGKILL to this process: the way a worker dies of the OOM killer or a hardware fault.
pub(crate) fn kill_self() -> ! {
    // SAFETY: raise() with a valid signal number; SIGKILL cannot be caught, so it never returns.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
    unreachable!("SIGKILL returned")
}

fn parse(spec: &str, rank: usize) -> Result<Option<usize>> {
    parse_var("PIVOT_INJECT_NAN", spec, rank)
}

fn parse_var(var: &str, spec: &str, rank: usize) -> Result<Option<usize>> {
    let bad = || PivotError::config("environment", var, format!("`{spec}` is not STEP or STEP@RANK"));
    let (step, only) = match spec.trim().split_once('@') {
        Some((s, r)) => (s, Some(r.parse::<usize>().map_err(|_| bad())?)),
        None => (spec.trim(), None),
    };
    let step = step.parse::<usize>().map_err(|_| bad())?;
    Ok((only.is_none_or(|r| r == rank)).then_some(step))
}

#[cfg(test)]
mod tests {
    #[test]
    fn step_and_rank() {
        assert_eq!(super::parse("3", 1).unwrap(), Some(3));
        assert_eq!(super::parse("3@1", 1).unwrap(), Some(3));
        assert_eq!(super::parse("3@1", 0).unwrap(), None);
        assert!(super::parse("x@1", 0).unwrap_err().to_string().contains("PIVOT_INJECT_NAN"));
    }
}
