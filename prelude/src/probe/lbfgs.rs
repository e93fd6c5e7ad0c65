//! Full-batch L-BFGS with a strong-Wolfe line search on a flat f64 parameter tensor.
//!
//! A transcription of the algorithm in `torch.optim.LBFGS` (Nocedal & Wright, alg. 7.4 + 3.5/3.6),
//! because tch exposes no L-BFGS. Everything stays on the parameter's device, the scalars of the
//! two-loop recursion (ρ-scaled dot products α, β) included: the host only sees what drives the
//! control flow, and sees it in one transfer per function evaluation. Each evaluation at a trial
//! step `t` queues, behind the objective, its directional derivative `∇f·d`, `max|∇f|` and the
//! curvature pair's `yᵀs`, `yᵀy` (`s = t·d`, `y = ∇f − ∇f_prev`), and the first trial of an
//! iteration also carries `∇f_prev·d` and `max|d|`; the line search, the convergence tests and
//! the curvature-pair acceptance then read host copies. On a GPU the dozens of small kernels of
//! an iteration are thus queued back to back instead of each waiting for the host.
//!
//! Consequence of the single transfer: the first trial step of an iteration is evaluated before
//! the descent test `∇f·d < −tolerance_change` is known, so when that test ends the run the
//! objective has been called once more than [`LbfgsInfo::evaluations`] counts (that evaluation
//! is discarded; the result is the same as without it).
//!
//! Interrupt: each iteration starts with [`check_interrupt`], so a fit stops within one
//! iteration (its line search included) of a Jupyter interrupt or Ctrl-C and returns
//! `PivotError::Interrupted`; the starting point `x0` is never written to.

use std::cell::Cell;
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::runtime::check_interrupt;

/// Stopping rules and memory of [`minimize`].
#[derive(Debug, Clone, Copy)]
pub struct LbfgsOptions {
    pub max_iter: usize,
    /// Maximal function evaluations (line-search evaluations included); default 1.25 × max_iter.
    pub max_eval: usize,
    /// Stop when max |∇f| falls below this.
    pub tolerance_grad: f64,
    /// Stop when a step or the change of f (relative to max(|f|, 1)) falls below this.
    pub tolerance_change: f64,
    pub history_size: usize,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        LbfgsOptions { max_iter: 1000, max_eval: 1250, tolerance_grad: 1e-7, tolerance_change: 1e-12, history_size: 10 }
    }
}

/// What happened during a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbfgsInfo {
    pub iterations: usize,
    pub evaluations: usize,
    pub loss: f64,
    pub grad_max: f64,
    pub converged: bool,
}

thread_local! {
    static TRANSFERS: Cell<u64> = const { Cell::new(0) };
}

/// How many device→host transfers (each one a device synchronisation on a GPU) the L-BFGS
/// driver has made on the calling thread so far; a diagnostic for tests and benchmarks (take
/// the difference around a call). Transfers made by the objective itself are not counted.
pub fn host_transfers() -> u64 {
    TRANSFERS.with(|c| c.get())
}

/// Brings 0-d tensors (same device) to the host in one transfer.
fn fetch(scalars: &[&Tensor]) -> Vec<f64> {
    TRANSFERS.with(|c| c.set(c.get() + 1));
    Vec::<f64>::try_from(&Tensor::stack(scalars, 0)).expect("L-BFGS: scalars to host")
}

/// max |a| as a 0-d tensor on a's device.
fn max_abs(a: &Tensor) -> Tensor {
    a.abs().max()
}

