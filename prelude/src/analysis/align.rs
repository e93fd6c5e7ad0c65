//! Platonic representation alignment (minyoungg/platonic-rep `metrics.py`,
//! `measure_alignment.py`): mutual k-NN, CKA (biased/unbiased) and CKNNA between two sets of
//! features of the same N samples, and the max over every layer pair.
//!
//! Metrics run in float64 on the features' device: the kNN sets depend on the order of nearly equal
//! similarities, and fp32 rounding (platonic-rep's default) flips some of them.

use crate::error::{PivotError, Result};
use crate::runtime::check_interrupt;
use tch::{Kind, Tensor};

/// Outlier clamp threshold of platonic-rep `remove_outliers(q)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutlierClamp {
    /// Leave the features as they are.
    None,
    /// t = mean over samples of each sample's q-quantile of |x| over all its (layer, dim) entries
    /// (`exact=False`, what `measure_alignment.py` uses by default).
    Mean(f64),
    /// t = sorted |x| over the whole tensor at index ⌊q·numel⌋ (`exact=True`, `--precise`).
    Exact(f64),
}

impl Default for OutlierClamp {
    fn default() -> Self {
        OutlierClamp::Mean(0.95)
    }
}

/// Clamps `feats` ([N, ...]) to ±t (see [`OutlierClamp`]).
pub fn remove_outliers(feats: &Tensor, clamp: OutlierClamp) -> Tensor {
    let f = feats.to_kind(Kind::Double);
    let t = match clamp {
        OutlierClamp::None => return f,
        OutlierClamp::Mean(q) if q >= 1.0 => return f,
        OutlierClamp::Exact(q) if q >= 1.0 => return f,
        OutlierClamp::Mean(q) => {
            let n = f.size()[0];
            f.abs().reshape([n, -1]).quantile_scalar(q, 1, false, "linear").mean(Kind::Double).double_value(&[])
        }
        OutlierClamp::Exact(q) => {
            let (sorted, _) = f.abs().reshape([-1]).sort(0, false);
            let idx = ((q * f.numel() as f64) as i64).min(f.numel() as i64 - 1);
            sorted.double_value(&[idx])
        }
    };
    f.clamp(-t, t)
}

/// x / max(‖x‖₂, 1e-12) along the last dimension (F.normalize).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12)
}

/// platonic-rep preparation: clamp outliers over the whole [N, L, D] (or [N, D]) tensor, then
/// L2-normalise every layer's vectors.
pub fn prepare_features(feats: &Tensor, clamp: OutlierClamp) -> Tensor {
    l2_normalize(&remove_outliers(feats, clamp))
}

fn check_pair(x: &Tensor, y: &Tensor, what: &str) -> Result<i64> {
    let (xs, ys) = (x.size(), y.size());
    if xs.len() != 2 || ys.len() != 2 || xs[0] != ys[0] {
        return Err(PivotError::invalid(format!("{what}: expected [N, Dx] and [N, Dy] features, got {xs:?} and {ys:?}")));
    }
    Ok(xs[0])
}

fn gram(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Double);
    x.matmul(&x.tr())
}

/// 0/1 mask [N, N] of the top-k entries of every row of `s` (ties → lower index, as a stable sort).
fn topk_mask(s: &Tensor, k: i64) -> Tensor {
    let idx = s.argsort_stable(true, 1, true).narrow(1, 0, k);
    s.zeros_like().scatter_value(1, &idx, 1.0)
}

/// Mutual k-NN alignment: mean over samples of |kNN_A(i) ∩ kNN_B(i)| / k, self excluded.
pub fn mutual_knn(x: &Tensor, y: &Tensor, k: i64) -> Result<f64> {
    let n = check_pair(x, y, "mutual_knn")?;
    if k < 1 || k >= n {
        return Err(PivotError::invalid(format!("mutual_knn: k must be in 1..{n}, got {k}")));
    }
    let y = y.to_device(x.device());
    let knn = |f: &Tensor| {
        let s = gram(f);
        let _ = s.diagonal(0, 0, 1).fill_(-1e8);
        topk_mask(&s, k)
    };
    let both = knn(x) * knn(&y);
    Ok(both.sum(Kind::Double).double_value(&[]) / (n as f64 * k as f64))
}

