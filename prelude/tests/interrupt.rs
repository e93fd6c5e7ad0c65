//! Cooperative interrupt in the probes, feature extraction, analysis and checkpoint writes: each
//! long loop checks the interrupt flag between iterations, mini-batches or chunks, returns
//! `PivotError::Interrupted` naming where it stopped, consumes the request, and leaves the
//! caller's state (a warm-start probe, an earlier checkpoint) as it was.
//!
//! One test function on purpose: outside a front end the flag is this process's own static, and
//! a second test running in parallel could consume a request meant for another.

mod common;

use pivot::prelude::*;
use pivot::runtime::interrupt_flag;
use std::sync::atomic::Ordering;

/// Requests an interrupt, runs `f`, and checks that it stopped with `Interrupted` at a place whose
/// description contains `at`, and that the request was consumed.
fn stops<T: std::fmt::Debug>(what: &str, at: &str, f: impl FnOnce() -> pivot::Result<T>) {
    interrupt_flag().store(true, Ordering::SeqCst);
    match f() {
        Err(PivotError::Interrupted { at: where_ }) => assert!(where_.contains(at), "{what}: stopped at {where_:?}, expected {at:?}"),
        other => panic!("{what}: expected Interrupted, got {other:?}"),
    }
    assert!(!interrupt_requested(), "{what}: the request must be consumed");
}

#[test]
fn long_loops_stop_on_interrupt_with_state_intact() {
    tch::manual_seed(0);
    let opts = |d: Device| (Kind::Float, d);

    // L-BFGS, interrupted from inside its objective at the 5th evaluation (as a Ctrl-C would land
    // while the objective runs): it stops before the next iteration, within one line search.
    let mut calls = 0;
    let rosenbrock = |x: &Tensor| -> (f64, Tensor) {
        calls += 1;
        if calls == 5 {
            interrupt_flag().store(true, Ordering::SeqCst);
        }
        let v = Vec::<f64>::try_from(x).unwrap();
        let (a, b) = (v[0], v[1]);
        let f = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
        let g = [-2.0 * (1.0 - a) - 400.0 * a * (b - a * a), 200.0 * (b - a * a)];
        (f, Tensor::from_slice(&g))
    };
    let x0 = Tensor::from_slice(&[-1.2f64, 1.0]);
    match pivot::probe::lbfgs::minimize(rosenbrock, &x0, LbfgsOptions::default()) {
        Err(PivotError::Interrupted { at }) => assert!(at.starts_with("L-BFGS iteration "), "{at}"),
        other => panic!("L-BFGS: expected Interrupted, got {other:?}"),
    }
    assert!(calls <= 5 + 25, "stopped {calls} evaluations in: more than one iteration after the request");
    assert!(!interrupt_requested());
    assert_eq!(Vec::<f64>::try_from(&x0).unwrap(), vec![-1.2, 1.0], "the start point is not written to");

    // A logistic-regression fit with a warm start: interrupted, the warm probe is unchanged and
    // still predicts; without a request the same fit completes.
    let x = Tensor::randn([200, 8], opts(Device::Cpu));
    let y = x.narrow(1, 0, 1).squeeze_dim(1).gt(0.0).to_kind(Kind::Int64);
    let warm = LogisticRegression::fit(&x, &y, 1.0).unwrap();
    let (w_before, pred_before) = (warm.weight.copy(), warm.predict(&x));
    stops("logistic regression", "L-BFGS iteration 1", || LogisticRegression::fit_with(&x, &y, 0.5, LbfgsOptions::default(), None, Some(&warm)));
    assert!(warm.weight.equal(&w_before) && warm.predict(&x).equal(&pred_before));
    assert!(LogisticRegression::fit_with(&x, &y, 0.5, LbfgsOptions::default(), None, Some(&warm)).is_ok());

    // The probes that wrap L-BFGS or SGD.
    let (train, val) = (FeatureSet::new(x.narrow(0, 0, 150), y.narrow(0, 0, 150)), FeatureSet::new(x.narrow(0, 150, 50), y.narrow(0, 150, 50)));
    stops("C sweep", "L-BFGS iteration", || LinearProbe::default().fit_features(&train, &val));
    stops("SGD linear probe", "SGD linear probe epoch 1 of 10, batch 1 of", || SgdLinearProbe::default().fit_features(&train, &val));

    // Segmentation probes: tokens [N, 4·4, D], masks [N, 16, 16].
    let tokens = Tensor::randn([16, 16, 8], opts(Device::Cpu));
    let masks = Tensor::randint(3, [16, 16, 16], (Kind::Uint8, Device::Cpu));
    stops("patch-seg probe", "patch-seg probe epoch 1 of", || PatchSegProbe { batch_size: 4, ..PatchSegProbe::new(3) }.fit_tokens(&tokens, &masks, &tokens, &masks));
    stops("dense seg probe", "dense seg probe epoch 1 of", || DenseSegProbe { batch_size: 4, ..DenseSegProbe::new(3) }.fit_tokens(&tokens, &masks, &tokens, &masks));

    // Feature extraction from a tiny tower, chunk by chunk.
    let tower = VisionTower::new(VisionConfig::tiny(), Device::Cpu).frozen();
    let enc = VisionEncoder::new(tower, Provenance::new(Stage::Random, "tiny", "tiny-lm"), FeatureSelect::penultimate());
    let data = ShapesWorld::new(ShapesConfig::default()).classification(Split::Train, 8);
    stops("feature extraction", "image 1 of 8", || FeatureExtractor::default().no_cache().quiet().batch_size(4).extract(&enc, &data, -2, Pooling::MeanPatch));

    // Alignment over a layer grid.
    let a = Tensor::randn([32, 3, 8], opts(Device::Cpu));
    stops("alignment grid", "layer pair (0, 0)", || AlignmentGrid::compute(&a, &a, AlignmentMetric::Cka, OutlierClamp::default()));

    // A checkpoint save: interrupted, the earlier file under the same name is untouched and no
    // partial file is left.
    let dir = common::temp_dir("interrupt-save");
    let path = dir.join("model.safetensors");
    let first = vec![("w".to_string(), Tensor::ones([4], opts(Device::Cpu)))];
    pivot::model::weights::write_safetensors(&first, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let second = vec![("w".to_string(), Tensor::zeros([4], opts(Device::Cpu))), ("v".to_string(), Tensor::zeros([2], opts(Device::Cpu)))];
    stops("checkpoint save", "tensor 1 of 2", || pivot::model::weights::write_safetensors(&second, &path));
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "the earlier checkpoint survives");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no partial file is left");
    let _ = std::fs::remove_dir_all(&dir);
}
