//! Cooperative interruption and the non-finite guard. The interrupt flag is process-wide, so
//! these tests take turns.

use pivot::prelude::*;
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn weights(m: &Mllm) -> Vec<Tensor> {
    let mut v = Vec::new();
    for vs in [m.tower.var_store(), m.projector.var_store(), m.lm.var_store()] {
        let mut named: Vec<_> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        v.extend(named.into_iter().map(|(_, t)| t.detach().copy()));
    }
    v
}
fn same(a: &[Tensor], b: &[Tensor]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.equal(y))
}

#[test]
fn the_interrupt_flag_stops_a_run_cleanly() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    clear_interrupt();
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 16);
    let mut mllm = Mllm::tiny(Device::Cpu);
    let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(2).max_steps(20).quiet();
    let mut trainer = SftTrainer::new(cfg).on_step(move |m| {
        if m.step == 3 {
            pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let err = trainer.run(&mut mllm, &data).unwrap_err();
    assert!(matches!(err, PivotError::Interrupted { .. }), "{err}");
    assert!(err.to_string().contains("step 4"), "{err}");
    let log = trainer.last_log().expect("partial log kept");
    assert_eq!(log.len(), 3);
    assert!(!interrupt_requested(), "the request is consumed");
    // The model is usable and still trainable after the interrupt.
    assert!(mllm.lm.var_store().variables().values().all(|t| t.requires_grad()));
    assert_ne!(mllm.provenance.stage, Stage::Sft, "an interrupted run records no stage");
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_weights() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    clear_interrupt();
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.preferences(Split::Train, 8);
    let base = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(2).max_steps(6).quiet();

    // Reference: the same run stopped after 2 good steps.
    let mut good = Mllm::tiny(Device::Cpu);
    let init = good.clone();
    DpoTrainer::new(DpoConfig { train: base.clone().max_steps(6), ..Default::default() }).run(&mut good, &data).unwrap();

    let mut bad = init.clone();
    let mut train = base.clone();
    train.inject_nan_at = Some(3);
    let mut trainer = DpoTrainer::new(DpoConfig { train, ..Default::default() });
    let err = trainer.run(&mut bad, &data).unwrap_err();
    match &err {
        PivotError::NonFinite { step, last_good, .. } => assert_eq!((*step, *last_good), (3, 2)),
        e => panic!("expected NonFinite, got {e}"),
    }
    assert!(err.to_string().contains("non-finite"));
    assert_eq!(trainer.last_log().unwrap().len(), 2);

    // The weights are those after step 2: re-run 2 good steps of the same schedule... the
    // schedule depends on the total, so compare with a run of 6 steps cut by the interrupt at 2.
    let mut two = init.clone();
    let mut t2 = DpoTrainer::new(DpoConfig { train: base.clone(), ..Default::default() }).on_step(|m| {
        if m.step == 2 {
            pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    assert!(matches!(t2.run(&mut two, &data), Err(PivotError::Interrupted { .. })));
    assert!(same(&weights(&two), &weights(&bad)), "NaN step must not touch the weights");
    assert!(!same(&weights(&good), &weights(&bad)));
    assert!(weights(&bad).iter().all(|t| t.isfinite().all().int64_value(&[]) == 1));
}
