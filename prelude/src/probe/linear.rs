//! Linear probes on frozen features: the OpenAI-CLIP logistic-regression protocol and the
//! DINOv2 SGD linear head. Both take feature tensors; wiring to an encoder lives one layer up.

use super::lbfgs::LbfgsOptions;
use super::logreg::{LogisticRegression, check_xy, product_kind};
use crate::error::{PivotError, Result};
use crate::runtime::check_interrupt;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Features `x` [N, D] with integer labels `y` [N] and optional class names.
#[derive(Debug)]
pub struct FeatureSet {
    pub x: Tensor,
    pub y: Tensor,
    pub class_names: Vec<String>,
}

impl FeatureSet {
    pub fn new(x: Tensor, y: Tensor) -> Self {
        FeatureSet { x, y, class_names: Vec::new() }
    }
    pub fn with_class_names(mut self, names: Vec<String>) -> Self {
        self.class_names = names;
        self
    }
    pub fn len(&self) -> i64 {
        self.x.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-feature affine map fitted on train only, so nothing about val leaks into the probe.
/// Standardising makes one C (or lr) grid fit encoders whose feature scales differ by orders of
/// magnitude (SigLIP's pre-LN residual stream vs post-LN CLS) and keeps L-BFGS well conditioned.
/// Constant features (std < 1e-6) are only centred.
#[derive(Debug)]
pub struct Standardizer {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Standardizer {
    pub fn fit(x: &Tensor) -> Self {
        let x = x.to_kind(Kind::Double);
        let mean = x.mean_dim([0i64].as_slice(), true, Kind::Double);
        let std = x.std_correction([0i64].as_slice(), tch::Scalar::int(0), true);
        let std = std.where_self(&std.ge(1e-6), &std.ones_like());
        Standardizer { mean, std }
    }
    pub fn apply(&self, x: &Tensor) -> Tensor {
        (x.to_device(self.mean.device()).to_kind(Kind::Double) - &self.mean) / &self.std
    }
}

/// How the regularisation strength is chosen on the held-out split of train.
#[derive(Debug, Clone, PartialEq)]
pub enum CSearch {
    /// No sweep.
    Fixed(f64),
    /// Evaluate every value.
    Grid(Vec<f64>),
    /// The CLIP paper's parametric binary search over log10 C ∈ [lo, hi]: start at every
    /// `start_step` decades, then repeatedly halve the step around the best point until
    /// `steps_per_decade` resolution (CLIP: 1e-6..1e6, step 2, 8/decade → 15 fits instead of 96).
    Binary { lo: f64, hi: f64, start_step: f64, steps_per_decade: f64 },
}

impl CSearch {
    pub fn clip() -> Self {
        CSearch::Binary { lo: -6.0, hi: 6.0, start_step: 2.0, steps_per_decade: 8.0 }
    }
    /// DINOv2's logistic-regression grid: 10^linspace(-6, 5, 45).
    pub fn dinov2() -> Self {
        CSearch::Grid((0..45).map(|i| 10f64.powf(-6.0 + 11.0 * i as f64 / 44.0)).collect())
    }
}

/// One point of a hyper-parameter sweep, scored on the held-out split (or val for SGD).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    pub param: f64,
    pub top1: f64,
    pub loss: f64,
}

/// Result of a classification probe.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// "logreg-lbfgs" or "sgd-linear".
    pub method: String,
    pub top1: f64,
    pub top5: f64,
    /// Chosen C (logistic regression).
    pub c: Option<f64>,
    /// Chosen learning rate (SGD head).
    pub lr: Option<f64>,
    pub per_class_accuracy: Vec<f64>,
    /// rows = true class, columns = predicted class.
    pub confusion: Vec<Vec<u64>>,
    pub n_train: i64,
    pub n_val: i64,
    pub num_features: i64,
    pub class_names: Vec<String>,
    pub sweep: Vec<SweepPoint>,
    pub fit_seconds: f64,
    pub standardized: bool,
}

/// top-k accuracy of scores [N, K] against labels [N].
pub fn topk_accuracy(scores: &Tensor, y: &Tensor, k: i64) -> f64 {
    let k = k.min(scores.size()[1]);
    let (_, idx) = scores.topk(k, -1, true, true);
    let y = y.to_device(idx.device()).to_kind(Kind::Int64).unsqueeze(1);
    idx.eq_tensor(&y).any_dim(1, false).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}

/// Confusion counts (rows true, cols predicted) for class ids in 0..k.
pub fn confusion_matrix(pred: &Tensor, y: &Tensor, k: i64) -> Vec<Vec<u64>> {
    let y = y.to_device(Device::Cpu).to_kind(Kind::Int64);
    let p = pred.to_device(Device::Cpu).to_kind(Kind::Int64);
    let flat = (y * k + p).bincount::<Tensor>(None, k * k);
    let v: Vec<i64> = Vec::try_from(&flat).unwrap_or_default();
    (0..k as usize).map(|r| (0..k as usize).map(|c| v[r * k as usize + c] as u64).collect()).collect()
}

fn per_class_accuracy(conf: &[Vec<u64>]) -> Vec<f64> {
    conf.iter()
        .enumerate()
        .map(|(i, row)| {
            let n: u64 = row.iter().sum();
            if n == 0 { f64::NAN } else { row[i] as f64 / n as f64 }
        })
        .collect()
}

fn num_classes(train: &FeatureSet, val: &FeatureSet) -> i64 {
    let m = |y: &Tensor| y.max().int64_value(&[]) + 1;
    m(&train.y).max(m(&val.y)).max(train.class_names.len() as i64)
}

fn report(
    method: &str,
    scores: &Tensor,
    train: &FeatureSet,
    val: &FeatureSet,
    k: i64,
    sweep: Vec<SweepPoint>,
    start: Instant,
    standardized: bool,
) -> ProbeReport {
    let pred = scores.argmax(-1, false);
    let confusion = confusion_matrix(&pred, &val.y, k);
    ProbeReport {
        method: method.to_string(),
        top1: topk_accuracy(scores, &val.y, 1),
        top5: topk_accuracy(scores, &val.y, 5),
        c: None,
        lr: None,
        per_class_accuracy: per_class_accuracy(&confusion),
        confusion,
        n_train: train.len(),
        n_val: val.len(),
        num_features: train.x.size()[1],
        class_names: train.class_names.clone(),
        sweep,
        fit_seconds: start.elapsed().as_secs_f64(),
        standardized,
    }
}

/// Random split of 0..n into (fit, holdout) index tensors, seeded.
fn split_indices(n: i64, fraction: f64, seed: u64, device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(seed as i64);
    let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).to_device(device);
    let n_hold = ((n as f64 * fraction).round() as i64).clamp(1, n - 1);
    (perm.narrow(0, n_hold, n - n_hold), perm.narrow(0, 0, n_hold))
}

