//! Study statistics (analysis/stats.rs) against scipy 1.17 (tests/python/ref_stats.py: ttest_rel,
//! t.interval, wilcoxon, ttest_1samp, nct, numpy.percentile, Holm by hand), plus the edge cases
//! scipy answers with NaN. Costs about 2 s, most of it the Python start and scipy import.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use pivot::prelude::*;
use serde_json::Value;

fn reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let py = std::env::var("PIVOT_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/ref_stats.py");
        let out = Command::new(&py).arg(&script).output().unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); set PIVOT_PYTHON or `make pydeps` (scipy comes with scikit-learn)",
                py.display()
            )
        });
        assert!(out.status.success(), "ref_stats.py failed (needs scipy):\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("ref_stats.py prints JSON")
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(f).collect()
}

#[track_caller]
fn close(ours: f64, theirs: f64, rel: f64, what: &str) {
    let tol = rel * theirs.abs().max(1e-300);
    assert!((ours - theirs).abs() <= tol, "{what}: ours {ours:e}, scipy {theirs:e} (rel tol {rel:e})");
}

fn comparison(row: &Value) -> PairedComparison {
    let c = PairedComparison::new(row["name"].as_str().unwrap(), floats(&row["dpo"]), floats(&row["sft"])).unwrap();
    match row["smallest_effect"].as_f64() {
        Some(delta) => c.with_smallest_effect(delta).unwrap(),
        None => c,
    }
}

#[test]
fn paired_measures_match_scipy() {
    let r = reference();
    assert_eq!(r["versions"]["scipy"], "1.17.1", "references were checked against scipy 1.17.1");
    for row in r["paired"].as_array().unwrap() {
        let name = row["name"].as_str().unwrap();
        let res = comparison(row).analyse(&StudyOptions::default()).unwrap();
        close(res.mean, f(&row["mean"]), 1e-12, &format!("{name} mean"));
        close(res.sd, f(&row["sd"]), 1e-12, &format!("{name} sd"));
        close(res.t, f(&row["t"]), 1e-10, &format!("{name} t"));
        close(res.p, f(&row["p"]), 1e-9, &format!("{name} ttest_rel p"));
        let ci = floats(&row["t_interval"]);
        let scale = ci[1] - ci[0];
        for (ours, theirs, side) in [(res.t_interval.lower, ci[0], "lower"), (res.t_interval.upper, ci[1], "upper")] {
            assert!((ours - theirs).abs() <= 1e-12 * scale, "{name} t.interval {side}: {ours} vs {theirs}");
        }
        assert_eq!(res.t_interval.level, 0.95);
        assert_eq!(res.wilcoxon.statistic, f(&row["wilcoxon_statistic"]), "{name} Wilcoxon statistic");
        // Exact modes are integer counts (1e-12); the normal mode goes through statrs' erfc,
        // which is good to about 5e-11 relative.
        let tol = if res.wilcoxon.method == WilcoxonMethod::Normal { 1e-9 } else { 1e-12 };
        close(res.wilcoxon.p, f(&row["wilcoxon_p"]), tol, &format!("{name} wilcoxon p"));
        let expected_method = match row["wilcoxon_mode"].as_str().unwrap() {
            "exact" => WilcoxonMethod::Exact,
            "permutation" => WilcoxonMethod::ExactSignFlip,
            "asymptotic" => WilcoxonMethod::Normal,
            other => panic!("unknown mode {other}"),
        };
        assert_eq!(res.wilcoxon.method, expected_method, "{name}: scipy's method='auto' took {expected_method}");
        match &res.equivalence {
            Some(e) => {
                close(e.p_upper, f(&row["tost_p_upper"]), 1e-9, &format!("{name} TOST upper"));
                close(e.p_lower, f(&row["tost_p_lower"]), 1e-9, &format!("{name} TOST lower"));
            }
            None => assert!(row["smallest_effect"].is_null(), "{name}: equivalence missing"),
        }
        // A family of one: the Holm interval is the plain one.
        assert_eq!((res.holm_rank, res.family_size), (1, 1));
        assert_eq!(res.p_holm, res.p);
        assert_eq!(res.holm_interval, res.t_interval);
    }
}

