//! Logistic regression and linear probes against scikit-learn on the digits images.

use pivot::prelude::*;
use std::path::PathBuf;
use std::process::Command;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("PIVOT_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// Runs tests/python/ref_probe.py and loads what it wrote.
fn reference(mode: &str) -> Vec<(String, Tensor)> {
    let py = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/ref_probe.py");
    // Unique per call: the tests of one binary run in parallel threads of the same process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let out = std::env::temp_dir().join(format!("pivot-ref-{mode}-{}-{k}.safetensors", std::process::id()));
    let res = Command::new(&py).arg(&script).arg(mode).arg(&out).output().unwrap_or_else(|e| {
        panic!("cannot run {} ({e}); set PIVOT_PYTHON or create the venv and `pip install -r tests/requirements.txt`", py.display())
    });
    assert!(
        res.status.success(),
        "{} {} failed (numpy and scikit-learn are needed: `pip install -r tests/requirements.txt`):\n{}",
        py.display(),
        script.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    let t = Tensor::read_safetensors(&out).expect("reference file");
    let _ = std::fs::remove_file(&out);
    t
}

fn get<'a>(t: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &t.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("reference lacks {name}")).1
}

fn sklearn_objective(x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor, c: f64) -> f64 {
    let n = x.size()[0] as f64;
    let logp = (x.matmul(&w.tr()) + b).log_softmax(-1, Kind::Double);
    let ce = -logp.gather(1, &y.unsqueeze(1), false).mean(Kind::Double).double_value(&[]);
    ce + (w * w).sum(Kind::Double).double_value(&[]) / (2.0 * c * n)
}

#[test]
fn logistic_regression_matches_sklearn_on_digits() {
    let r = reference("logreg");
    let (xtr, ytr, xva, yva) = (get(&r, "x_train"), get(&r, "y_train"), get(&r, "x_val"), get(&r, "y_val"));
    for tag in ["c0", "c1"] {
        let c = get(&r, &format!("{tag}_c")).double_value(&[0]);
        let t0 = std::time::Instant::now();
        let m = LogisticRegression::fit(xtr, ytr, c).unwrap();
        let ours_s = t0.elapsed().as_secs_f64();
        let pred = m.predict(xva);
        let top1 = pred.eq_tensor(yva).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let sk_top1 = get(&r, &format!("{tag}_top1")).double_value(&[0]);
        let agree = pred.eq_tensor(get(&r, &format!("{tag}_pred"))).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let dp = (m.predict_proba(xva) - get(&r, &format!("{tag}_proba"))).abs();
        let (proba_diff, proba_mean) = (dp.max().double_value(&[]), dp.mean(Kind::Double).double_value(&[]));
        let ours_obj = m.objective(xtr, ytr);
        let sk_obj = sklearn_objective(xtr, ytr, get(&r, &format!("{tag}_coef")), get(&r, &format!("{tag}_intercept")), c);
        println!(
            "C={c}: top1 ours {top1:.4} sklearn {sk_top1:.4}; agreement {agree:.4}; mean|Δp| {proba_mean:.1e} max {proba_diff:.1e}; \
             objective ours {ours_obj:.8} sklearn {sk_obj:.8}; iters {}; fit {ours_s:.3}s vs sklearn {:.3}s",
            m.info.iterations,
            get(&r, &format!("{tag}_fit_seconds")).double_value(&[0])
        );
        assert!((top1 - sk_top1).abs() <= 0.003 + 1e-12, "C={c}: top-1 {top1} vs sklearn {sk_top1}");
        assert!(agree >= 0.99, "C={c}: only {agree} of predictions agree with sklearn");
        // Same objective, so our optimum may not be worse than sklearn's (which stops at tol 1e-4).
        assert!(ours_obj <= sk_obj + 1e-6, "C={c}: objective {ours_obj} above sklearn's {sk_obj}");
        // sklearn stops at gtol 1e-4, so its probabilities differ a little where the objective is flat.
        assert!(proba_mean < 2e-3 && proba_diff < 0.1, "C={c}: probabilities differ by {proba_mean} (max {proba_diff})");
        assert_eq!(m.weight.size(), vec![10, 64]);
    }
}

#[test]
fn linear_probe_protocol_on_digits() {
    let r = reference("logreg");
    let train = FeatureSet::new(get(&r, "x_train").shallow_clone(), get(&r, "y_train").shallow_clone())
        .with_class_names((0..10).map(|d| d.to_string()).collect());
    let val = FeatureSet::new(get(&r, "x_val").shallow_clone(), get(&r, "y_val").shallow_clone());
    let rep = LinearProbe::default().fit_features(&train, &val).unwrap();
    println!("{rep}");
    assert!(rep.top1 > 0.93, "top-1 {}", rep.top1);
    assert!(rep.top5 >= rep.top1 && rep.top5 > 0.99);
    let c = rep.c.unwrap();
    assert!((1e-6..=1e6).contains(&c));
    // 7 coarse points + 2 per refinement level (4 levels), minus any that fall outside the range.
    assert!(rep.sweep.len() >= 11 && rep.sweep.len() <= 15, "{} sweep points", rep.sweep.len());
    assert!(rep.sweep.iter().any(|p| (p.param - c).abs() / c < 1e-9), "chosen C is one of the swept values");
    let total: u64 = rep.confusion.iter().flatten().sum();
    assert_eq!(total, 597);
    assert_eq!(rep.confusion.len(), 10);
    let diag: u64 = (0..10).map(|i| rep.confusion[i][i]).sum();
    assert!((diag as f64 / 597.0 - rep.top1).abs() < 1e-12);
    assert_eq!(rep.per_class_accuracy.len(), 10);
    // Tiny C underfits: the coarse grid must have seen chance-level held-out accuracy.
    assert!(rep.sweep[0].top1 < 0.5);

    // Deterministic given the seed.
    let again = LinearProbe::default().fit_features(&train, &val).unwrap();
    assert_eq!(again.c, rep.c);
    assert_eq!(again.confusion, rep.confusion);

    let b = rep.mime_bundle();
    assert!(b.data.contains_key("text/html") && b.plain_text().contains("top-1"));
}

#[test]
fn sgd_linear_probe_on_digits() {
    let r = reference("logreg");
    let train = FeatureSet::new(get(&r, "x_train").shallow_clone(), get(&r, "y_train").shallow_clone());
    let val = FeatureSet::new(get(&r, "x_val").shallow_clone(), get(&r, "y_val").shallow_clone());
    let probe = SgdLinearProbe { epochs: 30, batch_size: 64, ..Default::default() };
    let rep = probe.fit_features(&train, &val).unwrap();
    println!("{rep}");
    assert_eq!(rep.sweep.len(), 13);
    assert!(rep.top1 > 0.9, "SGD head top-1 {}", rep.top1);
    let lr = rep.lr.unwrap();
    let best = rep.sweep.iter().map(|p| p.top1).fold(0.0, f64::max);
    assert!((rep.top1 - best).abs() < 1e-12 && rep.sweep.iter().any(|p| p.param == lr));
    // The smallest lr barely moves an N(0, 0.01²) head in 30 epochs: clearly worse than the best.
    assert!(rep.sweep[0].top1 < best);
}

#[test]
fn logistic_regression_same_on_cuda() {
    if !cuda_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let r = reference("logreg");
    let (xtr, ytr, xva) = (get(&r, "x_train"), get(&r, "y_train"), get(&r, "x_val"));
    let cpu = LogisticRegression::fit(xtr, ytr, 0.1).unwrap();
    let dev = Device::Cuda(0);
    let gpu = LogisticRegression::fit(&xtr.to_device(dev), &ytr.to_device(dev), 0.1).unwrap();
    assert_eq!(gpu.device(), dev);
    let agree = cpu.predict(xva).eq_tensor(&gpu.predict(xva).to_device(Device::Cpu)).to_kind(Kind::Double).mean(Kind::Double);
    assert!(agree.double_value(&[]) > 0.995);
    assert!((cpu.objective(xtr, ytr) - gpu.objective(&xtr.to_device(dev), &ytr.to_device(dev))).abs() < 1e-8);
}

#[test]
fn bad_input_is_an_error() {
    let x = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 0]);
    assert!(LogisticRegression::fit(&x, &y, 1.0).is_err());
    let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
    assert!(LogisticRegression::fit(&x, &y, -1.0).is_err());
    assert!(LogisticRegression::fit(&x, &y.to_kind(Kind::Float), 1.0).is_err());
}