fn cubic_interpolate(x1: f64, f1: f64, g1: f64, x2: f64, f2: f64, g2: f64, bounds: Option<(f64, f64)>) -> f64 {
    let (lo, hi) = bounds.unwrap_or(if x1 <= x2 { (x1, x2) } else { (x2, x1) });
    let d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2);
    let d2_sq = d1 * d1 - g1 * g2;
    if d2_sq >= 0.0 {
        let d2 = d2_sq.sqrt();
        let min_pos = if x1 <= x2 {
            x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
        } else {
            x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
        };
        // NaN (degenerate bracket) falls back to bisection rather than poisoning the step.
        if min_pos.is_nan() { (lo + hi) / 2.0 } else { min_pos.clamp(lo, hi) }
    } else {
        (lo + hi) / 2.0
    }
}

/// A point of the line search `x + t·d` with the host copies of its scalars.
struct Point {
    t: f64,
    f: f64,
    gtd: f64,
    /// max |∇f| here.
    gmax: f64,
    /// yᵀs and yᵀy of the curvature pair this point would give (0 at t = 0).
    ys: f64,
    yy: f64,
    x: Tensor,
    g: Tensor,
    /// (y, s) on the device; None at t = 0.
    pair: Option<(Tensor, Tensor)>,
}

impl Point {
    fn copy(&self) -> Point {
        Point {
            x: self.x.shallow_clone(),
            g: self.g.shallow_clone(),
            pair: self.pair.as_ref().map(|(y, s)| (y.shallow_clone(), s.shallow_clone())),
            ..*self
        }
    }
}

/// Evaluates `obj` at `x + t·d` and reads its scalars (with `extra` 0-d tensors queued before)
/// in one transfer; returns the point and the host values of `extra`.
fn evaluate<F: FnMut(&Tensor) -> (Tensor, Tensor)>(
    obj: &mut F,
    x: &Tensor,
    d: &Tensor,
    g: &Tensor,
    t: f64,
    extra: &[&Tensor],
) -> (Point, Vec<f64>) {
    let s = d * t;
    let xt = x + &s;
    let (f, gt) = obj(&xt);
    let f = f.to_kind(Kind::Double).reshape(Vec::<i64>::new());
    let y = &gt - g;
    let (gtd, gmax, ys, yy) = (gt.dot(d), max_abs(&gt), y.dot(&s), y.dot(&y));
    let mut all: Vec<&Tensor> = extra.to_vec();
    all.extend([&f, &gtd, &gmax, &ys, &yy]);
    let mut v = fetch(&all);
    let p = v.split_off(extra.len());
    (Point { t, f: p[0], gtd: p[1], gmax: p[2], ys: p[3], yy: p[4], x: xt, g: gt, pair: Some((y, s)) }, v)
}