#[test]
fn holm_family_matches_holm_by_hand() {
    let r = reference();
    let names: Vec<&str> = r["family"]["names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let rows = r["paired"].as_array().unwrap();
    let comparisons: Vec<PairedComparison> =
        names.iter().map(|n| comparison(rows.iter().find(|row| row["name"] == *n).unwrap())).collect();
    let table = StudyTable::new(comparisons, &StudyOptions::default()).unwrap();
    for (m, res) in r["family"]["measures"].as_array().unwrap().iter().zip(&table.results) {
        let name = m["name"].as_str().unwrap();
        assert_eq!(res.measure, name);
        close(res.p_holm, f(&m["p_holm"]), 1e-9, &format!("{name} Holm p"));
        close(res.wilcoxon_p_holm, f(&m["wilcoxon_p_holm"]), 1e-9, &format!("{name} Holm Wilcoxon p"));
        assert_eq!(res.holm_rank as u64, m["rank"].as_u64().unwrap(), "{name} rank");
        assert_eq!(res.family_size, 5);
        close(1.0 - res.holm_interval.level, f(&m["alpha"]), 1e-12, &format!("{name} Holm level"));
        let ci = floats(&m["holm_interval"]);
        let scale = ci[1] - ci[0];
        assert!((res.holm_interval.lower - ci[0]).abs() <= 1e-12 * scale, "{name} Holm CI lower");
        assert!((res.holm_interval.upper - ci[1]).abs() <= 1e-12 * scale, "{name} Holm CI upper");
        // The construction's promise: the interval excludes 0 exactly when the adjusted p < α.
        let excludes_zero = res.holm_interval.above(0.0) || res.holm_interval.below(0.0);
        assert_eq!(excludes_zero, res.p_holm < 0.05, "{name}: Holm CI and Holm p disagree");
    }
    // n8 (p 0.0083 < 0.05/5) is reproduced; Holm stops at `negative` (p 0.022 ≥ 0.05/4), so every
    // later rank keeps level 1 − 0.05/4. `negative`'s Holm CI [−0.096, +0.0081] reaches above 0
    // but stays below δ = 0.01, as does normal_n60's [−0.0020, +0.0098]: contradicted by the
    // smallest-effect rule; n3 and n2 are too wide to say anything.
    let verdicts: Vec<Verdict> = table.results.iter().map(|r| r.verdict).collect();
    use Verdict::*;
    assert_eq!(verdicts, [Reproduced, Inconclusive, Contradicted, Inconclusive, Contradicted]);
    assert_eq!(table.get("negative").unwrap().below_smallest_effect(), Some(true));
    let shown = table.to_string();
    assert_eq!(shown.lines().count(), 2 + 5 + 1, "header, rule, 5 rows, footnote:\n{shown}");
    assert!(shown.contains("98.75 % [") && shown.contains("reproduced") && !shown.contains("NaN"), "{shown}");
}

#[test]
fn holm_adjustment_and_levels_match_by_hand() {
    for case in reference()["holm_examples"].as_array().unwrap() {
        let p = floats(&case[0]);
        let adjusted = holm_adjust(&p);
        for (ours, theirs) in adjusted.iter().zip(floats(&case[1])) {
            close(*ours, theirs, 1e-15, &format!("Holm p of {p:?}"));
        }
        let alphas: Vec<f64> = holm_interval_alphas(&p, 0.05).into_iter().map(|(_, a)| a).collect();
        for (ours, theirs) in alphas.iter().zip(floats(&case[2])) {
            close(*ours, theirs, 1e-15, &format!("Holm levels of {p:?}"));
        }
    }
    // The case the module doc names: p = (0.03, 0.04). The textbook level for rank 2 would be
    // 0.05, whose interval excludes 0 while the adjusted p is 0.06; the held level is 0.025.
    assert_eq!(holm_adjust(&[0.03, 0.04]), [0.06, 0.06]);
    assert_eq!(holm_interval_alphas(&[0.03, 0.04], 0.05), [(1, 0.025), (2, 0.025)]);
    assert_eq!(holm_interval_alphas(&[0.02, 0.001], 0.05), [(2, 0.05), (1, 0.025)]);
}

#[test]
fn noncentral_t_matches_scipy_nct() {
    let cases = reference()["nct_cdf"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let (t, df, nc, expected) = (f(&c[0]), f(&c[1]), f(&c[2]), f(&c[3]));
        let ours = noncentral_t_cdf(t, df, nc);
        assert!((ours - expected).abs() <= 1e-10, "nct.cdf({t}, {df}, {nc}): ours {ours:e}, scipy {expected:e}");
    }
}

#[test]
fn power_matches_scipy_and_the_study_power_note() {
    let r = reference();
    let plan = PairedTPower::default();
    for c in r["power"].as_array().unwrap() {
        let (d, n) = (f(&c[0]), c[1].as_u64().unwrap() as usize);
        close(plan.power_at(d, n), f(&c[2]), 1e-9, &format!("power d = {d}, n = {n}"));
    }
    for c in r["detectable_d"].as_array().unwrap() {
        let n = c[0].as_u64().unwrap() as usize;
        close(plan.detectable_d(n).unwrap(), f(&c[1]), 1e-9, &format!("detectable d at n = {n}"));
    }
    for c in r["pairs_needed"].as_array().unwrap() {
        let d = f(&c[0]);
        assert_eq!(plan.pairs_needed(d * 0.01, 0.01).unwrap() as u64, c[1].as_u64().unwrap(), "n for d = {d}");
    }
    // shared/reference/study-power.md: at n = 3 the smallest effect detectable at 80 % is about
    // 3.25 SD, at n = 8 about 1.16 SD; d = 0.85 needs 13 seeds, d = 1.5 needs 6.
    assert!((plan.detectable_d(3).unwrap() - 3.25).abs() < 0.02);
    close(plan.detectable_effect(0.01, 8).unwrap(), 0.01156, 1e-3, "n = 8, SD 0.01");
    assert_eq!(plan.pairs_needed(0.0017, 0.0020).unwrap(), 13);
    assert_eq!(plan.pairs_needed(-0.01, 0.0067).unwrap(), 6, "the sign of the effect does not matter");
    assert!(plan.detectable_effect(0.0, 8).is_err());
    assert!(plan.pairs_needed(0.0, 0.01).is_err());
    assert!(plan.detectable_d(1).is_err());
}

#[test]
fn percentile_is_numpys_linear_rule() {
    let r = reference();
    let values = floats(&r["percentile_values"]);
    for c in r["percentiles"].as_array().unwrap() {
        close(percentile(&values, f(&c[0])), f(&c[1]), 1e-15, &format!("percentile {}", f(&c[0])));
    }
}

#[test]
fn bootstrap_is_seeded_and_the_interval_is_its_percentiles() {
    let c = PairedComparison::new(
        "probe",
        vec![0.61, 0.58, 0.64, 0.60, 0.66, 0.59],
        vec![0.60, 0.57, 0.61, 0.61, 0.62, 0.58],
    )
    .unwrap();
    let d = c.differences();
    let options = StudyOptions::default().bootstrap_resamples(2_000).bootstrap_seed(7);
    let res = c.analyse(&options).unwrap();
    let means = bootstrap_means(&d, 2_000, 7);
    assert_eq!(means.len(), 2_000);
    assert_eq!(means, bootstrap_means(&d, 2_000, 7), "same seed, same resamples");
    assert_ne!(means, bootstrap_means(&d, 2_000, 8), "another seed, other resamples");
    assert_eq!(res.bootstrap_interval.lower, percentile(&means, 0.025));
    assert_eq!(res.bootstrap_interval.upper, percentile(&means, 0.975));
    assert_eq!((res.bootstrap_resamples, res.bootstrap_seed), (2_000, 7));
    let (min, max) = d.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(min <= res.bootstrap_interval.lower && res.bootstrap_interval.upper <= max);
    assert!(res.bootstrap_interval.contains(res.mean));
    // The resampled means average to the sample mean (their expectation), within 3 standard errors.
    let spread = res.sd / (d.len() as f64).sqrt() / (2_000f64).sqrt();
    let average = means.iter().sum::<f64>() / means.len() as f64;
    assert!((average - res.mean).abs() < 3.0 * spread, "{average} vs {}", res.mean);
    // n = 2: a resample mean is one of the two values or their midpoint, each index fair.
    let two = bootstrap_means(&[0.0, 1.0], 4_000, 1);
    assert!(two.iter().all(|&m| m == 0.0 || m == 0.5 || m == 1.0));
    let ones = two.iter().filter(|&&m| m == 1.0).count();
    assert!((850..1150).contains(&ones), "P(both draws = index 1) = 1/4, got {ones} of 4000");
}

#[test]
fn constant_and_zero_differences_give_clear_results() {
    let options = StudyOptions::default().bootstrap_resamples(500);
    // Δ = +0.125 on every seed (dyadic, so exactly constant): SD 0, t = +inf, p = 0 (scipy's
    // ttest_rel: inf, 0.0), intervals collapse to the point; Wilcoxon: three tied ranks, all
    // 8 sign flips → p = 2/8 (scipy: 0.25).
    let up = PairedComparison::new("constant", vec![0.625, 0.375, 0.875], vec![0.5, 0.25, 0.75]).unwrap();
    let res = up.analyse(&options).unwrap();
    assert_eq!((res.mean, res.sd, res.t, res.p), (0.125, 0.0, f64::INFINITY, 0.0));
    assert_eq!((res.t_interval.lower, res.t_interval.upper), (0.125, 0.125));
    assert_eq!((res.bootstrap_interval.lower, res.bootstrap_interval.upper), (0.125, 0.125));
    assert_eq!((res.wilcoxon.p, res.wilcoxon.method), (0.25, WilcoxonMethod::ExactSignFlip));
    // No spread: the collapsed interval says nothing, the sign-flip p (0.25) decides.
    assert_eq!(res.verdict, Verdict::Inconclusive);
    let down = PairedComparison::new("constant down", vec![0.5, 0.25, 0.75], vec![0.625, 0.375, 0.875]).unwrap();
    assert_eq!(down.analyse(&options).unwrap().verdict, Verdict::Inconclusive);
    // Six seeds all on one side: p = 2/64 < 0.05.
    let six_up = PairedComparison::new("constant, n = 6", vec![0.625; 6], vec![0.5; 6]).unwrap();
    assert_eq!(six_up.analyse(&options).unwrap().verdict, Verdict::Reproduced);
    let six_down = PairedComparison::new("constant down, n = 6", vec![0.5; 6], vec![0.625; 6]).unwrap();
    assert_eq!(six_down.analyse(&options).unwrap().verdict, Verdict::Contradicted);
    // A quantised measure (mutual k-NN in steps of 1/1280): the same +1 step on two seeds differs
    // from itself by rounding only (SD 1e-17 before), which made t ≈ 1e14 and the verdict
    // "reproduced" on n = 2. Now the spread counts as zero and the verdict is inconclusive.
    let step = PairedComparison::new("mutual k-NN", vec![0.1 + 1.0 / 1280.0, 0.3 + 1.0 / 1280.0], vec![0.1, 0.3]).unwrap();
    let res = step.analyse(&options).unwrap();
    assert_eq!(res.sd, 0.0);
    assert_eq!(res.verdict, Verdict::Inconclusive);

    // Δ = 0 on every seed: scipy gives NaN for both tests; here p = 1, the interval is [0, 0],
    // and the verdict is inconclusive — or contradicted once a smallest effect is given.
    let zero = PairedComparison::new("zero", vec![0.5, 0.6, 0.7, 0.8], vec![0.5, 0.6, 0.7, 0.8]).unwrap();
    let res = zero.analyse(&options).unwrap();
    assert_eq!((res.mean, res.sd, res.t, res.p), (0.0, 0.0, 0.0, 1.0));
    assert_eq!((res.wilcoxon.statistic, res.wilcoxon.p), (0.0, 1.0));
    assert_eq!((res.holm_interval.lower, res.holm_interval.upper), (0.0, 0.0));
    assert_eq!(res.verdict, Verdict::Inconclusive);
    // With a smallest effect of interest: still no spread to test equivalence against.
    let res = zero.clone().with_smallest_effect(0.01).unwrap().analyse(&options).unwrap();
    assert_eq!(res.verdict, Verdict::Inconclusive);
    let e = res.equivalence.unwrap();
    assert_eq!((e.p_upper, e.p_lower), (0.0, 0.0));
    // Many zero differences, n > 13: scipy's normal approximation divides 0 by 0; here p = 1.
    let many = PairedComparison::new("zeros n = 20", vec![0.5; 20], vec![0.5; 20]).unwrap();
    assert_eq!(many.analyse(&options).unwrap().wilcoxon.p, 1.0);

    let shown = format!("{}{}", res, StudyTable::new(vec![up, zero, many], &options).unwrap());
    assert!(!shown.contains("NaN"), "{shown}");
}

#[test]
fn verdict_rule() {
    let ci = |lower, upper| Interval { lower, upper, level: 0.95 };
    assert_eq!(Verdict::from_interval(&ci(0.001, 0.03), None), Verdict::Reproduced);
    assert_eq!(Verdict::from_interval(&ci(-0.03, -0.001), None), Verdict::Contradicted);
    assert_eq!(Verdict::from_interval(&ci(-0.01, 0.03), None), Verdict::Inconclusive);
    assert_eq!(Verdict::from_interval(&ci(-0.01, 0.03), Some(0.02)), Verdict::Inconclusive);
    // Below the smallest effect of interest while straddling 0: the claimed effect is excluded.
    assert_eq!(Verdict::from_interval(&ci(-0.01, 0.015), Some(0.02)), Verdict::Contradicted);
    // Above 0 but below δ: the direction is reproduced (the rules apply in order).
    assert_eq!(Verdict::from_interval(&ci(0.001, 0.015), Some(0.02)), Verdict::Reproduced);
    assert_eq!(Verdict::from_interval(&ci(0.0, 0.0), None), Verdict::Inconclusive);
    assert_eq!(Verdict::Inconclusive.to_string(), "inconclusive");
}

#[test]
fn bad_input_is_a_clear_error() {
    let err = |r: Result<PairedComparison>| r.unwrap_err().to_string();
    assert!(
        err(PairedComparison::new("probe", vec![0.5, 0.6], vec![0.5])).contains("`probe`: 2 treatment values but 1")
    );
    assert!(err(PairedComparison::new("probe", vec![0.5], vec![0.5])).contains("at least 2 seeds"));
    assert!(
        err(PairedComparison::new("seg", vec![0.5, 0.6], vec![0.5, f64::NAN])).contains("`seg`: control[1] is NaN")
    );
    let ok = PairedComparison::new("probe", vec![0.5, 0.6], vec![0.4, 0.55]).unwrap();
    assert!(err(ok.clone().with_smallest_effect(-0.01)).contains("positive"));
    let table_err = |c: Vec<PairedComparison>, o: StudyOptions| StudyTable::new(c, &o).unwrap_err().to_string();
    assert!(table_err(vec![ok.clone(), ok.clone()], StudyOptions::default()).contains("`probe` appears twice"));
    assert!(table_err(vec![], StudyOptions::default()).contains("at least one measure"));
    assert!(table_err(vec![ok.clone()], StudyOptions::default().alpha(1.5)).contains("alpha"));
    assert!(table_err(vec![ok], StudyOptions::default().bootstrap_resamples(0)).contains("bootstrap_resamples"));
}

#[test]
fn a_measure_displays_as_a_table() {
    let c = PairedComparison::new("probe top-1", vec![0.61, 0.58, 0.64], vec![0.60, 0.57, 0.61])
        .unwrap()
        .with_smallest_effect(0.01)
        .unwrap();
    // 0.64 − 0.61 and 0.61 − 0.60 are not exactly 0.03 and 0.01, but 0.61 − 0.60 and 0.58 − 0.57
    // are the same double: a tie, so the sign-flip mode.
    let shown = c.analyse(&StudyOptions::default().bootstrap_resamples(200)).unwrap().to_string();
    for key in [
        "probe top-1 (n = 3 seeds)",
        "95 % t CI",
        "percentile, B = 200, seed 0",
        "paired t",
        "Wilcoxon",
        "(exact sign-flip)",
        "Holm",
        "TOST",
        "verdict",
    ] {
        assert!(shown.contains(key), "missing {key}:\n{shown}");
    }
    assert_eq!(shown.lines().count(), 9);
}
