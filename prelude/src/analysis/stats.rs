//! Statistics of the study: is DPO's tower better than SFT's, seed by seed?
//!
//! Each measure (probe top-1, patch-seg recall, choice accuracy, alignment, ...) is measured on
//! both arms for the same seeds, so the unit of analysis is the per-seed difference
//! Δᵢ = treatment − control (DPO − SFT). For each measure this module reports:
//!
//! - mean Δ, its SD (n − 1 denominator) and the 95 % Student t interval (`scipy.stats.t.interval`);
//! - a 95 % **percentile** bootstrap interval of mean Δ: `B` resamples of the n differences with
//!   replacement, drawn from a ChaCha8 stream seeded by [`StudyOptions::bootstrap_seed`], and the
//!   2.5 / 97.5 % quantiles of the resampled means by NumPy's default ("linear") rule. Percentile,
//!   not BCa: BCa's jackknife acceleration is unstable at the 3–10 seeds a study has, and neither
//!   method fixes the known narrowness of bootstrap intervals at such n — which is why the
//!   verdict uses the t interval and the bootstrap one is reported beside it as a check;
//! - the paired t-test p (`scipy.stats.ttest_rel`, two-sided);
//! - the Wilcoxon signed-rank p with scipy 1.17's defaults (`scipy.stats.wilcoxon(x, y)`:
//!   `zero_method="wilcox"`, `correction=False`, `method="auto"`), which picks one of three modes
//!   ([`WilcoxonMethod`]): the exact null distribution when n ≤ 50 and there are neither ties nor
//!   zero differences; the exact sign-flip distribution of the tie-averaged ranks when there are
//!   ties or zeros and n ≤ 13 (scipy runs `permutation_test` there, which enumerates all 2ⁿ sign
//!   patterns and so is deterministic); the normal approximation with tie correction, zeros
//!   dropped, otherwise. Both exact modes are one dynamic programme over (doubled, so integral)
//!   rank sums, so they are exact in integer arithmetic;
//! - Holm's step-down adjustment over the measures of one [`StudyTable`] (the headline family):
//!   adjusted p of the t-test (and, as a robustness check, of the Wilcoxon test), and Holm-adjusted
//!   t intervals (construction below);
//! - with a smallest effect of interest δ > 0: TOST equivalence p (two one-sided t-tests against
//!   ±δ, `scipy.stats.ttest_1samp(d, ±δ, alternative=...)`) and whether Δ is below δ;
//! - a [`Verdict`].
//!
//! # Holm-adjusted intervals
//! Order the m measures by t-test p, ascending (ties keep input order), and let k* be Holm's
//! stopping rank: the first rank k with p₍ₖ₎ ≥ α / (m − k + 1) (k* = m + 1 when every
//! hypothesis is rejected). The measure at rank i gets the two-sided t interval at level
//! 1 − αᵢ with αᵢ = α / (m − min(i, k*) + 1). Up to the stopping rank this is the textbook
//! 1 − α/(m − i + 1); past it the level stays at the stopping rank's (wider than the textbook
//! interval). Without that hold an interval could exclude 0 after Holm has stopped — e.g. m = 2,
//! p = (0.03, 0.04): the second measure's 95 % interval excludes 0, yet its adjusted p is 0.06.
//! With it, "the Holm interval excludes 0" and "the Holm-adjusted p < α" are the same statement
//! for every measure, so the verdict never disagrees with the adjusted p.
//!
//! # Verdict
//! On the Holm-adjusted interval [lo, hi]: **reproduced** when lo > 0; otherwise **contradicted**
//! when hi < 0, or when a smallest effect of interest δ is given and hi < δ (the effect the paper
//! claims is excluded: equivalence, or worse); otherwise **inconclusive**. The rules apply in that
//! order, so an interval inside (0, δ) is "reproduced" (the direction holds) and
//! [`MeasureResult::below_smallest_effect`] says that the effect is smaller than δ. "hi < δ" on a
//! two-sided 1 − αᵢ interval is the one-sided test of Δ ≥ δ at level αᵢ / 2, so it is stricter
//! than TOST at αᵢ, whose p is reported beside it.
//!
//! # Degenerate data
//! n ≥ 2 pairs are required. When every Δ is the same (SD 0, or within 1e-9 of the mean relative to
//! it: two seeds of a quantised measure that differ by the same step give SD 1e-17 from rounding
//! alone) the t intervals collapse to that value and the t-test p is 0 for Δ ≠ 0 (scipy's limit:
//! `ttest_rel` returns t = ±inf, p = 0) and 1 when every Δ is 0 (scipy returns NaN there); the
//! Wilcoxon p is 1 when no difference is non-zero (scipy: 1 for n ≤ 13, NaN above). No result is
//! NaN.
//!
//! A zero spread is no evidence of a zero standard error: it is what a measure with a coarse
//! resolution (a mutual k-NN score in steps of 1/(k·n), an accuracy in steps of 1/n) gives on a few
//! seeds, and the t interval's width then says nothing. So for such a measure the verdict comes from
//! the exact sign-flip (Wilcoxon) test instead, Holm-adjusted like the t-test: **reproduced** or
//! **contradicted** by the sign of Δ when that p < α, **inconclusive** otherwise. All n seeds on
//! one side give p = 2 / 2ⁿ, so this needs n ≥ 6 for one measure (n ≥ 8 for five).
//!
//! # Display
//! A [`StudyTable`] prints as a text table; in a notebook it shows as an HTML table with a forest
//! plot under it ([`StudyTable::forest_plot`]: mean Δ, the Holm-adjusted interval as a bar coloured
//! by verdict, the 1 − α t interval as a thin line, 0 and the smallest effect of interest), drawn
//! by plot/'s generic [`ForestPlot`] from plain rows.
//!
//! # Power
//! [`PairedTPower`] gives the exact power of the two-sided paired t-test, which needs the
//! noncentral t distribution. statrs (like most Rust crates) has only the central one, so
//! [`noncentral_t_cdf`] implements Lenth's series (Algorithm AS 243, Appl. Statist. 38, 1989):
//! for t ≥ 0, F(t; ν, δ) = Φ(−δ) + ½ Σⱼ [pⱼ I_x(j + ½, ν/2) + qⱼ I_x(j + 1, ν/2)] with
//! x = t² / (t² + ν), pⱼ = e^{−δ²/2} (δ²/2)ʲ / j!, qⱼ = δ e^{−δ²/2} (δ²/2)ʲ / (√2 Γ(j + 3/2)),
//! and F(t; ν, δ) = 1 − F(−t; ν, −δ) for t < 0. The weights are computed in log space, and I_x is
//! statrs' regularised incomplete beta. It agrees with `scipy.stats.nct.cdf` to 1e-12 absolute on
//! a 140-point grid (prelude/tests/analysis_stats.rs). The usual normal approximation
//! n = (z₁₋α/₂ + z₁₋β)² σ²/Δ² is no substitute at the seed counts that matter here: it puts the
//! smallest effect detectable at 80 % with 3 seeds at 1.62 SD (exact: 3.26) and with 8 at 0.99 SD
//! (exact: 1.16), which is why the exact distribution is worth its thirty lines.