/// Gaussian classes in `d` dims (overlapping, so the optimum is finite and not trivial).
fn random_problem(n: i64, d: i64, k: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let y = Tensor::randint(k, [n], (Kind::Int64, Device::Cpu));
    let means = Tensor::randn([k, d], (Kind::Double, Device::Cpu)) * 1.5;
    let x = means.index_select(0, &y) + Tensor::randn([n, d], (Kind::Double, Device::Cpu));
    (x, y)
}

/// The scaled objective written out plainly, differentiated by autograd: (f, ∂f/∂W, ∂f/∂b).
fn autograd_objective(x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor, c: f64) -> (f64, Tensor, Tensor) {
    let w = w.detach().copy().set_requires_grad(true);
    let b = b.detach().copy().set_requires_grad(true);
    let n = x.size()[0] as f64;
    let logp = (x.matmul(&w.tr()) + &b).log_softmax(-1, Kind::Double);
    let loss = -logp.gather(1, &y.unsqueeze(1), false).mean(Kind::Double) + (&w * &w).sum(Kind::Double) / (2.0 * c * n);
    let g = Tensor::run_backward(&[&loss], &[&w, &b], false, false);
    (loss.double_value(&[]), g[0].shallow_clone(), g[1].shallow_clone())
}

#[test]
fn closed_form_objective_and_gradient_match_autograd() {
    let mut devices = vec![Device::Cpu];
    if cuda_available() {
        devices.push(Device::Cuda(0));
    }
    for dev in devices {
        // Class 4 never occurs: its column gets softmax mass but no label.
        let (x, y) = random_problem(64, 7, 4, 0);
        let (x, y) = (x.to_device(dev), y.to_device(dev));
        let (k, c) = (5, 0.7);
        let m = LogisticRegression {
            weight: (Tensor::randn([k, 7], (Kind::Double, Device::Cpu)) * 0.3).to_device(dev),
            bias: Tensor::randn([k], (Kind::Double, Device::Cpu)).to_device(dev),
            c,
            info: LbfgsInfo { iterations: 0, evaluations: 0, loss: 0.0, grad_max: 0.0, converged: false },
            options: LbfgsOptions::default(),
        };
        let (f, gw, gb) = m.objective_and_gradient(&x, &y).unwrap();
        let (fa, gwa, gba) = autograd_objective(&x, &y, &m.weight, &m.bias, c);
        let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        println!("{dev:?}: f {f:.17} autograd {fa:.17}; |Δ∇W| {:.1e} |Δ∇b| {:.1e}", max_diff(&gw, &gwa), max_diff(&gb, &gba));
        assert!((f - fa).abs() <= 1e-13 * fa.abs().max(1.0), "{dev:?}: objective {f} vs autograd {fa}");
        assert!((f - m.objective(&x, &y)).abs() <= 1e-13 * fa.abs().max(1.0));
        assert_eq!(gw.size(), vec![k, 7]);
        assert_eq!(gb.size(), vec![k]);
        let scale = gwa.abs().max().double_value(&[]).max(gba.abs().max().double_value(&[]));
        assert!(scale > 1e-3, "a gradient worth comparing");
        assert!(max_diff(&gw, &gwa) <= 1e-13 && max_diff(&gb, &gba) <= 1e-13, "{dev:?}: closed-form gradient differs from autograd");
        assert!(m.objective_and_gradient(&x, &(&y + 5)).is_err(), "labels beyond the model's classes");
    }
}

