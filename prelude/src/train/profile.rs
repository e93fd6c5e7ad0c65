//! Opt-in phase timing of trainer steps: where a step's time goes.
//!
//! Off unless `PIVOT_PROFILE_STEPS=1`. A step is timed while a [`StepTimer`] lives: the loop
//! creates one per optimizer step and [`mark`] (callable from objectives, which do not hold the
//! timer) ends a phase only inside it, so a step cut short by an error or interrupt leaves no
//! open phase behind for the next run. Each mark first waits for the device to finish its
//! queued work, so a phase's time is the wall time of work done in it rather than of kernels
//! launched in it; that wait costs a little overlap, which is why it is opt-in.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;
use tch::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PIVOT_PROFILE_STEPS").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// The start of the open phase (`None` outside a step) and every phase's recorded seconds.
type State = (Option<Instant>, Vec<(&'static str, Vec<f64>)>);

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new((None, Vec::new())) };
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Times one optimizer step on this thread from creation to drop.
pub(crate) struct StepTimer {
    device: Device,
}

impl StepTimer {
    pub(crate) fn start(device: Device) -> StepTimer {
        if enabled() {
            sync(device);
            STATE.with(|s| s.borrow_mut().0 = Some(Instant::now()));
        }
        StepTimer { device }
    }

    /// Ends phase `name` (see [`mark`]).
    pub(crate) fn mark(&self, name: &'static str) {
        mark(name, self.device);
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        if enabled() {
            STATE.with(|s| s.borrow_mut().0 = None);
        }
    }
}

/// Ends phase `name` (it began at the previous mark or when the step's timer started); outside
/// a step, or with profiling off, it does nothing.
pub(crate) fn mark(name: &'static str, device: Device) {
    if !enabled() || STATE.with(|s| s.borrow().0.is_none()) {
        return;
    }
    sync(device);
    let now = Instant::now();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(t0) = s.0.replace(now) else { return };
        let secs = (now - t0).as_secs_f64();
        match s.1.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(secs),
            None => s.1.push((name, vec![secs])),
        }
    });
}

/// Every phase timed on this thread since the last call, in first-seen order, with each
/// occurrence's seconds; empty unless `PIVOT_PROFILE_STEPS=1`. Clears the record.
pub fn take_step_profile() -> Vec<(String, Vec<f64>)> {
    STATE.with(|s| std::mem::take(&mut s.borrow_mut().1).into_iter().map(|(n, v)| (n.to_string(), v)).collect())
}
