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
    let train = base.clone();
    pivot::train::fault::inject_nan_at(Some(3));
    let mut trainer = DpoTrainer::new(DpoConfig { train, ..Default::default() });
    let err = trainer.run(&mut bad, &data).unwrap_err();
    pivot::train::fault::inject_nan_at(None);
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

/// An interrupt that arrives while a long optimizer step runs (here 8 micro-batches) stops
/// the run before the next micro-batch, not at the end of the step: the partial gradients are
/// dropped and the weights stay those of the last completed step.
#[test]
fn an_interrupt_mid_step_stops_within_one_micro_batch() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    clear_interrupt();
    tch::manual_seed(0);
    let accum = 8;
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, accum);
    let cfg = TrainConfig { lr: 1e-3, warmup_ratio: 0.0, ..TrainConfig::default() }.batch_size(1).grad_accum(accum).max_steps(3).quiet().prefetch(0);
    let init = Mllm::tiny(Device::Cpu);

    // Reference: the same run stopped at the boundary after step 1.
    let mut one = init.clone();
    let mut t1 = SftTrainer::new(cfg.clone()).on_step(|m| {
        if m.step == 1 {
            pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let err = t1.run(&mut one, &data).unwrap_err();
    assert!(err.to_string().contains("step 2 of 3, micro-batch 1 of 8"), "{err}");

    // The flag set from another thread shortly after step 1, while step 2 runs.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let setter = std::thread::spawn(move || {
        if rx.recv().is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(30));
            pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mut cut = init.clone();
    let mut trainer = SftTrainer::new(cfg).on_step(move |m| {
        if m.step == 1 {
            let _ = tx.send(());
        }
    });
    let err = trainer.run(&mut cut, &data).unwrap_err();
    setter.join().unwrap();
    let PivotError::Interrupted { at } = &err else { panic!("expected Interrupted, got {err}") };
    let micro: usize = at
        .strip_prefix("SFT step 2 of 3, micro-batch ")
        .and_then(|r| r.strip_suffix(" of 8"))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("not stopped inside step 2: {at}"));
    // Usually a few micro-batches in; a stall on a loaded machine may delay the main thread past
    // the flag, but any k of step 2 is inside the step (the old loop said "step 3").
    assert!((1..=accum).contains(&micro), "{at}");
    assert_eq!(trainer.last_log().unwrap().len(), 1);
    assert!(!interrupt_requested(), "the request is consumed");
    assert!(same(&weights(&one), &weights(&cut)), "a cut-short step must not touch the weights");
    assert!(!same(&weights(&init), &weights(&cut)), "step 1 was applied");
    // The partial gradients of step 2 were dropped.
    for vs in [cut.tower.var_store(), cut.projector.var_store(), cut.lm.var_store()] {
        for (name, t) in vs.variables() {
            let g = t.grad();
            assert!(!g.defined() || g.abs().max().double_value(&[]) == 0.0, "{name} keeps a partial gradient");
        }
    }
}
