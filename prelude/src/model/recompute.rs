//! Activation checkpointing: [`recompute`] runs a layer without keeping its activations for
//! backward and runs it again, with grad on, when backward reaches it (`torch.utils.checkpoint`'s
//! reentrant scheme). A training step then holds each checkpointed layer's input instead of all
//! of its intermediates, for one more forward per layer. tch has no custom autograd function, so
//! the autograd node is a small C++ shim (`csrc/recompute.cpp`); where torch's C++ headers were
//! missing at build time the layer simply runs (same results, no saving).
//!
//! The reentrant scheme back-propagates into the layer's weights from inside backward and
//! returns the gradient of the input: correct whenever the input requires grad. When it does not
//! (everything before the layer frozen) [`recompute`] runs the layer as usual, so weights that
//! require grad never miss their gradient.

use tch::Tensor;

/// `f(x)`, recomputed in backward instead of keeping its activations when grad is on and `x`
/// requires grad. `f` must be deterministic (no dropout: the models here have none) and is kept
/// (with what it captures) until the backward pass has used it.
pub fn recompute<F>(x: &Tensor, f: F) -> Tensor
where
    F: Fn(&Tensor) -> Tensor + Send + 'static,
{
    if !x.requires_grad() {
        return f(x);
    }
    shim::recompute(x, f)
}

#[cfg(pivot_recompute)]
mod shim {
    use std::ffi::{c_char, c_void};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use tch::Tensor;
    use torch_sys::C_tensor;

    type Closure = Box<dyn Fn(&Tensor) -> Tensor + Send>;
    type Call = extern "C" fn(*mut c_void, *mut C_tensor) -> *mut C_tensor;
    type Drop = extern "C" fn(*mut c_void);

    unsafe extern "C" {
        // csrc/recompute.cpp: NULL or a malloc'ed error message; owns the closure from the call on.
        fn pivot_recompute(x: *const C_tensor, closure: *mut c_void, call: Call, drop: Drop, out: *mut *mut C_tensor) -> *mut c_char;
    }

    extern "C" fn call(closure: *mut c_void, input: *mut C_tensor) -> *mut C_tensor {
        // SAFETY: `closure` is the Box made in `recompute`, alive until `drop`; `input` is a new
        // `at::Tensor*` that we own (tch frees it with the Tensor).
        let (f, x) = unsafe { (&*(closure as *const Closure), Tensor::from_ptr(input)) };
        // A panic must not unwind into C++: report it as NULL (the shim turns that into an error).
        match catch_unwind(AssertUnwindSafe(|| f(&x))) {
            Ok(mut y) => {
                let p = y.as_mut_ptr();
                // The C++ side takes this `at::Tensor*` over and deletes it.
                std::mem::forget(y);
                p
            }
            Err(_) => std::ptr::null_mut(),
        }
    }

    extern "C" fn drop_closure(closure: *mut c_void) {
        // SAFETY: the pointer from `Box::into_raw` in `recompute`, dropped once (by the capsule).
        drop(unsafe { Box::from_raw(closure as *mut Closure) });
    }

    pub(super) fn recompute<F>(x: &Tensor, f: F) -> Tensor
    where
        F: Fn(&Tensor) -> Tensor + Send + 'static,
    {
        let closure: *mut Closure = Box::into_raw(Box::new(Box::new(f)));
        let mut out = std::ptr::null_mut();
        // SAFETY: a live tensor borrowed for the call; the shim owns the closure from here on.
        let err = unsafe { pivot_recompute(x.as_ptr(), closure.cast(), call, drop_closure, &mut out) };
        if !err.is_null() {
            // SAFETY: a NUL-terminated string from strdup, freed once here.
            let msg = unsafe {
                let m = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
                libc::free(err.cast());
                m
            };
            // The forward of a layer failed: as when the layer itself panics without the shim.
            panic!("{msg}");
        }
        // SAFETY: a new `at::Tensor*` from the shim, owned from here on.
        unsafe { Tensor::from_ptr(out) }
    }
}

#[cfg(not(pivot_recompute))]
mod shim {
    use tch::Tensor;

    pub(super) fn recompute<F: Fn(&Tensor) -> Tensor>(x: &Tensor, f: F) -> Tensor {
        f(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A two-matmul "layer" with weights that require grad: the same loss and the same gradients
    /// (weights and input) with and without recomputation, also through two stacked layers.
    #[test]
    fn gradients_equal_without_recompute() {
        tch::manual_seed(0);
        let w1 = Tensor::randn([8, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w2 = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x0 = Tensor::randn([4, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let layer = || {
            let (w1, w2) = (w1.shallow_clone(), w2.shallow_clone());
            move |x: &Tensor| x + x.matmul(&w1).tanh().matmul(&w2)
        };
        let run = |checkpointed: bool| {
            for t in [&w1, &w2, &x0] {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let h = if checkpointed { recompute(&x0, layer()) } else { layer()(&x0) };
            let y = if checkpointed { recompute(&h, layer()) } else { layer()(&h) };
            let loss = y.square().sum(Kind::Float);
            loss.backward();
            (loss.double_value(&[]), w1.grad().copy(), w2.grad().copy(), x0.grad().copy())
        };
        let (plain, ck) = (run(false), run(true));
        assert_eq!(plain.0, ck.0);
        for (a, b, what) in [(&plain.1, &ck.1, "w1"), (&plain.2, &ck.2, "w2"), (&plain.3, &ck.3, "input")] {
            assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{what}: no gradient");
            assert!(a.equal(b), "{what}: gradients differ with recomputation");
        }
    }

    /// The layer runs once in forward (without a graph) and once more in backward.
    #[cfg(pivot_recompute)]
    #[test]
    fn the_layer_runs_again_in_backward_and_only_under_grad() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let w = Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let calls = Arc::new(AtomicUsize::new(0));
        let (wc, n) = (w.shallow_clone(), calls.clone());
        let y = recompute(&x, move |x| {
            n.fetch_add(1, Ordering::SeqCst);
            x.matmul(&wc).relu()
        });
        assert!(y.requires_grad());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        y.sum(Kind::Float).backward();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "backward did not recompute the layer");
        assert!(w.grad().defined() && x.grad().defined());
        // Under no_grad no node is made and nothing is kept.
        let z = tch::no_grad(|| recompute(&x, move |x| x * 2.0));
        assert!(!z.requires_grad());
    }
}