/// The OpenAI-CLIP linear-probe protocol on feature tensors.
///
/// 1. standardise with train statistics (see [`Standardizer`]); 2. split train into fit/holdout
/// (`holdout_fraction`, seeded); 3. choose C on the holdout by [`CSearch`] (holdout top-1, ties
/// broken by lower holdout log-loss), warm-starting neighbouring fits; 4. refit on all of train
/// with that C; 5. top-1/top-5, per-class accuracy and confusion on val.
#[derive(Debug, Clone)]
pub struct LinearProbe {
    pub search: CSearch,
    pub holdout_fraction: f64,
    pub seed: u64,
    pub standardize: bool,
    pub lbfgs: LbfgsOptions,
}

impl Default for LinearProbe {
    fn default() -> Self {
        LinearProbe {
            search: CSearch::clip(),
            holdout_fraction: 0.1,
            seed: 0,
            standardize: true,
            lbfgs: LbfgsOptions { max_iter: 1000, max_eval: 3000, ..Default::default() },
        }
    }
}

impl LinearProbe {
    pub fn with_c(mut self, c: f64) -> Self {
        self.search = CSearch::Fixed(c);
        self
    }

    /// Fits on `train`, reports on `val`. All tensors may live on any device; work runs on
    /// `train.x`'s device.
    pub fn fit_features(&self, train: &FeatureSet, val: &FeatureSet) -> Result<ProbeReport> {
        let start = Instant::now();
        let (n, d) = check_xy(&train.x, &train.y, "LinearProbe train")?;
        let (_, dv) = check_xy(&val.x, &val.y, "LinearProbe val")?;
        if d != dv {
            return Err(PivotError::invalid(format!("LinearProbe: train has {d} features, val has {dv}")));
        }
        let dev = train.x.device();
        let k = num_classes(train, val);
        // Standardised in float64, then back to the features' precision: the fit's products run in
        // it (float32 features: float32 products, as scikit-learn does).
        let pk = product_kind(train.x.kind());
        let (xtr, xva) = if self.standardize {
            let s = Standardizer::fit(&train.x);
            (s.apply(&train.x).to_kind(pk), s.apply(&val.x).to_kind(pk))
        } else {
            (train.x.to_kind(pk), val.x.to_device(dev).to_kind(pk))
        };
        let ytr = train.y.to_device(dev).to_kind(Kind::Int64);

        let mut sweep = Vec::new();
        let best_c = match &self.search {
            CSearch::Fixed(c) => *c,
            search => {
                if n < 2 {
                    return Err(PivotError::invalid("LinearProbe: a C sweep needs at least 2 training samples"));
                }
                let (fi, hi) = split_indices(n, self.holdout_fraction, self.seed, dev);
                let (xf, yf) = (xtr.index_select(0, &fi), ytr.index_select(0, &fi));
                let (xh, yh) = (xtr.index_select(0, &hi), ytr.index_select(0, &hi));
                let mut warm: Option<LogisticRegression> = None;
                let mut score = |log_c: f64, sweep: &mut Vec<SweepPoint>| -> Result<(f64, f64)> {
                    let c = 10f64.powf(log_c);
                    if let Some(p) = sweep.iter().find(|p| (p.param.log10() - log_c).abs() < 1e-9) {
                        return Ok((p.top1, p.loss));
                    }
                    let m = LogisticRegression::fit_with(&xf, &yf, c, self.lbfgs, Some(k), warm.as_ref())?;
                    let s = m.decision_function(&xh);
                    let top1 = topk_accuracy(&s, &yh, 1);
                    let loss = s.log_softmax(-1, Kind::Double).gather(1, &yh.unsqueeze(1), false).mean(Kind::Double);
                    let loss = -loss.double_value(&[]);
                    sweep.push(SweepPoint { param: c, top1, loss });
                    warm = Some(m);
                    Ok((top1, loss))
                };
                let better = |a: (f64, f64), b: (f64, f64)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
                match search {
                    CSearch::Grid(cs) => {
                        let mut best = (f64::NEG_INFINITY, f64::INFINITY, 1.0);
                        for &c in cs {
                            let s = score(c.log10(), &mut sweep)?;
                            if better(s, (best.0, best.1)) {
                                best = (s.0, s.1, c);
                            }
                        }
                        best.2
                    }
                    CSearch::Binary { lo, hi, start_step, steps_per_decade } => {
                        let mut best = (f64::NEG_INFINITY, f64::INFINITY, *lo);
                        let mut lc = *lo;
                        while lc <= hi + 1e-9 {
                            let s = score(lc, &mut sweep)?;
                            if better(s, (best.0, best.1)) {
                                best = (s.0, s.1, lc);
                            }
                            lc += start_step;
                        }
                        let mut step = start_step / 2.0;
                        while step >= 1.0 / steps_per_decade - 1e-12 {
                            let centre = best.2;
                            for cand in [centre - step, centre + step] {
                                if cand < lo - 1e-9 || cand > hi + 1e-9 {
                                    continue;
                                }
                                let s = score(cand, &mut sweep)?;
                                if better(s, (best.0, best.1)) {
                                    best = (s.0, s.1, cand);
                                }
                            }
                            step /= 2.0;
                        }
                        10f64.powf(best.2)
                    }
                    CSearch::Fixed(_) => unreachable!(),
                }
            }
        };
        sweep.sort_by(|a, b| a.param.total_cmp(&b.param));
        let model = LogisticRegression::fit_with(&xtr, &ytr, best_c, self.lbfgs, Some(k), None)?;
        let scores = model.decision_function(&xva);
        let mut r = report("logreg-lbfgs", &scores, train, val, k, sweep, start, self.standardize);
        r.c = Some(best_c);
        Ok(r)
    }
}

