//! Full-batch L-BFGS with a strong-Wolfe line search on a flat f64 parameter tensor.
//!
//! A transcription of the algorithm in `torch.optim.LBFGS` (Nocedal & Wright, alg. 7.4 + 3.5/3.6),
//! because tch exposes no L-BFGS. Everything stays on the parameter's device; only scalars (dot
//! products, losses) come back to the host to drive the control flow.

use tch::Tensor;

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

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.dot(b).double_value(&[])
}

fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
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

struct Point {
    t: f64,
    f: f64,
    g: Tensor,
    gtd: f64,
}

impl Point {
    fn copy(&self) -> Point {
        Point { t: self.t, f: self.f, g: self.g.shallow_clone(), gtd: self.gtd }
    }
}

/// Strong-Wolfe line search along `d` from `x`; returns (f, g, t, evaluations).
fn strong_wolfe<F: FnMut(&Tensor) -> (f64, Tensor)>(
    obj: &mut F,
    x: &Tensor,
    t0: f64,
    d: &Tensor,
    f: f64,
    g: &Tensor,
    gtd: f64,
    tolerance_change: f64,
) -> (f64, Tensor, f64, usize) {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const MAX_LS: usize = 25;
    let d_norm = max_abs(d);
    let mut eval = |t: f64| {
        let (f, g) = obj(&(x + d * t));
        let gtd = dot(&g, d);
        Point { t, f, g, gtd }
    };
    let mut t = t0;
    let mut new = eval(t);
    let mut evals = 1;
    let mut prev = Point { t: 0.0, f, g: g.shallow_clone(), gtd };
    let mut ls_iter = 0;
    let mut done = false;
    let mut bracket: Vec<Point>;
    loop {
        if ls_iter >= MAX_LS {
            bracket = vec![Point { t: 0.0, f, g: g.shallow_clone(), gtd }, new];
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
        let tmp = t;
        t = cubic_interpolate(prev.t, prev.f, prev.gtd, t, new.f, new.gtd, Some((min_step, max_step)));
        prev = new;
        prev.t = tmp;
        new = eval(t);
        evals += 1;
        ls_iter += 1;
    }
    if bracket.len() == 1 {
        let p = bracket.pop().unwrap();
        return (p.f, p.g, p.t, evals);
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
    let p = bracket.swap_remove(lo);
    (p.f, p.g, p.t, evals)
}

/// Minimises `obj` (returning f and ∇f at a point) from `x0`; returns the minimiser and a summary.
pub fn minimize<F: FnMut(&Tensor) -> (f64, Tensor)>(mut obj: F, x0: &Tensor, opt: LbfgsOptions) -> (Tensor, LbfgsInfo) {
    let mut x = x0.detach().copy();
    let (mut loss, mut g) = obj(&x);
    let mut evals = 1;
    let mut grad_max = max_abs(&g);
    let info = |iterations, evaluations, loss, grad_max, converged| LbfgsInfo { iterations, evaluations, loss, grad_max, converged };
    if grad_max <= opt.tolerance_grad {
        return (x, info(0, evals, loss, grad_max, true));
    }
    let mut old_dirs: Vec<Tensor> = Vec::new();
    let mut old_stps: Vec<Tensor> = Vec::new();
    let mut ro: Vec<f64> = Vec::new();
    let mut h_diag = 1.0;
    let mut d = -&g;
    let mut t = 0.0;
    let mut prev_g = g.shallow_clone();
    let mut n_iter = 0;
    let mut converged = false;
    while n_iter < opt.max_iter {
        n_iter += 1;
        if n_iter > 1 {
            let y = &g - &prev_g;
            let s = &d * t;
            let ys = dot(&y, &s);
            // Curvature pairs with ys ≤ 0 would make the implicit Hessian indefinite.
            if ys > 1e-10 {
                if old_dirs.len() == opt.history_size {
                    drop(old_dirs.remove(0));
                    drop(old_stps.remove(0));
                    ro.remove(0);
                }
                h_diag = ys / dot(&y, &y);
                old_dirs.push(y);
                old_stps.push(s);
                ro.push(1.0 / ys);
            }
            // Two-loop recursion.
            let mut q = -&g;
            let mut al = vec![0.0; old_dirs.len()];
            for i in (0..old_dirs.len()).rev() {
                al[i] = dot(&old_stps[i], &q) * ro[i];
                q = q - &old_dirs[i] * al[i];
            }
            let mut r = q * h_diag;
            for i in 0..old_dirs.len() {
                let be_i = dot(&old_dirs[i], &r) * ro[i];
                r = r + &old_stps[i] * (al[i] - be_i);
            }
            d = r;
        }
        prev_g = g.shallow_clone();
        let prev_loss = loss;
        t = if n_iter == 1 { (1.0 / g.abs().sum(tch::Kind::Double).double_value(&[])).min(1.0) } else { 1.0 };
        let gtd = dot(&g, &d);
        if gtd > -opt.tolerance_change {
            converged = true;
            break;
        }
        let (f_new, g_new, t_new, ls_evals) = strong_wolfe(&mut obj, &x, t, &d, loss, &g, gtd, opt.tolerance_change);
        t = t_new;
        x = &x + &d * t;
        loss = f_new;
        g = g_new;
        evals += ls_evals;
        grad_max = max_abs(&g);
        if grad_max <= opt.tolerance_grad {
            converged = true;
            break;
        }
        if evals >= opt.max_eval {
            break;
        }
        if max_abs(&d) * t.abs() <= opt.tolerance_change
            || (loss - prev_loss).abs() <= opt.tolerance_change * loss.abs().max(prev_loss.abs()).max(1.0)
        {
            converged = true;
            break;
        }
    }
    (x, info(n_iter, evals, loss, grad_max, converged))
}