/// Strong-Wolfe line search from `start` (t = 0) whose first trial `first` is already evaluated;
/// `eval(t)` evaluates further trials. Returns the accepted point and the evaluations made.
fn strong_wolfe(
    eval: &mut dyn FnMut(f64) -> Point,
    start: Point,
    first: Point,
    d_norm: f64,
    tolerance_change: f64,
) -> (Point, usize) {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const MAX_LS: usize = 25;
    let (f, gtd) = (start.f, start.gtd);
    let mut t = first.t;
    let mut new = first;
    let mut evals = 1;
    let mut prev = start.copy();
    let mut ls_iter = 0;
    let mut done = false;
    let mut bracket: Vec<Point>;
    loop {
        if ls_iter >= MAX_LS {
            bracket = vec![start, new];
            break;
        }
        if new.f > f + C1 * t * gtd || (ls_iter > 1 && new.f >= prev.f) {
            bracket = vec![prev, new];
            break;
        }
        if new.gtd.abs() <= -C2 * gtd {
            bracket = vec![new];
            done = true;
            break;
        }
        if new.gtd >= 0.0 {
            bracket = vec![prev, new];
            break;
        }
        let (min_step, max_step) = (t + 0.01 * (t - prev.t), t * 10.0);
        t = cubic_interpolate(prev.t, prev.f, prev.gtd, t, new.f, new.gtd, Some((min_step, max_step)));
        prev = new;
        new = eval(t);
        evals += 1;
        ls_iter += 1;
    }
    if bracket.len() == 1 {
        return (bracket.pop().unwrap(), evals);
    }

    // Zoom phase: shrink the bracket until the strong-Wolfe conditions hold.
    let mut insuf_progress = false;
    let order = |b: &[Point]| if b[0].f <= b[1].f { (0, 1) } else { (1, 0) };
    let (mut lo, mut hi) = order(&bracket);
    while !done && ls_iter < MAX_LS {
        let (bmin, bmax) = (bracket[0].t.min(bracket[1].t), bracket[0].t.max(bracket[1].t));
        if (bmax - bmin) * d_norm < tolerance_change {
            break;
        }
        let (b0, b1) = (&bracket[0], &bracket[1]);
        t = cubic_interpolate(b0.t, b0.f, b0.gtd, b1.t, b1.f, b1.gtd, None);
        // Keep the trial point away from the bracket ends, else the zoom can stall.
        let eps = 0.1 * (bmax - bmin);
        if (bmax - t).min(t - bmin) < eps {
            if insuf_progress || t >= bmax || t <= bmin {
                t = if (t - bmax).abs() < (t - bmin).abs() { bmax - eps } else { bmin + eps };
                insuf_progress = false;
            } else {
                insuf_progress = true;
            }
        } else {
            insuf_progress = false;
        }
        let p = eval(t);
        evals += 1;
        ls_iter += 1;
        if p.f > f + C1 * t * gtd || p.f >= bracket[lo].f {
            bracket[hi] = p;
            (lo, hi) = order(&bracket);
        } else {
            if p.gtd.abs() <= -C2 * gtd {
                done = true;
            } else if p.gtd * (bracket[hi].t - bracket[lo].t) >= 0.0 {
                bracket[hi] = bracket[lo].copy();
            }
            bracket[lo] = p;
        }
    }
    (bracket.swap_remove(lo), evals)
}

/// Minimises `obj` (returning f and ∇f at a point) from `x0`; returns the minimiser and a summary,
/// or `PivotError::Interrupted` when the user interrupts the run.
///
/// Host-scalar form of [`minimize_device`]: `obj` hands f back as an `f64`, which costs it a
/// device synchronisation per evaluation on a GPU; prefer [`minimize_device`] there.
pub fn minimize<F: FnMut(&Tensor) -> (f64, Tensor)>(mut obj: F, x0: &Tensor, opt: LbfgsOptions) -> Result<(Tensor, LbfgsInfo)> {
    let dev = x0.device();
    minimize_device(
        move |x: &Tensor| {
            let (f, g) = obj(x);
            (Tensor::full(Vec::<i64>::new(), f, (Kind::Double, dev)), g)
        },
        x0,
        opt,
    )
}