/// Features with a NaN or Inf (a failed extraction, an overflowing fp16 tower) would turn every head
/// into NaN and the report into noise: an error naming the set and the first bad row instead.
fn check_finite_features(x: &Tensor, what: &str) -> Result<()> {
    let bad_rows = tch::no_grad(|| x.isfinite().logical_not().any_dim(1, false).nonzero());
    if bad_rows.size()[0] == 0 {
        return Ok(());
    }
    let row = bad_rows.int64_value(&[0, 0]);
    Err(PivotError::invalid(format!(
        "{what}: feature row {row} (and {} more) holds NaN or Inf",
        bad_rows.size()[0] - 1
    )))
}

/// DINOv2's linear head (`eval/linear.py`) on frozen features: one linear layer per learning rate,
/// all trained jointly on the same mini-batches with SGD (momentum 0.9, no weight decay), cosine
/// annealing to 0, lr scaled by batch/256, weights N(0, 0.01²), bias 0. As in DINOv2 the best
/// head is picked by val top-1. No data augmentation: the features are precomputed.
#[derive(Debug, Clone)]
pub struct SgdLinearProbe {
    pub lrs: Vec<f64>,
    pub batch_size: i64,
    pub epochs: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub standardize: bool,
}

impl Default for SgdLinearProbe {
    fn default() -> Self {
        SgdLinearProbe {
            lrs: vec![1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1],
            batch_size: 128,
            epochs: 10,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
            standardize: true,
        }
    }
}

