//! Multinomial L2-regularised logistic regression fitted by full-batch L-BFGS.
//!
//! The two matrix products of each evaluation run in the features' precision, as scikit-learn does
//! (it keeps float32 input in float32): float32 features (or narrower) give float32 products, which
//! on CPU take about half the time of float64 ones (MKL, N=5000, D=384, K=50: 10 against 19 ms per
//! evaluation). Everything else (softmax, cross-entropy, sums, the L-BFGS state) is float64; pass
//! float64 features for float64 products throughout.

use super::lbfgs::{self, LbfgsInfo, LbfgsOptions};
use crate::error::{PivotError, Result};
use tch::{Device, Kind, Tensor};

/// scikit-learn's `LogisticRegression(solver="lbfgs")` objective
/// `C·Σᵢ CE(xᵢ, yᵢ) + ½‖W‖²` (intercept unpenalised, one weight row per class).
/// We minimise the same objective divided by `C·n` (mean CE + ‖W‖²/(2Cn)), exactly what sklearn's
/// `LinearModelLoss` does: the scale keeps gradient tolerances meaningful across data set sizes.
#[derive(Debug)]
pub struct LogisticRegression {
    /// [K, D] float64 on the training device.
    pub weight: Tensor,
    /// [K] float64.
    pub bias: Tensor,
    pub c: f64,
    pub info: LbfgsInfo,
    pub options: LbfgsOptions,
}

impl Clone for LogisticRegression {
    fn clone(&self) -> Self {
        LogisticRegression { weight: self.weight.copy(), bias: self.bias.copy(), ..*self }
    }
}

pub(crate) fn check_xy(x: &Tensor, y: &Tensor, what: &str) -> Result<(i64, i64)> {
    let xs = x.size();
    let ys = y.size();
    if xs.len() != 2 || ys.len() != 1 || xs[0] != ys[0] {
        return Err(PivotError::invalid(format!(
            "{what}: expected features [N, D] and labels [N], got {xs:?} and {ys:?}"
        )));
    }
    if xs[0] == 0 {
        return Err(PivotError::invalid(format!("{what}: empty data set")));
    }
    if !matches!(y.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Err(PivotError::invalid(format!("{what}: labels must be integer class ids, got {:?}", y.kind())));
    }
    Ok((xs[0], xs[1]))
}

/// The scaled objective `mean CE + ‖W‖²/(2Cn)` and its closed-form gradient (autograd would double
/// the work for a model this simple) on the flat parameters θ = [vec(W); b], W [K, D] row-major.
///
/// Scores are computed class-major, Sᵀ = W·Xᵀ + b [K, N] (on CPU, MKL's GEMM ran about a third
/// faster in this layout than X·Wᵀ at N=5000, D=384, K=50). One log-softmax pass over the classes
/// gives the CE (gather at the labels) and, exponentiated in place, the probabilities P;
/// subtracting 1 at the labels gives n·∂CE/∂Sᵀ = P − Y, whence ∇W = (P − Y)·X / n + W/(Cn) and
/// ∇b = (P − Y)·1 / n. Nothing of size N×K is made besides the scores.
struct Objective {
    /// [N, D] in the products' precision: float32 or float64.
    x: Tensor,
    /// Labels as a [1, N] int64 index (one row: the class of each column of Sᵀ).
    labels: Tensor,
    /// −1 at every label, [1, N] float64: scattered into the probabilities to subtract Y.
    minus_one: Tensor,
    n: f64,
    k: i64,
    d: i64,
    /// 1/(Cn).
    reg: f64,
}

impl Objective {
    /// `x` [N, D] and `y` [N] int64 on the same device, labels in 0..k.
    fn new(x: &Tensor, y: &Tensor, k: i64, c: f64) -> Self {
        let (n, d) = (x.size()[0], x.size()[1]);
        Objective {
            x: x.to_kind(product_kind(x.kind())),
            labels: y.reshape([1, n]),
            minus_one: Tensor::full([1, n], -1.0, (Kind::Double, x.device())),
            n: n as f64,
            k,
            d,
            reg: 1.0 / (c * n as f64),
        }
    }

    /// (objective as a 0-d tensor, flat gradient) at θ; nothing is read back to the host.
    fn eval(&self, theta: &Tensor) -> (Tensor, Tensor) {
        let wlen = self.k * self.d;
        let w_flat = theta.narrow(0, 0, wlen);
        let w = w_flat.view([self.k, self.d]);
        let b = theta.narrow(0, wlen, self.k);
        let pk = self.x.kind();
        let logp = if pk == Kind::Double {
            b.unsqueeze(1).addmm(&w, &self.x.tr())
        } else {
            w.to_kind(pk).mm(&self.x.tr()).to_kind(Kind::Double) + b.unsqueeze(1)
        }
        .log_softmax(0, Kind::Double);
        let ce = logp.gather(0, &self.labels, false).sum(Kind::Double) / -self.n;
        let loss = ce + w_flat.dot(&w_flat) * (0.5 * self.reg);
        // logp is not needed any more: it becomes P − Y in place.
        let mut p = logp;
        let _ = p.exp_();
        let _ = p.scatter_add_(0, &self.labels, &self.minus_one);
        let gw = if pk == Kind::Double { p.mm(&self.x) } else { p.to_kind(pk).mm(&self.x).to_kind(Kind::Double) };
        let mut grad = Tensor::cat(&[gw.view([-1]), p.sum_dim_intlist(1, false, Kind::Double)], 0);
        let _ = grad.divide_scalar_(self.n);
        let _ = grad.narrow(0, 0, wlen).g_add_(&(&w_flat * self.reg));
        (loss, grad)
    }
}