/// Minimises `obj` from `x0`, where `obj` returns f as a 0-d float64 tensor on the parameter's
/// device (no host round-trip inside the objective) and ∇f; returns the minimiser and a summary,
/// or `PivotError::Interrupted` when the user interrupts the run (checked once per iteration).
///
/// Host transfers: one per function evaluation, the one at `x0` included, plus one when the run
/// ends on the descent test after a speculative first trial (see the module docs);
/// [`host_transfers`] counts them.
pub fn minimize_device<F: FnMut(&Tensor) -> (Tensor, Tensor)>(
    mut obj: F,
    x0: &Tensor,
    opt: LbfgsOptions,
) -> Result<(Tensor, LbfgsInfo)> {
    let mut x = x0.detach().copy();
    let (f0, mut g) = obj(&x);
    let f0 = f0.to_kind(Kind::Double).reshape(Vec::<i64>::new());
    let v = fetch(&[&f0, &max_abs(&g), &g.abs().sum(Kind::Double)]);
    let (mut loss, mut grad_max, g_l1) = (v[0], v[1], v[2]);
    let mut evals = 1;
    let info = |iterations, evaluations, loss, grad_max, converged| LbfgsInfo { iterations, evaluations, loss, grad_max, converged };
    if grad_max <= opt.tolerance_grad {
        return Ok((x, info(0, evals, loss, grad_max, true)));
    }
    // Curvature pairs (y, s, 1/yᵀs), oldest first.
    let mut history: std::collections::VecDeque<(Tensor, Tensor, f64)> = std::collections::VecDeque::new();
    let mut h_diag = 1.0;
    let mut d = -&g;
    // The last accepted point's curvature pair with its yᵀs and yᵀy.
    let mut pair: Option<(Tensor, Tensor, f64, f64)> = None;
    let mut n_iter = 0;
    let mut converged = false;
    while n_iter < opt.max_iter {
        check_interrupt(&format!("L-BFGS iteration {} (loss {loss:.6e})", n_iter + 1))?;
        n_iter += 1;
        if n_iter > 1 {
            // Curvature pairs with ys ≤ 0 would make the implicit Hessian indefinite.
            if let Some((y, s, ys, yy)) = pair.take().filter(|p| p.2 > 1e-10) {
                if history.len() >= opt.history_size {
                    history.pop_front();
                }
                h_diag = ys / yy;
                if opt.history_size > 0 {
                    history.push_back((y, s, 1.0 / ys));
                }
            }
            // Two-loop recursion with the step scalars kept on the device: nal[i] = −αᵢ,
            // q ← q − αᵢ·yᵢ, r ← r + (αᵢ − βᵢ)·sᵢ with αᵢ − βᵢ = (−βᵢ) − (−αᵢ).
            let mut q = -&g;
            let mut nal: Vec<Tensor> = Vec::with_capacity(history.len());
            for (y, s, ro) in history.iter().rev() {
                let a = s.dot(&q) * (-ro);
                q = q.addcmul(y, &a);
                nal.push(a);
            }
            let mut r = q * h_diag;
            for ((y, s, ro), a) in history.iter().zip(nal.iter().rev()) {
                let nbe = y.dot(&r) * (-ro);
                r = r.addcmul(s, &(nbe - a));
            }
            d = r;
        }
        let t0 = if n_iter == 1 { (1.0 / g_l1).min(1.0) } else { 1.0 };
        // The first trial goes with g·d and max|d| in one transfer.
        let (gtd_t, d_norm_t) = (g.dot(&d), max_abs(&d));
        let (first, v) = evaluate(&mut obj, &x, &d, &g, t0, &[&gtd_t, &d_norm_t]);
        let (gtd, d_norm) = (v[0], v[1]);
        if gtd > -opt.tolerance_change {
            converged = true;
            break;
        }
        let start = Point {
            t: 0.0,
            f: loss,
            gtd,
            gmax: grad_max,
            ys: 0.0,
            yy: 0.0,
            x: x.shallow_clone(),
            g: g.shallow_clone(),
            pair: None,
        };
        let (p, ls_evals) = {
            let (x, d, g) = (&x, &d, &g);
            let mut eval = |t: f64| evaluate(&mut obj, x, d, g, t, &[]).0;
            strong_wolfe(&mut eval, start, first, d_norm, opt.tolerance_change)
        };
        let prev_loss = loss;
        let t = p.t;
        x = p.x;
        loss = p.f;
        g = p.g;
        grad_max = p.gmax;
        pair = p.pair.map(|(y, s)| (y, s, p.ys, p.yy));
        evals += ls_evals;
        if grad_max <= opt.tolerance_grad {
            converged = true;
            break;
        }
        if evals >= opt.max_eval {
            break;
        }
        if d_norm * t.abs() <= opt.tolerance_change
            || (loss - prev_loss).abs() <= opt.tolerance_change * loss.abs().max(prev_loss.abs()).max(1.0)
        {
            converged = true;
            break;
        }
    }
    Ok((x, info(n_iter, evals, loss, grad_max, converged)))
}