use std::fmt;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use statrs::distribution::{Continuous, ContinuousCDF, Normal, StudentsT};
use statrs::function::beta::beta_reg;
use statrs::function::gamma::ln_gamma;

use crate::error::{PivotError, Result};
use crate::plot::html::grid_table;
use crate::plot::{Figure, ForestPlot, ForestRow};
use crate::runtime::{MimeBundle, Rich};

/// Knobs of an analysis; the defaults are the study's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StudyOptions {
    /// Family-wise error rate; the plain intervals are at 1 − α.
    pub alpha: f64,
    /// Bootstrap resamples B.
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap's ChaCha8 stream. Every measure of a table uses the same stream, so
    /// resample b draws the same seeds for every measure (the seeds are resampled jointly).
    pub bootstrap_seed: u64,
}

impl Default for StudyOptions {
    fn default() -> Self {
        StudyOptions { alpha: 0.05, bootstrap_resamples: 10_000, bootstrap_seed: 0 }
    }
}

impl StudyOptions {
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }
    pub fn bootstrap_resamples(mut self, resamples: usize) -> Self {
        self.bootstrap_resamples = resamples;
        self
    }
    pub fn bootstrap_seed(mut self, seed: u64) -> Self {
        self.bootstrap_seed = seed;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(PivotError::invalid(format!("StudyOptions.alpha must be in (0, 1), got {}", self.alpha)));
        }
        if self.bootstrap_resamples == 0 {
            return Err(PivotError::invalid("StudyOptions.bootstrap_resamples must be at least 1"));
        }
        Ok(())
    }
}

/// One measure on both arms, per seed: `treatment[i]` and `control[i]` come from seed i.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedComparison {
    pub measure: String,
    pub treatment: Vec<f64>,
    pub control: Vec<f64>,
    /// Smallest effect of interest δ > 0 in the measure's units (e.g. the paper's Δ); `None`
    /// skips the equivalence test.
    pub smallest_effect: Option<f64>,
}

impl PairedComparison {
    /// Checks that both arms have the same number (≥ 2) of finite values; errors name the
    /// measure, the arm and the seed index.
    pub fn new(measure: impl Into<String>, treatment: Vec<f64>, control: Vec<f64>) -> Result<Self> {
        let measure = measure.into();
        if treatment.len() != control.len() {
            return Err(PivotError::invalid(format!(
                "measure `{measure}`: {} treatment values but {} control values (one pair per seed)",
                treatment.len(),
                control.len()
            )));
        }
        if treatment.len() < 2 {
            return Err(PivotError::invalid(format!(
                "measure `{measure}`: {} pair(s); a paired comparison needs at least 2 seeds",
                treatment.len()
            )));
        }
        for (arm, values) in [("treatment", &treatment), ("control", &control)] {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(PivotError::invalid(format!("measure `{measure}`: {arm}[{i}] is {}", values[i])));
            }
        }
        Ok(PairedComparison { measure, treatment, control, smallest_effect: None })
    }

    /// Sets the smallest effect of interest δ (> 0, finite).
    pub fn with_smallest_effect(mut self, delta: f64) -> Result<Self> {
        if !(delta > 0.0 && delta.is_finite()) {
            return Err(PivotError::invalid(format!(
                "measure `{}`: the smallest effect of interest must be positive and finite, got {delta}",
                self.measure
            )));
        }
        self.smallest_effect = Some(delta);
        Ok(self)
    }

    pub fn n(&self) -> usize {
        self.treatment.len()
    }

    /// Δᵢ = treatment[i] − control[i].
    pub fn differences(&self) -> Vec<f64> {
        self.treatment.iter().zip(&self.control).map(|(t, c)| t - c).collect()
    }

    /// This measure alone (a family of one: the Holm interval is the plain 1 − α interval).
    pub fn analyse(&self, options: &StudyOptions) -> Result<MeasureResult> {
        let table = StudyTable::new(vec![self.clone()], options)?;
        Ok(table.results.into_iter().next().expect("one measure in, one result out"))
    }
}