impl SgdLinearProbe {
    /// The learning rates (finite, > 0), momentum in [0, 1), weight decay >= 0, batch size and
    /// epochs >= 1.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(PivotError::config("SgdLinearProbe", field, msg));
        if self.lrs.is_empty() {
            return bad("lrs", "empty learning-rate grid".into());
        }
        if let Some(lr) = self.lrs.iter().find(|lr| !(lr.is_finite() && **lr > 0.0)) {
            return bad("lrs", format!("{lr} is not a positive finite learning rate"));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} is outside [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", format!("{} is not a finite value >= 0", self.weight_decay));
        }
        if self.batch_size < 1 {
            return bad("batch_size", format!("{}: must be at least 1", self.batch_size));
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        Ok(())
    }

    pub fn fit_features(&self, train: &FeatureSet, val: &FeatureSet) -> Result<ProbeReport> {
        let start = Instant::now();
        let (n, d) = check_xy(&train.x, &train.y, "SgdLinearProbe train")?;
        check_xy(&val.x, &val.y, "SgdLinearProbe val")?;
        self.validate()?;
        check_finite_features(&train.x, "SgdLinearProbe train")?;
        check_finite_features(&val.x, "SgdLinearProbe val")?;
        let dev = train.x.device();
        let k = num_classes(train, val);
        let g = self.lrs.len() as i64;
        let (xtr, xva) = if self.standardize {
            let s = Standardizer::fit(&train.x);
            (s.apply(&train.x).to_kind(Kind::Float), s.apply(&val.x).to_kind(Kind::Float))
        } else {
            (train.x.to_kind(Kind::Float), val.x.to_device(dev).to_kind(Kind::Float))
        };
        let ytr = train.y.to_device(dev).to_kind(Kind::Int64);
        let yva = val.y.to_device(dev).to_kind(Kind::Int64);
        tch::manual_seed(self.seed as i64);
        let bs = self.batch_size.min(n).max(1);
        let steps_per_epoch = (n / bs).max(1);
        let total = steps_per_epoch * self.epochs as i64;
        let lr0 = Tensor::from_slice(&self.lrs).to_kind(Kind::Float).to_device(dev).view([g, 1, 1]) * (bs as f64 / 256.0);
        let mut w = (Tensor::randn([g, d, k], (Kind::Float, dev)) * 0.01).set_requires_grad(true);
        let mut b = Tensor::zeros([g, 1, k], (Kind::Float, dev)).set_requires_grad(true);
        let mut buf_w: Option<Tensor> = None;
        let mut buf_b: Option<Tensor> = None;
        let mut step = 0i64;
        for epoch in 0..self.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).to_device(dev);
            for s in 0..steps_per_epoch {
                // Between mini-batches: the heads are locals, so stopping here loses nothing of the caller's.
                check_interrupt(&format!("SGD linear probe epoch {} of {}, batch {} of {steps_per_epoch}", epoch + 1, self.epochs, s + 1))?;
                let idx = perm.narrow(0, s * bs, bs);
                let xb = xtr.index_select(0, &idx);
                let yb = ytr.index_select(0, &idx);
                let logits = xb.unsqueeze(0).matmul(&w) + &b; // [G, B, K]
                // Sum over heads of per-head mean CE: heads share no parameters, so each gets its own gradient.
                let loss = logits.reshape([g * bs, k]).cross_entropy_for_logits(&yb.repeat([g])) * g as f64;
                w.zero_grad();
                b.zero_grad();
                loss.backward();
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
                tch::no_grad(|| {
                    // torch.optim.SGD with momentum (dampening 0): buf = m·buf + g; p -= lr·buf.
                    let gw = w.grad() + &w * self.weight_decay;
                    let gb = b.grad();
                    let bw = match buf_w.take() { Some(m) => m * self.momentum + &gw, None => gw.copy() };
                    let bb = match buf_b.take() { Some(m) => m * self.momentum + &gb, None => gb.copy() };
                    let lr = &lr0 * cos;
                    let _ = w.f_sub_(&(&bw * &lr));
                    let _ = b.f_sub_(&(&bb * &lr));
                    buf_w = Some(bw);
                    buf_b = Some(bb);
                });
                step += 1;
            }
        }
        let (scores_all, tops) = tch::no_grad(|| {
            let s = xva.unsqueeze(0).matmul(&w) + &b; // [G, Nv, K]
            let tops: Vec<(f64, f64)> = (0..g)
                .map(|i| {
                    let si = s.get(i);
                    let loss = si.log_softmax(-1, Kind::Float).gather(1, &yva.unsqueeze(1), false).mean(Kind::Float);
                    (topk_accuracy(&si, &yva, 1), -loss.double_value(&[]))
                })
                .collect();
            (s, tops)
        });
        // A head whose weights went NaN/Inf (its lr diverged) scores garbage; it is reported with
        // top-1 0 and an infinite loss and never chosen.
        let diverged: Vec<bool> = tch::no_grad(|| {
            (0..g).map(|i| !(w.get(i).sum(Kind::Float).double_value(&[]).is_finite() && b.get(i).sum(Kind::Float).double_value(&[]).is_finite())).collect()
        });
        if diverged.iter().all(|&d| d) {
            return Err(PivotError::NonFinite {
                what: format!("SgdLinearProbe weights for every learning rate of {:?}", self.lrs),
                step: total as usize,
                last_good: 0,
            });
        }
        let tops: Vec<(f64, f64)> =
            tops.iter().zip(&diverged).map(|(&t, &d)| if d { (0.0, f64::INFINITY) } else { t }).collect();
        let sweep: Vec<SweepPoint> =
            self.lrs.iter().zip(&tops).map(|(&lr, &(top1, loss))| SweepPoint { param: lr, top1, loss }).collect();
        let best = (0..g as usize)
            .filter(|&i| !diverged[i])
            .max_by(|&a, &b| tops[a].0.total_cmp(&tops[b].0).then(tops[b].1.total_cmp(&tops[a].1)))
            .unwrap_or(0);
        let mut r = report("sgd-linear", &scores_all.get(best as i64), train, val, k, sweep, start, self.standardize);
        r.lr = Some(self.lrs[best]);
        Ok(r)
    }
}