#[test]
fn fit_fast_path_matches_plain_lbfgs_on_autograd_objective() {
    let (n, d, k) = (400, 16, 6);
    let (x, y) = random_problem(n, d, k, 1);
    for (c, tol) in [(0.05, 1e-7), (1.0, 1e-7), (1.0, 1e-4)] {
        let opts = LbfgsOptions { tolerance_grad: tol, ..Default::default() };
        let before = pivot::probe::lbfgs::host_transfers();
        let fast = LogisticRegression::fit_with(&x, &y, c, opts, Some(k), None).unwrap();
        let transfers = pivot::probe::lbfgs::host_transfers() - before;

        // The same driver through its host-scalar entry point, on the objective written out plainly
        // and differentiated by autograd (one sync per evaluation inside the objective).
        let wlen = k * d;
        let plain = |theta: &Tensor| -> (f64, Tensor) {
            let (f, gw, gb) =
                autograd_objective(&x, &y, &theta.narrow(0, 0, wlen).view([k, d]), &theta.narrow(0, wlen, k), c);
            (f, Tensor::cat(&[gw.reshape([-1]), gb], 0))
        };
        let theta0 = Tensor::zeros([wlen + k], (Kind::Double, Device::Cpu));
        let (theta, info) = pivot::probe::lbfgs::minimize(plain, &theta0, opts).unwrap();
        let (w, b) = (theta.narrow(0, 0, wlen).view([k, d]), theta.narrow(0, wlen, k));
        let ref_obj = autograd_objective(&x, &y, &w, &b, c).0;
        let fast_obj = fast.objective(&x, &y);
        let dw = (&fast.weight - &w).abs().max().double_value(&[]);
        println!(
            "C={c} gtol={tol:e}: fast {} it / {} evals / {transfers} transfers, objective {fast_obj:.15}; \
             plain {} it / {} evals, objective {ref_obj:.15}; max|ΔW| {dw:.1e}",
            fast.info.iterations, fast.info.evaluations, info.iterations, info.evaluations
        );
        assert!(fast.info.converged && info.converged);
        assert!(fast.info.iterations.abs_diff(info.iterations) <= 2, "iterations {} vs {}", fast.info.iterations, info.iterations);
        assert!((fast_obj - ref_obj).abs() <= 1e-9 * ref_obj.abs(), "objective {fast_obj} vs {ref_obj}");
        assert!((fast.info.loss - fast_obj).abs() <= 1e-12 * fast_obj.abs(), "reported loss is the objective at the solution");
        let logits = x.matmul(&w.tr()) + &b;
        assert_eq!(fast.predict(&x).eq_tensor(&logits.argmax(-1, false)).to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]), n);
        // One host transfer per evaluation (the first one included), plus one when the run ends on
        // the descent test with a speculatively evaluated first trial step discarded.
        let evals = fast.info.evaluations as u64;
        assert!(transfers == evals || transfers == evals + 1, "{transfers} host transfers for {evals} evaluations");
    }
}