/// A two-sided confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
    /// Confidence level, e.g. 0.95.
    pub level: f64,
}

impl Interval {
    /// Entirely above `x` (strictly).
    pub fn above(&self, x: f64) -> bool {
        self.lower > x
    }
    /// Entirely below `x` (strictly).
    pub fn below(&self, x: f64) -> bool {
        self.upper < x
    }
    pub fn contains(&self, x: f64) -> bool {
        self.lower <= x && x <= self.upper
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", signed(self.lower), signed(self.upper))
    }
}

/// Which computation gave a Wilcoxon p (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WilcoxonMethod {
    /// Exact null distribution of the signed-rank sum (n ≤ 50, no ties, no zeros).
    Exact,
    /// Exact distribution over all 2ⁿ sign flips of the tie-averaged ranks (ties or zeros,
    /// n ≤ 13): scipy's `PermutationMethod`, which is exhaustive at that size.
    ExactSignFlip,
    /// Normal approximation with tie correction, zeros dropped, no continuity correction.
    Normal,
}

impl fmt::Display for WilcoxonMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WilcoxonMethod::Exact => "exact",
            WilcoxonMethod::ExactSignFlip => "exact sign-flip",
            WilcoxonMethod::Normal => "normal approx.",
        })
    }
}

/// Wilcoxon signed-rank test of the differences against 0, two-sided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wilcoxon {
    /// min(R⁺, R⁻), as scipy reports it for the two-sided test.
    pub statistic: f64,
    pub p: f64,
    pub method: WilcoxonMethod,
}

/// Wilcoxon signed-rank test of `differences` against 0 with scipy 1.17's defaults.
pub fn wilcoxon_signed_rank(differences: &[f64]) -> Wilcoxon {
    let n = differences.len();
    let nonzero: Vec<f64> = differences.iter().copied().filter(|d| *d != 0.0).collect();
    let has_zeros = nonzero.len() < n;
    let (doubled_ranks, tie_sizes) = doubled_average_ranks(&nonzero);
    let has_ties = tie_sizes.iter().any(|&t| t > 1);
    let doubled_r_plus: u64 = nonzero.iter().zip(&doubled_ranks).filter(|(d, _)| **d > 0.0).map(|(_, r)| r).sum();
    let doubled_total: u64 = doubled_ranks.iter().sum();
    let r_plus = doubled_r_plus as f64 / 2.0;
    let r_minus = (doubled_total - doubled_r_plus) as f64 / 2.0;
    let statistic = r_plus.min(r_minus);

    let method = if n > 50 {
        WilcoxonMethod::Normal
    } else if !has_ties && !has_zeros {
        WilcoxonMethod::Exact
    } else if n <= 13 {
        WilcoxonMethod::ExactSignFlip
    } else {
        WilcoxonMethod::Normal
    };
    if nonzero.is_empty() {
        return Wilcoxon { statistic, p: 1.0, method };
    }
    let p = match method {
        WilcoxonMethod::Exact | WilcoxonMethod::ExactSignFlip => {
            // counts[s] = number of sign patterns whose positive ranks sum to s (doubled ranks).
            let mut counts = vec![0u64; doubled_total as usize + 1];
            counts[0] = 1;
            let mut reach = 0usize;
            for &r in &doubled_ranks {
                let r = r as usize;
                for s in (0..=reach).rev() {
                    counts[s + r] += counts[s];
                }
                reach += r;
            }
            let at_most: u64 = counts[..=doubled_r_plus as usize].iter().sum();
            let at_least: u64 = counts[doubled_r_plus as usize..].iter().sum();
            let total = (1u64 << nonzero.len()) as f64;
            (2.0 * at_most.min(at_least) as f64 / total).min(1.0)
        }
        WilcoxonMethod::Normal => {
            let m = nonzero.len() as f64;
            let mean = m * (m + 1.0) / 4.0;
            let tie_term: f64 = tie_sizes.iter().map(|&t| (t * t * t - t) as f64).sum();
            let se = ((m * (m + 1.0) * (2.0 * m + 1.0) - tie_term / 2.0) / 24.0).sqrt();
            let z = (r_plus - mean) / se;
            (2.0 * standard_normal().sf(z.abs())).min(1.0)
        }
    };
    Wilcoxon { statistic, p, method }
}

/// Twice the average ranks of |values| (so ties give integers) and the size of each tie group.
fn doubled_average_ranks(values: &[f64]) -> (Vec<u64>, Vec<u64>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()));
    let mut ranks = vec![0u64; values.len()];
    let mut ties = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]].abs() == values[order[start]].abs() {
            end += 1;
        }
        // Ranks start + 1 ..= end, averaged: (start + 1 + end) / 2, doubled.
        for &i in &order[start..end] {
            ranks[i] = (start + 1 + end) as u64;
        }
        ties.push((end - start) as u64);
        start = end;
    }
    (ranks, ties)
}