/// How a probe report shows itself: text, HTML, the sweep curve, and a `Metrics` row for `Runs`.
mod display {
    use super::ProbeReport;
    use crate::error::Result;
    use crate::plot::html::{key_value_table, percent};
    use crate::plot::{Figure, Metrics, Series, curves};
    use crate::runtime::{MimeBundle, Rich};
    use std::fmt;

    impl ProbeReport {
        fn rows(&self) -> Vec<(String, String)> {
            let mut r = vec![
                ("method".into(), self.method.clone()),
                ("top-1".into(), percent(self.top1)),
                ("top-5".into(), percent(self.top5)),
            ];
            if let Some(c) = self.c {
                r.push(("C".into(), format!("{c:.4e}")));
            }
            if let Some(lr) = self.lr {
                r.push(("lr".into(), format!("{lr:.1e}")));
            }
            r.push(("train / val".into(), format!("{} / {}", self.n_train, self.n_val)));
            r.push(("features".into(), format!("{} (standardised: {})", self.num_features, self.standardized)));
            r.push(("sweep points".into(), self.sweep.len().to_string()));
            r.push(("fit time".into(), format!("{:.2} s", self.fit_seconds)));
            let worst = self
                .per_class_accuracy
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_finite())
                .min_by(|a, b| a.1.total_cmp(b.1));
            if let Some((i, a)) = worst {
                let name = self.class_names.get(i).cloned().unwrap_or_else(|| format!("class {i}"));
                r.push(("worst class".into(), format!("{name}: {}", percent(*a))));
            }
            r
        }