/// Biased HSIC tr(K H L H), H = I − 11ᵀ/n.
pub fn hsic_biased(k: &Tensor, l: &Tensor) -> f64 {
    let n = k.size()[0];
    let h = Tensor::eye(n, (Kind::Double, k.device())) - 1.0 / n as f64;
    k.matmul(&h).matmul(l).matmul(&h).trace().double_value(&[])
}

/// Unbiased HSIC (Song et al. 2012, eq. 5) on the diagonal-free kernels, as platonic-rep writes it
/// (with L̃ᵀ in the trace term, which matters for the non-symmetric masked kernels of CKNNA).
pub fn hsic_unbiased(k: &Tensor, l: &Tensor) -> f64 {
    let m = k.size()[0] as f64;
    let kt = k.copy();
    let lt = l.copy();
    let _ = kt.diagonal(0, 0, 1).fill_(0.0);
    let _ = lt.diagonal(0, 0, 1).fill_(0.0);
    let s = |t: Tensor| t.sum(Kind::Double).double_value(&[]);
    let v = s(&kt * lt.tr()) + s(kt.shallow_clone()) * s(lt.shallow_clone()) / ((m - 1.0) * (m - 2.0))
        - 2.0 * s(kt.matmul(&lt)) / (m - 2.0);
    v / (m * (m - 3.0))
}

/// Linear CKA: HSIC(K,L) / (√(HSIC(K,K)·HSIC(L,L)) + 1e-6), K = XXᵀ, L = YYᵀ.
pub fn cka(x: &Tensor, y: &Tensor, unbiased: bool) -> Result<f64> {
    let n = check_pair(x, y, "cka")?;
    if unbiased && n < 4 {
        return Err(PivotError::invalid("cka: the unbiased estimator needs at least 4 samples"));
    }
    let (k, l) = (gram(x), gram(&y.to_device(x.device())));
    let hsic = if unbiased { hsic_unbiased } else { hsic_biased };
    Ok(hsic(&k, &l) / ((hsic(&k, &k) * hsic(&l, &l)).sqrt() + 1e-6))
}

/// CKNNA: HSIC restricted to mutual k-nearest-neighbour pairs (platonic-rep `cknna`).
pub fn cknna(x: &Tensor, y: &Tensor, k: i64, unbiased: bool) -> Result<f64> {
    let n = check_pair(x, y, "cknna")?;
    if k < 2 || k >= n {
        return Err(PivotError::invalid(format!("cknna: k must be in 2..{n}, got {k}")));
    }
    let (kk, ll) = (gram(x), gram(&y.to_device(x.device())));
    let sim = |a: &Tensor, b: &Tensor| {
        let (ah, bh) = (a.copy(), b.copy());
        if unbiased {
            let _ = ah.diagonal(0, 0, 1).fill_(f64::NEG_INFINITY);
            let _ = bh.diagonal(0, 0, 1).fill_(f64::NEG_INFINITY);
        }
        let mask = topk_mask(&ah, k) * topk_mask(&bh, k);
        let (ma, mb) = (&mask * a, &mask * b);
        if unbiased { hsic_unbiased(&ma, &mb) } else { hsic_biased(&ma, &mb) }
    };
    Ok(sim(&kk, &ll) / ((sim(&kk, &kk) * sim(&ll, &ll)).sqrt() + 1e-6))
}

/// Which alignment score a grid holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlignmentMetric {
    MutualKnn { k: i64 },
    Cka,
    UnbiasedCka,
    Cknna { k: i64 },
}

impl AlignmentMetric {
    pub fn name(&self) -> String {
        match self {
            AlignmentMetric::MutualKnn { k } => format!("mutual_knn(k={k})"),
            AlignmentMetric::Cka => "cka".into(),
            AlignmentMetric::UnbiasedCka => "unbiased_cka".into(),
            AlignmentMetric::Cknna { k } => format!("cknna(k={k})"),
        }
    }

    /// Scores two already prepared [N, D] feature matrices.
    pub fn score(&self, x: &Tensor, y: &Tensor) -> Result<f64> {
        match *self {
            AlignmentMetric::MutualKnn { k } => mutual_knn(x, y, k),
            AlignmentMetric::Cka => cka(x, y, false),
            AlignmentMetric::UnbiasedCka => cka(x, y, true),
            AlignmentMetric::Cknna { k } => cknna(x, y, k, true),
        }
    }
}