/// The resampled means of a percentile bootstrap: `resamples` draws of n indices with
/// replacement from a ChaCha8 stream seeded with `seed`. Indices are drawn by rejection on
/// `next_u64` rather than with `rand`'s `random_range`, whose algorithm may change between rand
/// versions: the same seed gives the same resamples everywhere, for good.
pub fn bootstrap_means(differences: &[f64], resamples: usize, seed: u64) -> Vec<f64> {
    let n = differences.len();
    if n == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n64 = n as u64;
    // Largest multiple of n that fits, minus one: values above it would favour small indices.
    let zone = u64::MAX - (u64::MAX - n64 + 1) % n64;
    (0..resamples)
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..n {
                let index = loop {
                    let v = rng.next_u64();
                    if v <= zone {
                        break (v % n64) as usize;
                    }
                };
                sum += differences[index];
            }
            sum / n as f64
        })
        .collect()
}

/// The q-quantile (0 ≤ q ≤ 1) of `values` by NumPy's default rule (`np.percentile(v, 100 q)`,
/// method "linear"): sort, then interpolate at position q (len − 1).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "percentile of no values");
    assert!((0.0..=1.0).contains(&q), "quantile {q} outside [0, 1]");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let fraction = position - below as f64;
    sorted[below] + fraction * (sorted[above] - sorted[below])
}

/// Holm's step-down adjusted p-values, in input order: with p sorted ascending,
/// p̃₍ᵢ₎ = min(1, maxⱼ≤ᵢ (m − j + 1) p₍ⱼ₎). Equal p-values keep their input order.
pub fn holm_adjust(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let order = ascending_order(p);
    let mut adjusted = vec![0.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

fn ascending_order(p: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    order
}

/// Per measure (input order): its 1-based Holm rank and the α of its Holm-adjusted interval,
/// αᵢ = α / (m − min(i, k*) + 1) (see the module doc).
pub fn holm_interval_alphas(p: &[f64], alpha: f64) -> Vec<(usize, f64)> {
    let m = p.len();
    let order = ascending_order(p);
    let mut result = vec![(0, 0.0); m];
    let mut stop: Option<usize> = None;
    for (index, &i) in order.iter().enumerate() {
        let rank = index + 1;
        if stop.is_none() && p[i] >= alpha / (m - rank + 1) as f64 {
            stop = Some(rank);
        }
        let level_rank = stop.unwrap_or(rank);
        result[i] = (rank, alpha / (m - level_rank + 1) as f64);
    }
    result
}

/// TOST equivalence against ±δ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Equivalence {
    pub smallest_effect: f64,
    /// One-sided t-test p of H₀: Δ ≥ δ.
    pub p_upper: f64,
    /// One-sided t-test p of H₀: Δ ≤ −δ.
    pub p_lower: f64,
}

impl Equivalence {
    /// The TOST p: max of the two one-sided p-values.
    pub fn p(&self) -> f64 {
        self.p_upper.max(self.p_lower)
    }
}

/// The outcome for one measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The Holm-adjusted interval lies above 0.
    Reproduced,
    /// The Holm-adjusted interval lies below 0, or below the smallest effect of interest.
    Contradicted,
    Inconclusive,
}

impl Verdict {
    /// The rule for a Δ with no spread (see the module doc, "Degenerate data"): the sign of `mean`
    /// when the Holm-adjusted sign-flip p is below `alpha`.
    pub fn from_sign_test(mean: f64, wilcoxon_p_holm: f64, alpha: f64) -> Verdict {
        if wilcoxon_p_holm >= alpha || mean == 0.0 {
            Verdict::Inconclusive
        } else if mean > 0.0 {
            Verdict::Reproduced
        } else {
            Verdict::Contradicted
        }
    }