/// Float32 features make the objective's two products float32 (as scikit-learn keeps float32
/// input): the gradient stays within float32 rounding of the float64 one, and the fit reaches the
/// same optimum (to float32 rounding) at the default tolerance, without needing more iterations.
#[test]
fn float32_features_reach_the_float64_optimum() {
    let (n, d, k, c) = (2000, 64, 10, 1.0);
    let (x, y) = random_problem(n, d, k, 2);
    let x32 = x.to_kind(Kind::Float);
    let x = x32.to_kind(Kind::Double); // the same values, so only the products' precision differs
    let m64 = LogisticRegression::fit(&x, &y, c).unwrap();
    let m32 = LogisticRegression::fit(&x32, &y, c).unwrap();
    let (f64_obj, f32_obj) = (m64.objective(&x, &y), m32.objective(&x, &y));
    let agree = m64.predict(&x).eq_tensor(&m32.predict(&x)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    println!(
        "float64 products: {} it, max|g| {:.1e}, objective {f64_obj:.12}; float32 products: {} it, max|g| {:.1e}, \
         objective {f32_obj:.12}; predictions agree {agree:.4}",
        m64.info.iterations, m64.info.grad_max, m32.info.iterations, m32.info.grad_max
    );
    assert!(m64.info.converged && m32.info.converged, "{:?} {:?}", m64.info, m32.info);
    // Float32 rounding of the products moves the optimum's objective by ~1e-7 relative (sklearn's
    // own optimum differs from ours by ~1e-5 on digits).
    assert!((f32_obj - f64_obj).abs() <= 1e-6 * f64_obj, "objective {f32_obj} vs {f64_obj}");
    assert!(agree >= 0.999, "predictions agree on {agree}");
    assert!(m32.info.iterations <= m64.info.iterations + m64.info.iterations / 4 + 2, "{} vs {} iterations", m32.info.iterations, m64.info.iterations);
    let (_, gw64, gb64) = m64.objective_and_gradient(&x, &y).unwrap();
    let (_, gw32, gb32) = m64.objective_and_gradient(&x32, &y).unwrap();
    let diff = (&gw64 - &gw32).abs().max().double_value(&[]).max((&gb64 - &gb32).abs().max().double_value(&[]));
    assert!(diff < 1e-6, "float32 products move the gradient by {diff:e}");
    assert!(diff > 0.0, "float32 features must take the float32 products");
}