/// Alignment of every layer of A against every layer of B.
#[derive(Debug, Clone)]
pub struct AlignmentGrid {
    pub metric: AlignmentMetric,
    /// scores[i][j] = metric(A layer i, B layer j).
    pub scores: Vec<Vec<f64>>,
    /// Max over the grid (platonic-rep `compute_score`: first strict maximum above 0).
    pub best: f64,
    pub argmax: (usize, usize),
    pub labels_a: String,
    pub labels_b: String,
}

impl AlignmentGrid {
    /// `a` [N, La, Da] and `b` [N, Lb, Db] raw per-layer features of the same N samples
    /// (e.g. every tower layer vs every LM hidden state); prepared with `clamp` + L2 first.
    pub fn compute(a: &Tensor, b: &Tensor, metric: AlignmentMetric, clamp: OutlierClamp) -> Result<Self> {
        let (asz, bsz) = (a.size(), b.size());
        if asz.len() != 3 || bsz.len() != 3 || asz[0] != bsz[0] {
            return Err(PivotError::invalid(format!(
                "AlignmentGrid: expected [N, La, Da] and [N, Lb, Db] with the same N, got {asz:?} and {bsz:?}"
            )));
        }
        let pa = prepare_features(a, clamp);
        let pb = prepare_features(&b.to_device(a.device()), clamp);
        let mut scores = vec![vec![0.0; bsz[1] as usize]; asz[1] as usize];
        let (mut best, mut argmax) = (0.0, (0, 0));
        for i in 0..asz[1] {
            let xa = pa.select(1, i);
            for j in 0..bsz[1] {
                check_interrupt(&format!("alignment grid, layer pair ({i}, {j}) of {} × {}", asz[1], bsz[1]))?;
                let s = metric.score(&xa, &pb.select(1, j))?;
                scores[i as usize][j as usize] = s;
                if s > best {
                    best = s;
                    argmax = (i as usize, j as usize);
                }
            }
        }
        Ok(AlignmentGrid { metric, scores, best, argmax, labels_a: "layer A".into(), labels_b: "layer B".into() })
    }

    /// Names the axes (e.g. "SigLIP layer", "Qwen2.5 hidden state") for display.
    pub fn with_labels(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.labels_a = a.into();
        self.labels_b = b.into();
        self
    }
}

/// How an alignment grid shows itself: one line of text, the layer × layer heat map, `Metrics`.
mod display {
    use super::AlignmentGrid;
    use crate::error::Result;
    use crate::plot::{Figure, Metrics, heatmap};
    use crate::runtime::{MimeBundle, Rich};
    use std::fmt;

    impl AlignmentGrid {
        /// The full layer × layer grid with the argmax outlined.
        pub fn heatmap(&self) -> Result<Figure> {
            let title = format!("{}: max {:.4} at ({}, {})", self.metric.name(), self.best, self.argmax.0, self.argmax.1);
            heatmap(&title, &self.labels_b, &self.labels_a, &self.scores, Some(self.argmax))
        }
    }

    impl fmt::Display for AlignmentGrid {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            writeln!(
                f,
                "{}: max {:.4} at ({} {}, {} {}) over a {}×{} grid",
                self.metric.name(),
                self.best,
                self.labels_a,
                self.argmax.0,
                self.labels_b,
                self.argmax.1,
                self.scores.len(),
                self.scores.first().map_or(0, |r| r.len())
            )
        }
    }

    impl Rich for AlignmentGrid {
        fn mime_bundle(&self) -> MimeBundle {
            let b = MimeBundle::text(self.to_string());
            match self.heatmap() {
                Ok(fig) => b.with_png(&fig.png),
                Err(_) => b,
            }
        }
    }

    impl Metrics for AlignmentGrid {
        fn metrics(&self) -> Vec<(String, f64)> {
            vec![
                (self.metric.name(), self.best),
                ("argmax_a".into(), self.argmax.0 as f64),
                ("argmax_b".into(), self.argmax.1 as f64),
            ]
        }
    }
}