    /// The study's rule on a Holm-adjusted interval (see the module doc).
    pub fn from_interval(interval: &Interval, smallest_effect: Option<f64>) -> Verdict {
        if interval.above(0.0) {
            Verdict::Reproduced
        } else if interval.below(0.0) || smallest_effect.is_some_and(|delta| interval.below(delta)) {
            Verdict::Contradicted
        } else {
            Verdict::Inconclusive
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Reproduced => "reproduced",
            Verdict::Contradicted => "contradicted",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

/// Everything the study reports for one measure.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureResult {
    pub measure: String,
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    /// Paired t statistic (±inf when SD is 0 and Δ ≠ 0).
    pub t: f64,
    /// Paired t-test p, two-sided, unadjusted.
    pub p: f64,
    /// Student t interval of mean Δ at 1 − α.
    pub t_interval: Interval,
    /// Percentile bootstrap interval of mean Δ at 1 − α.
    pub bootstrap_interval: Interval,
    pub bootstrap_resamples: usize,
    pub bootstrap_seed: u64,
    pub wilcoxon: Wilcoxon,
    /// 1-based rank of this measure's p in its family, and the family's size.
    pub holm_rank: usize,
    pub family_size: usize,
    /// Holm-adjusted t-test p.
    pub p_holm: f64,
    /// Holm-adjusted Wilcoxon p (ranked among the family's Wilcoxon p-values).
    pub wilcoxon_p_holm: f64,
    /// t interval at the Holm level 1 − αᵢ; the verdict is read from it.
    pub holm_interval: Interval,
    pub equivalence: Option<Equivalence>,
    pub verdict: Verdict,
}

impl MeasureResult {
    /// Whether the Holm interval lies below the smallest effect of interest (None without one).
    pub fn below_smallest_effect(&self) -> Option<bool> {
        self.equivalence.map(|e| self.holm_interval.below(e.smallest_effect))
    }
}

impl fmt::Display for MeasureResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = |i: &Interval| percent(i.level);
        let rows: Vec<(String, String)> = vec![
            ("measure".into(), format!("{} (n = {} seeds)", self.measure, self.n)),
            ("mean Δ".into(), format!("{} (SD {})", signed(self.mean), sig(self.sd))),
            (format!("{} t CI", level(&self.t_interval)), self.t_interval.to_string()),
            (
                format!("{} bootstrap CI", level(&self.bootstrap_interval)),
                format!(
                    "{} (percentile, B = {}, seed {})",
                    self.bootstrap_interval, self.bootstrap_resamples, self.bootstrap_seed
                ),
            ),
            ("paired t".into(), format!("t = {}, p = {}", sig(self.t), p_value(self.p))),
            (
                "Wilcoxon".into(),
                format!("W = {}, p = {} ({})", self.wilcoxon.statistic, p_value(self.wilcoxon.p), self.wilcoxon.method),
            ),
            (
                "Holm".into(),
                format!(
                    "rank {} of {}: p = {} (Wilcoxon {}), {} CI {}",
                    self.holm_rank,
                    self.family_size,
                    p_value(self.p_holm),
                    p_value(self.wilcoxon_p_holm),
                    level(&self.holm_interval),
                    self.holm_interval
                ),
            ),
            (
                "equivalence".into(),
                match (&self.equivalence, self.below_smallest_effect()) {
                    (Some(e), Some(below)) => format!(
                        "δ = {}: TOST p = {}; Holm CI {} δ",
                        sig(e.smallest_effect),
                        p_value(e.p()),
                        if below { "below" } else { "not below" }
                    ),
                    _ => "no smallest effect of interest given".into(),
                },
            ),
            ("verdict".into(), self.verdict.to_string()),
        ];
        let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
        for (key, value) in rows {
            writeln!(f, "{key:<width$}  {value}")?;
        }
        Ok(())
    }
}

/// The headline measures of a study, analysed together: Holm runs over all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyTable {
    pub alpha: f64,
    /// In the order the comparisons were given.
    pub results: Vec<MeasureResult>,
}

impl StudyTable {
    pub fn new(comparisons: Vec<PairedComparison>, options: &StudyOptions) -> Result<StudyTable> {
        options.validate()?;
        if comparisons.is_empty() {
            return Err(PivotError::invalid("a study table needs at least one measure"));
        }
        for (i, c) in comparisons.iter().enumerate() {
            if comparisons[..i].iter().any(|other| other.measure == c.measure) {
                return Err(PivotError::invalid(format!("measure `{}` appears twice in the study table", c.measure)));
            }
        }
        let alpha = options.alpha;
        let summaries: Vec<Summary> = comparisons.iter().map(|c| Summary::of(&c.differences())).collect();
        let p: Vec<f64> = summaries.iter().map(|s| s.p).collect();
        let wilcoxon: Vec<Wilcoxon> = comparisons.iter().map(|c| wilcoxon_signed_rank(&c.differences())).collect();
        let p_holm = holm_adjust(&p);
        let wilcoxon_p_holm = holm_adjust(&wilcoxon.iter().map(|w| w.p).collect::<Vec<_>>());
        let holm_alphas = holm_interval_alphas(&p, alpha);

        let results = comparisons
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let s = &summaries[i];
                let differences = c.differences();
                let means = bootstrap_means(&differences, options.bootstrap_resamples, options.bootstrap_seed);
                let bootstrap_interval = Interval {
                    lower: percentile(&means, alpha / 2.0),
                    upper: percentile(&means, 1.0 - alpha / 2.0),
                    level: 1.0 - alpha,
                };
                let (holm_rank, holm_alpha) = holm_alphas[i];
                let holm_interval = s.t_interval(holm_alpha);
                let equivalence = c.smallest_effect.map(|delta| s.equivalence(delta));
                MeasureResult {
                    measure: c.measure.clone(),
                    n: s.n,
                    mean: s.mean,
                    sd: s.sd,
                    t: s.t,
                    p: s.p,
                    t_interval: s.t_interval(alpha),
                    bootstrap_interval,
                    bootstrap_resamples: options.bootstrap_resamples,
                    bootstrap_seed: options.bootstrap_seed,
                    wilcoxon: wilcoxon[i],
                    holm_rank,
                    family_size: comparisons.len(),
                    p_holm: p_holm[i],
                    wilcoxon_p_holm: wilcoxon_p_holm[i],
                    holm_interval,
                    equivalence,
                    verdict: if s.sd == 0.0 {
                        Verdict::from_sign_test(s.mean, wilcoxon_p_holm[i], alpha)
                    } else {
                        Verdict::from_interval(&holm_interval, c.smallest_effect)
                    },
                }
            })
            .collect();
        Ok(StudyTable { alpha, results })
    }

    pub fn get(&self, measure: &str) -> Option<&MeasureResult> {
        self.results.iter().find(|r| r.measure == measure)
    }
}

