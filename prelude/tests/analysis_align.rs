//! Platonic alignment metrics against a NumPy transcription of platonic-rep (tests/python/ref_probe.py).

use pivot::prelude::*;
use std::path::PathBuf;
use std::process::Command;

fn reference(mode: &str) -> Vec<(String, Tensor)> {
    let py = std::env::var("PIVOT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/ref_probe.py");
    // Unique per call: the tests of one binary run in parallel threads of the same process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let out = std::env::temp_dir().join(format!("pivot-ref-{mode}-{}-{k}.safetensors", std::process::id()));
    let res = Command::new(&py).arg(&script).arg(mode).arg(&out).output().unwrap_or_else(|e| {
        panic!("cannot run {} ({e}); set PIVOT_PYTHON or create the venv and `pip install -r tests/requirements.txt`", py.display())
    });
    assert!(res.status.success(), "reference script failed (needs numpy):\n{}", String::from_utf8_lossy(&res.stderr));
    let t = Tensor::read_safetensors(&out).expect("reference file");
    let _ = std::fs::remove_file(&out);
    t
}

fn get<'a>(t: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &t.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("reference lacks {name}")).1
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn feature_preparation_matches_platonic_rep() {
    let r = reference("align");
    for (clamp, tag) in [(OutlierClamp::Mean(0.95), "mean"), (OutlierClamp::Exact(0.95), "exact")] {
        for side in ["a", "b"] {
            let ours = prepare_features(get(&r, &format!("{side}_raw")), clamp);
            let d = max_diff(&ours, get(&r, &format!("{side}_prep_{tag}")));
            assert!(d < 1e-12, "{side} {tag}: {d}");
        }
    }
    // The planted outlier (40.0) must be clamped.
    let p = remove_outliers(get(&r, "a_raw"), OutlierClamp::Mean(0.95));
    assert!(p.max().double_value(&[]) < 40.0);
}

#[test]
fn metrics_match_numpy_to_1e6() {
    let r = reference("align");
    let a = get(&r, "a_raw");
    let b = get(&r, "b_raw");
    for (metric, name) in [
        (AlignmentMetric::MutualKnn { k: 10 }, "mknn"),
        (AlignmentMetric::Cka, "cka"),
        (AlignmentMetric::UnbiasedCka, "ucka"),
        (AlignmentMetric::Cknna { k: 10 }, "cknna"),
    ] {
        let grid = AlignmentGrid::compute(a, b, metric, OutlierClamp::Mean(0.95)).unwrap();
        let reference = get(&r, &format!("grid_{name}"));
        let rs = reference.size();
        assert_eq!((grid.scores.len() as i64, grid.scores[0].len() as i64), (rs[0], rs[1]));
        let mut best = (f64::NEG_INFINITY, (0, 0));
        for i in 0..rs[0] {
            for j in 0..rs[1] {
                let want = reference.double_value(&[i, j]);
                let got = grid.scores[i as usize][j as usize];
                assert!((got - want).abs() < 1e-6, "{name}[{i},{j}]: {got} vs numpy {want}");
                if want > best.0 {
                    best = (want, (i as usize, j as usize));
                }
            }
        }
        assert_eq!(grid.argmax, best.1, "{name} argmax");
        assert!((grid.best - best.0).abs() < 1e-6);
        // Shared latent: far above the ~k/N chance level of mutual kNN, and CKA well above 0.
        assert!(grid.best > 0.2, "{name}: {}", grid.best);
        println!("{grid}");
    }
}

#[test]
fn metric_identities() {
    tch::manual_seed(1);
    let x = l2_normalize(&Tensor::randn([64, 16], (Kind::Double, Device::Cpu)));
    let y = l2_normalize(&Tensor::randn([64, 16], (Kind::Double, Device::Cpu)));
    assert!((mutual_knn(&x, &x, 10).unwrap() - 1.0).abs() < 1e-12);
    assert!((cka(&x, &x, false).unwrap() - 1.0).abs() < 1e-5);
    // CKNNA(x, x) = s/(s + 1e-6) with s a small HSIC: below 1, but far above unrelated features.
    let self_cknna = cknna(&x, &x, 10, true).unwrap();
    assert!(self_cknna > 0.5 && self_cknna <= 1.0 && self_cknna > cknna(&x, &y, 10, true).unwrap() + 0.3, "{self_cknna}");
    // Independent random features: mutual kNN near chance k/(N-1).
    let chance = mutual_knn(&x, &y, 10).unwrap();
    assert!(chance < 0.35, "{chance}");
    // Invariance of CKA to orthogonal transforms.
    let (q, _) = Tensor::linalg_qr(&Tensor::randn([16, 16], (Kind::Double, Device::Cpu)), "reduced");
    let c1 = cka(&x, &y, true).unwrap();
    let c2 = cka(&x.matmul(&q), &y, true).unwrap();
    assert!((c1 - c2).abs() < 1e-9);
    assert!(mutual_knn(&x, &y, 64).is_err());
    assert!(cknna(&x, &y, 1, true).is_err());
}