/// The precision of the objective's matrix products for features of kind `k`: float32 for float32
/// and narrower floats, float64 otherwise.
pub(crate) fn product_kind(k: Kind) -> Kind {
    if matches!(k, Kind::Float | Kind::Half | Kind::BFloat16) { Kind::Float } else { Kind::Double }
}

impl LogisticRegression {
    /// The (scaled) training objective and its gradient with respect to (weight [K, D], bias [K])
    /// at the current weights, by the closed form `fit` minimises (no host round-trip but the
    /// objective's value). Labels must lie in 0..num_classes.
    pub fn objective_and_gradient(&self, x: &Tensor, y: &Tensor) -> Result<(f64, Tensor, Tensor)> {
        check_xy(x, y, "LogisticRegression::objective_and_gradient")?;
        let (k, d) = (self.weight.size()[0], self.weight.size()[1]);
        let dev = self.device();
        let y = y.to_device(dev).to_kind(Kind::Int64);
        if y.min().int64_value(&[]) < 0 || y.max().int64_value(&[]) >= k {
            return Err(PivotError::invalid(format!("LogisticRegression::objective_and_gradient: labels must lie in 0..{k}")));
        }
        let x = x.to_device(dev);
        if x.size()[1] != d {
            return Err(PivotError::invalid(format!(
                "LogisticRegression::objective_and_gradient: features have {} columns, the model {d}",
                x.size()[1]
            )));
        }
        let theta = Tensor::cat(&[self.weight.reshape([-1]), self.bias.shallow_clone()], 0).to_kind(Kind::Double);
        let (loss, grad) = tch::no_grad(|| Objective::new(&x, &y, k, self.c).eval(&theta));
        Ok((loss.double_value(&[]), grad.narrow(0, 0, k * d).view([k, d]), grad.narrow(0, k * d, k)))
    }

    /// Fits with default L-BFGS options (max_iter 1000, as the CLIP/PIVOT protocol sets).
    pub fn fit(x: &Tensor, y: &Tensor, c: f64) -> Result<Self> {
        Self::fit_with(x, y, c, LbfgsOptions::default(), None, None)
    }

    /// Fits with explicit options; `num_classes` defaults to max(y)+1; `warm` starts from a previous
    /// solution (used by the C sweep: neighbouring C values have close optima).
    pub fn fit_with(
        x: &Tensor,
        y: &Tensor,
        c: f64,
        options: LbfgsOptions,
        num_classes: Option<i64>,
        warm: Option<&LogisticRegression>,
    ) -> Result<Self> {
        let (_, d) = check_xy(x, y, "LogisticRegression::fit")?;
        if !(c > 0.0 && c.is_finite()) {
            return Err(PivotError::invalid(format!("LogisticRegression::fit: C must be positive and finite, got {c}")));
        }
        let dev = x.device();
        let y = y.to_device(dev).to_kind(Kind::Int64);
        let k = num_classes.unwrap_or_else(|| y.max().int64_value(&[]) + 1);
        if y.min().int64_value(&[]) < 0 || y.max().int64_value(&[]) >= k {
            return Err(PivotError::invalid(format!("LogisticRegression::fit: labels must lie in 0..{k}")));
        }
        let problem = Objective::new(x, &y, k, c);
        let wlen = k * d;
        let theta0 = match warm {
            Some(m) if m.weight.size() == [k, d] => {
                Tensor::cat(&[m.weight.to_device(dev).reshape([-1]), m.bias.to_device(dev)], 0).to_kind(Kind::Double)
            }
            _ => Tensor::zeros([wlen + k], (Kind::Double, dev)),
        };
        // An interrupt ends the fit here with `Interrupted`; `warm` and the data are untouched.
        let (theta, info) = tch::no_grad(|| lbfgs::minimize_device(|theta| problem.eval(theta), &theta0, options))?;
        if !info.loss.is_finite() {
            return Err(PivotError::NonFinite { what: "logistic-regression loss".into(), step: info.iterations, last_good: 0 });
        }
        Ok(LogisticRegression {
            weight: theta.narrow(0, 0, wlen).view([k, d]).copy(),
            bias: theta.narrow(0, wlen, k).copy(),
            c,
            info,
            options,
        })
    }

    pub fn num_classes(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn device(&self) -> Device {
        self.weight.device()
    }

    /// Raw scores x·Wᵀ + b, [N, K] float64.
    pub fn decision_function(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| x.to_device(self.device()).to_kind(Kind::Double).matmul(&self.weight.tr()) + &self.bias)
    }

    /// Class probabilities, [N, K] float64 on the model's device.
    pub fn predict_proba(&self, x: &Tensor) -> Tensor {
        self.decision_function(x).softmax(-1, Kind::Double)
    }

    /// Predicted class ids, [N] int64.
    pub fn predict(&self, x: &Tensor) -> Tensor {
        self.decision_function(x).argmax(-1, false)
    }

    /// The (scaled) training objective at the current weights: mean CE + ‖W‖²/(2Cn).
    pub fn objective(&self, x: &Tensor, y: &Tensor) -> f64 {
        let n = x.size()[0] as f64;
        let logp = self.decision_function(x).log_softmax(-1, Kind::Double);
        let y = y.to_device(self.device()).to_kind(Kind::Int64);
        let ce = -logp.gather(1, &y.unsqueeze(1), false).mean(Kind::Double).double_value(&[]);
        ce + (&self.weight * &self.weight).sum(Kind::Double).double_value(&[]) / (2.0 * self.c * n)
    }
}