impl fmt::Display for StudyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = percent(1.0 - self.alpha);
        let header: Vec<String> = [
            "measure".to_string(),
            "n".into(),
            "mean Δ".into(),
            "SD".into(),
            format!("{level} t CI"),
            format!("{level} boot CI"),
            "p (t)".into(),
            "p (W)".into(),
            "p Holm".into(),
            "Holm CI".into(),
            "verdict".into(),
        ]
        .into();
        let rows: Vec<Vec<String>> = self
            .results
            .iter()
            .map(|r| {
                let below = if r.below_smallest_effect() == Some(true) && r.verdict == Verdict::Reproduced {
                    " (< δ)"
                } else {
                    ""
                };
                vec![
                    r.measure.clone(),
                    r.n.to_string(),
                    signed(r.mean),
                    sig(r.sd),
                    r.t_interval.to_string(),
                    r.bootstrap_interval.to_string(),
                    p_value(r.p),
                    p_value(r.wilcoxon.p),
                    p_value(r.p_holm),
                    format!("{} {}", percent(r.holm_interval.level), r.holm_interval),
                    format!("{}{below}", r.verdict),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).chain([header[c].chars().count()]).max().unwrap_or(0))
            .collect();
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, &w))| {
                    let pad = w - cell.chars().count();
                    // Text columns left-aligned, numbers right-aligned.
                    if c == 0 || c == cells.len() - 1 {
                        format!("{cell}{}", " ".repeat(pad))
                    } else {
                        format!("{}{cell}", " ".repeat(pad))
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(f, "{}", line(&header))?;
        writeln!(f, "{}", widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("  "))?;
        for row in &rows {
            writeln!(f, "{}", line(row))?;
        }
        if let Some(note) = self.method_note() {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

/// Verdict colours of the forest plot: green, red, grey.
fn verdict_rgb(verdict: Verdict) -> [u8; 3] {
    match verdict {
        Verdict::Reproduced => [44, 160, 44],
        Verdict::Contradicted => [214, 39, 40],
        Verdict::Inconclusive => [127, 127, 127],
    }
}

impl StudyTable {
    /// One sentence on how every number was computed (printed under the table).
    fn method_note(&self) -> Option<String> {
        let first = self.results.first()?;
        Some(format!(
            "Δ = treatment − control per seed; paired t-test; Wilcoxon signed-rank (scipy defaults); percentile \
             bootstrap (B = {}, seed {}); Holm over {} measures at α = {}; verdict from the Holm CI.",
            first.bootstrap_resamples,
            first.bootstrap_seed,
            self.results.len(),
            self.alpha
        ))
    }

    /// The table as HTML: measure, n, mean Δ, t / bootstrap / Holm-adjusted intervals, the three
    /// p-values and the verdict, with the method note underneath.
    pub fn to_html(&self) -> String {
        let level = percent(1.0 - self.alpha);
        let header: Vec<String> = [
            "measure".to_string(),
            "n".into(),
            "mean Δ".into(),
            format!("{level} t CI"),
            format!("{level} bootstrap CI"),
            "Holm-adjusted CI".into(),
            "paired t p".into(),
            "Wilcoxon p".into(),
            "Holm p".into(),
            "verdict".into(),
        ]
        .into();
        let rows: Vec<Vec<String>> = self
            .results
            .iter()
            .map(|r| {
                let below = if r.below_smallest_effect() == Some(true) && r.verdict == Verdict::Reproduced { " (< δ)" } else { "" };
                vec![
                    r.measure.clone(),
                    r.n.to_string(),
                    signed(r.mean),
                    r.t_interval.to_string(),
                    r.bootstrap_interval.to_string(),
                    format!("{} ({})", r.holm_interval, percent(r.holm_interval.level)),
                    p_value(r.p),
                    p_value(r.wilcoxon.p),
                    p_value(r.p_holm),
                    format!("{}{below}", r.verdict),
                ]
            })
            .collect();
        grid_table("Study: treatment − control per measure", &header, &rows, self.method_note().as_deref())
    }

    /// Forest plot, one row per measure: mean Δ (point), the Holm-adjusted interval (bar, coloured
    /// by verdict), the 1 − α t interval (thin line), 0 (vertical line) and the smallest effect of
    /// interest where one was given (mark). All measures share one x axis.
    pub fn forest_plot(&self) -> Result<Figure> {
        let level = percent(1.0 - self.alpha);
        let mut plot = ForestPlot::new(
            format!("Δ per measure (Holm over {}, α = {})", self.results.len(), self.alpha),
            "Δ = treatment − control",
        )
        .legend("mean Δ", "Holm-adjusted t CI", format!("{level} t CI"), "smallest effect of interest");
        for r in &self.results {
            let mut row = ForestRow::new(r.measure.clone(), r.mean, (r.holm_interval.lower, r.holm_interval.upper))
                .line(r.t_interval.lower, r.t_interval.upper)
                .note(r.verdict.to_string())
                .color(verdict_rgb(r.verdict));
            if let Some(e) = &r.equivalence {
                row = row.mark(e.smallest_effect);
            }
            plot = plot.row(row);
        }
        plot.render()
    }
}

impl Rich for StudyTable {
    /// Text table, and HTML: the table with the forest plot under it. No separate PNG: a frontend
    /// that shows images (the REPL) would show the plot instead of the table; the REPL gets the
    /// plot from [`StudyTable::forest_plot`].
    fn mime_bundle(&self) -> MimeBundle {
        let bundle = MimeBundle::text(self.to_string());
        match self.forest_plot() {
            Ok(fig) => bundle.with_html(format!("{}{}", self.to_html(), fig.to_html())),
            Err(_) => bundle.with_html(self.to_html()),
        }
    }
}

/// Mean, SD and paired t-test of one measure's differences.
struct Summary {
    n: usize,
    mean: f64,
    sd: f64,
    /// Standard error sd / √n.
    se: f64,
    t: f64,
    p: f64,
    t_dist: StudentsT,
}

impl Summary {
    fn of(differences: &[f64]) -> Summary {
        let n = differences.len();
        let constant = differences.iter().all(|&d| (d - differences[0]).abs() <= 1e-9 * differences[0].abs());
        // A constant Δ is reported exactly: summing n copies and dividing can be off by an ulp,
        // which would turn SD 0 into SD 1e-17 and t into a meaningless 1e15.
        let (mean, sd) = if constant {
            (differences[0], 0.0)
        } else {
            let mean = differences.iter().sum::<f64>() / n as f64;
            let ss: f64 = differences.iter().map(|d| (d - mean) * (d - mean)).sum();
            (mean, (ss / (n - 1) as f64).sqrt())
        };
        let se = sd / (n as f64).sqrt();
        let t = ratio(mean, se);
        let t_dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).expect("n ≥ 2 gives df ≥ 1");
        let p = (2.0 * t_dist.sf(t.abs())).min(1.0);
        Summary { n, mean, sd, se, t, p, t_dist }
    }

    /// Two-sided t interval at 1 − alpha.
    fn t_interval(&self, alpha: f64) -> Interval {
        let half = if self.se == 0.0 { 0.0 } else { t_upper_quantile(&self.t_dist, alpha / 2.0) * self.se };
        Interval { lower: self.mean - half, upper: self.mean + half, level: 1.0 - alpha }
    }

    fn equivalence(&self, delta: f64) -> Equivalence {
        Equivalence {
            smallest_effect: delta,
            p_upper: self.t_dist.cdf(ratio(self.mean - delta, self.se)),
            p_lower: self.t_dist.sf(ratio(self.mean + delta, self.se)),
        }
    }
}

/// a / b for a standard error b ≥ 0, with the limits for b = 0 (±inf, or 0 when a = 0 too).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else if a == 0.0 {
        0.0
    } else {
        a.signum() * f64::INFINITY
    }
}

