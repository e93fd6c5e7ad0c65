//! Multinomial L2-regularised logistic regression fitted by full-batch L-BFGS in float64.

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

impl LogisticRegression {
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
        let (n, d) = check_xy(x, y, "LogisticRegression::fit")?;
        if !(c > 0.0 && c.is_finite()) {
            return Err(PivotError::invalid(format!("LogisticRegression::fit: C must be positive and finite, got {c}")));
        }
        let dev = x.device();
        let y = y.to_device(dev).to_kind(Kind::Int64);
        let k = num_classes.unwrap_or_else(|| y.max().int64_value(&[]) + 1);
        if y.min().int64_value(&[]) < 0 || y.max().int64_value(&[]) >= k {
            return Err(PivotError::invalid(format!("LogisticRegression::fit: labels must lie in 0..{k}")));
        }
        let x = x.to_kind(Kind::Double);
        let onehot = y.one_hot(k).to_kind(Kind::Double);
        let reg = 1.0 / (c * n as f64);
        let nf = n as f64;
        let wlen = k * d;
        let objective = |theta: &Tensor| -> (f64, Tensor) {
            let w = theta.narrow(0, 0, wlen).view([k, d]);
            let b = theta.narrow(0, wlen, k);
            let logits = x.matmul(&w.tr()) + &b;
            let logp = logits.log_softmax(-1, Kind::Double);
            let ce = -(&logp * &onehot).sum(Kind::Double) / nf;
            let loss = ce + (&w * &w).sum(Kind::Double) * (0.5 * reg);
            // Closed-form gradient: autograd would double the work for a model this simple.
            let gz = (logp.exp() - &onehot) / nf;
            let gw = gz.tr().matmul(&x) + &w * reg;
            let gb = gz.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            (loss.double_value(&[]), Tensor::cat(&[gw.reshape([-1]), gb], 0))
        };
        let theta0 = match warm {
            Some(m) if m.weight.size() == [k, d] => {
                Tensor::cat(&[m.weight.to_device(dev).reshape([-1]), m.bias.to_device(dev)], 0).to_kind(Kind::Double)
            }
            _ => Tensor::zeros([wlen + k], (Kind::Double, dev)),
        };
        let (theta, info) = tch::no_grad(|| lbfgs::minimize(objective, &theta0, options));
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