        pub fn to_html(&self) -> String {
            key_value_table("Linear probe", &self.rows())
        }

        /// Held-out top-1 against the swept hyper-parameter (log x axis as log10).
        pub fn plot_sweep(&self) -> Result<Figure> {
            let pts = self.sweep.iter().map(|p| (p.param.log10(), p.top1)).collect();
            let x = if self.c.is_some() { "log10 C" } else { "log10 lr" };
            curves("probe sweep", x, "held-out top-1", &[Series::new(self.method.clone(), pts)])
        }
    }

    impl fmt::Display for ProbeReport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            for (k, v) in self.rows() {
                writeln!(f, "{k:>14}: {v}")?;
            }
            Ok(())
        }
    }

    impl Rich for ProbeReport {
        fn mime_bundle(&self) -> MimeBundle {
            MimeBundle::text(self.to_string()).with_html(self.to_html())
        }
    }

    impl Metrics for ProbeReport {
        fn metrics(&self) -> Vec<(String, f64)> {
            let mut m = vec![("top1".to_string(), self.top1), ("top5".to_string(), self.top5)];
            if let Some(c) = self.c {
                m.push(("C".into(), c));
            }
            if let Some(lr) = self.lr {
                m.push(("lr".into(), lr));
            }
            m
        }
    }
}