/// x with P(T > x) = q (0 < q ≤ ½). statrs' inverse goes through an inverse incomplete beta
/// good to about 1e-9; two Newton steps on the survival function bring it to rounding error.
fn t_upper_quantile(t: &StudentsT, q: f64) -> f64 {
    let mut x = t.inverse_cdf(1.0 - q);
    for _ in 0..3 {
        let density = t.pdf(x);
        if !(density > 0.0) {
            break;
        }
        x += (t.sf(x) - q) / density;
    }
    x
}

fn standard_normal() -> Normal {
    Normal::new(0.0, 1.0).expect("standard normal")
}

/// CDF of the noncentral t distribution with `df` degrees of freedom and noncentrality `nc`
/// (Lenth's AS 243 series; see the module doc). About 1e-12 absolute against scipy.
pub fn noncentral_t_cdf(t: f64, df: f64, nc: f64) -> f64 {
    assert!(df > 0.0, "noncentral t needs df > 0, got {df}");
    if t.is_nan() || nc.is_nan() {
        return f64::NAN;
    }
    if t < 0.0 {
        return (1.0 - nct_cdf_nonnegative(-t, df, -nc)).clamp(0.0, 1.0);
    }
    nct_cdf_nonnegative(t, df, nc).clamp(0.0, 1.0)
}

fn nct_cdf_nonnegative(t: f64, df: f64, nc: f64) -> f64 {
    let base = standard_normal().sf(nc);
    if t == 0.0 {
        return base;
    }
    if t.is_infinite() {
        return 1.0;
    }
    let x = t * t / (t * t + df);
    let half_df = df / 2.0;
    let lambda = nc * nc / 2.0;
    if lambda == 0.0 {
        return base + 0.5 * beta_reg(0.5, half_df, x);
    }
    let ln_lambda = lambda.ln();
    let ln_abs_nc = nc.abs().ln();
    let sign = nc.signum();
    let mut sum = 0.0;
    // Poisson-weighted terms; past the mode the weights fall at least geometrically, so stopping
    // once they are below 1e-20 leaves a tail far below double precision.
    let max_terms = (lambda + 50.0 * lambda.sqrt() + 200.0) as usize;
    for j in 0..max_terms {
        let j = j as f64;
        let ln_weight = -lambda + j * ln_lambda;
        let p = (ln_weight - ln_gamma(j + 1.0)).exp();
        let q = sign * (ln_abs_nc + ln_weight - 0.5 * std::f64::consts::LN_2 - ln_gamma(j + 1.5)).exp();
        sum += p * beta_reg(j + 0.5, half_df, x) + q * beta_reg(j + 1.0, half_df, x);
        if j > lambda && p.max(q.abs()) < 1e-20 {
            break;
        }
    }
    base + 0.5 * sum
}

/// Power calculations for the two-sided paired t-test (exact, noncentral t).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedTPower {
    /// Two-sided significance level (0.05), or the Holm level of the measure being planned.
    pub alpha: f64,
    /// Target power (0.8).
    pub power: f64,
}

impl Default for PairedTPower {
    fn default() -> Self {
        PairedTPower { alpha: 0.05, power: 0.8 }
    }
}

impl PairedTPower {
    fn validate(&self) -> Result<()> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(PivotError::invalid(format!("PairedTPower.alpha must be in (0, 1), got {}", self.alpha)));
        }
        if !(self.power > self.alpha && self.power < 1.0) {
            return Err(PivotError::invalid(format!("PairedTPower.power must be in (alpha, 1), got {}", self.power)));
        }
        Ok(())
    }

    /// Probability that the test rejects with n pairs when the true mean Δ is `d` SDs (Cohen's
    /// d_z = Δ / SD(Δ)): P(T' > t_c) + P(T' < −t_c), T' noncentral t(n − 1, d √n).
    pub fn power_at(&self, d: f64, n: usize) -> f64 {
        assert!(n >= 2, "power of a paired t-test needs n ≥ 2, got {n}");
        let df = (n - 1) as f64;
        let t_dist = StudentsT::new(0.0, 1.0, df).expect("df ≥ 1");
        let critical = t_upper_quantile(&t_dist, self.alpha / 2.0);
        let nc = d * (n as f64).sqrt();
        (1.0 - noncentral_t_cdf(critical, df, nc)) + noncentral_t_cdf(-critical, df, nc)
    }

    /// Smallest standardised effect d_z detectable with n pairs at the target power.
    pub fn detectable_d(&self, n: usize) -> Result<f64> {
        self.validate()?;
        if n < 2 {
            return Err(PivotError::invalid(format!("a paired t-test needs n ≥ 2 pairs, got {n}")));
        }
        // Power rises with d from alpha (d = 0) to 1: bracket, then bisect.
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        while self.power_at(hi, n) < self.power {
            lo = hi;
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if self.power_at(mid, n) < self.power {
                lo = mid;
            } else {
                hi = mid;
            }
            if hi - lo <= 1e-12 * hi {
                break;
            }
        }
        Ok(0.5 * (lo + hi))
    }

    /// Smallest true mean Δ (in the measure's units) detectable with n pairs, given the SD of Δ
    /// from a pilot: `detectable_d(n) × pilot_sd`.
    pub fn detectable_effect(&self, pilot_sd: f64, n: usize) -> Result<f64> {
        check_sd(pilot_sd)?;
        Ok(self.detectable_d(n)? * pilot_sd)
    }

    /// Smallest number of pairs (seeds) whose power reaches the target for a true mean Δ of
    /// `effect` with SD `pilot_sd`.
    pub fn pairs_needed(&self, effect: f64, pilot_sd: f64) -> Result<usize> {
        self.validate()?;
        check_sd(pilot_sd)?;
        if !(effect.is_finite() && effect != 0.0) {
            return Err(PivotError::invalid(format!("the effect to detect must be finite and non-zero, got {effect}")));
        }
        let d = effect.abs() / pilot_sd;
        const LIMIT: usize = 1 << 40;
        // Power rises with n: double until reached, then bisect on the integers.
        let (mut lo, mut hi) = (1usize, 2usize);
        while self.power_at(d, hi) < self.power {
            lo = hi;
            hi *= 2;
            if hi > LIMIT {
                return Err(PivotError::invalid(format!(
                    "an effect of {effect} with SD {pilot_sd} (d = {d:.3e}) needs more than 2^40 pairs"
                )));
            }
        }
        // Invariant: power(lo) < target (or lo = 1, no test), power(hi) ≥ target.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.power_at(d, mid) < self.power {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(hi)
    }
}

fn check_sd(sd: f64) -> Result<()> {
    if sd > 0.0 && sd.is_finite() {
        Ok(())
    } else {
        Err(PivotError::invalid(format!("the pilot SD of Δ must be positive and finite, got {sd}")))
    }
}

/// Four significant digits with an explicit sign (measures range from 0.0017 to 0.3).
fn signed(x: f64) -> String {
    let s = sig(x);
    if x >= 0.0 && !s.starts_with('+') { format!("+{s}") } else { s }
}

fn sig(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let magnitude = x.abs().log10().floor() as i32;
    if !(-6..6).contains(&magnitude) {
        return format!("{x:.3e}");
    }
    let decimals = (3 - magnitude).max(0) as usize;
    format!("{x:.decimals$}")
}

fn p_value(p: f64) -> String {
    if p < 1e-4 { format!("{p:.1e}") } else { format!("{p:.4}") }
}

fn percent(level: f64) -> String {
    let s = format!("{:.4}", level * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} %")
}
