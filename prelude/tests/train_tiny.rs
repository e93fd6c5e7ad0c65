//! Training the tiny MLLM on a small ShapesWorld set: losses go down, the tower moves when it is
//! trainable and stays bit-identical when it is frozen.

use pivot::prelude::*;

fn snapshot(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
fn max_change(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter().zip(b).map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}
fn identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn sft_lowers_its_loss_and_moves_the_tower() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 32);
    let mut mllm = Mllm::tiny(Device::Cpu);
    let before = snapshot(mllm.tower.var_store());
    let cfg = TrainConfig { lr: 2e-3, warmup_ratio: 0.1, ..TrainConfig::default() }.batch_size(8).max_steps(40).quiet();
    let log = SftTrainer::new(cfg).run(&mut mllm, &data).unwrap();
    assert_eq!(log.len(), 40);
    let (first, last) = (log.mean_first("loss", 5), log.mean_last("loss", 5));
    assert!(last < 0.7 * first, "SFT loss {first} → {last}");
    assert!(max_change(&before, &snapshot(mllm.tower.var_store())) > 0.0, "tower did not move");
    assert!(log.get("grad_norm").iter().all(|g| g.is_finite()));
    // Epoch is fractional: 32 samples / 8 per step = 4 steps per epoch.
    assert_eq!(log.last().unwrap().epoch, 10.0);
    assert!(log.to_csv().starts_with("step,epoch,loss,"));
    let bundle = log.mime_bundle();
    assert!(bundle.plain_text().contains("loss"));
}

#[test]
fn dpo_lowers_its_loss_and_moves_the_tower() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.preferences(Split::Train, 32);
    let mut mllm = Mllm::tiny(Device::Cpu);
    let before = snapshot(mllm.tower.var_store());
    let steps = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = steps.clone();
    let cfg = DpoConfig {
        train: TrainConfig { lr: 1e-3, warmup_ratio: 0.1, ..TrainConfig::default() }.batch_size(8).max_steps(40).quiet(),
        ..Default::default()
    };
    let log = DpoTrainer::new(cfg).on_step(move |_| seen.set(seen.get() + 1)).run(&mut mllm, &data).unwrap();
    assert_eq!(steps.get(), 40, "the callback sees every step");
    let (first, last) = (log.mean_first("loss", 5), log.mean_last("loss", 5));
    assert!((log.get("loss")[0] - std::f64::consts::LN_2).abs() < 1e-4);
    assert!(last < first - 0.05, "DPO loss {first} → {last}");
    assert!(log.mean_last("rewards/margins", 5) > 0.0);
    assert!(log.mean_last("rewards/accuracies", 5) > 0.5);
    assert!(max_change(&before, &snapshot(mllm.tower.var_store())) > 0.0, "tower did not move");
    assert_eq!(mllm.provenance.stage, Stage::Dpo);
    assert_eq!(mllm.encoder().provenance().steps, 40);
}

#[test]
fn a_frozen_tower_stays_bit_identical() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let mut mllm = Mllm::tiny(Device::Cpu);
    let tower = snapshot(mllm.tower.var_store());
    let lm = snapshot(mllm.lm.var_store());
    let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.trainable(false, true, true).batch_size(4).max_steps(4).quiet();
    SftTrainer::new(cfg).run(&mut mllm, &world.vqa(Split::Train, 16)).unwrap();
    assert!(identical(&tower, &snapshot(mllm.tower.var_store())));
    assert!(max_change(&lm, &snapshot(mllm.lm.var_store())) > 0.0);
    // The run gives back the flags it found (all trainable for a fresh model).
    assert!(mllm.tower.var_store().variables().values().all(|t| t.requires_grad()));

    // DPO with the tower frozen, and stage 1's projector step, leave it untouched as well.
    let cfg = DpoConfig {
        train: TrainConfig { lr: 1e-3, ..TrainConfig::default() }.trainable(false, true, true).batch_size(4).max_steps(3).quiet(),
        ..Default::default()
    };
    DpoTrainer::new(cfg).run(&mut mllm, &world.preferences(Split::Train, 12)).unwrap();
    assert!(identical(&tower, &snapshot(mllm.tower.var_store())));
}

#[test]
fn stage1_then_transplant_keeps_the_donor_tower_frozen() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let caps = world.captions(Split::Train, 16);
    let vqa = world.vqa(Split::Train, 16);
    let mut base = Mllm::tiny(Device::Cpu);
    let tower0 = snapshot(base.tower.var_store());
    let lm0 = snapshot(base.lm.var_store());
    let mut s1 = Stage1::default();
    s1.projector = s1.projector.batch_size(4).max_steps(3).quiet();
    s1.full = s1.full.batch_size(4).max_steps(3).quiet();
    let proj_log = s1.run_projector(&mut base, &caps).unwrap();
    assert_eq!(proj_log.len(), 3);
    // Projector-only: tower and LM untouched.
    assert!(identical(&tower0, &snapshot(base.tower.var_store())));
    assert!(identical(&lm0, &snapshot(base.lm.var_store())));
    let log = s1.run(&mut base, &caps, &vqa).unwrap();
    assert_eq!((log.projector.len(), log.full.len()), (3, 3));
    assert_eq!(base.provenance.stage, Stage::Base);
    assert!(max_change(&tower0, &snapshot(base.tower.var_store())) > 0.0);

    let donor = base.encoder();
    let donor_w = snapshot(donor.tower().var_store());
    let mut fresh = transplant(donor, LanguageModel::tiny(Device::Cpu), MllmConfig::default());
    assert!(fresh.provenance.history.iter().any(|h| h.contains("transplanted")));
    let mut t1 = Stage1::transplant();
    t1.projector = t1.projector.batch_size(4).max_steps(2).quiet();
    t1.full = t1.full.batch_size(4).max_steps(2).quiet();
    t1.run(&mut fresh, &caps, &vqa).unwrap();
    assert!(identical(&donor_w, &snapshot(fresh.tower.var_store())));
    // The transplant keeps its label (it is not a new base MLLM).
    assert!(matches!(&fresh.provenance.stage, Stage::Custom(s) if s.starts_with("transplant of")), "{:?}", fresh.provenance.stage);
}

#[test]
fn vqa_eval_reports_by_category() {
    tch::manual_seed(0);
    let world = ShapesWorld::new(ShapesConfig::default());
    let val = world.vqa(Split::Val, 10);
    let mllm = Mllm::tiny(Device::Cpu);
    let report = VqaEval { max_new_tokens: 4, live: false, ..Default::default() }.run(&mllm, &val).unwrap();
    assert_eq!(report.total, 10);
    assert_eq!(report.by_category.values().map(|c| c.1).sum::<usize>(), 10);
    assert!(report.accuracy() >= 0.0 && report.accuracy() <= 1.0);
    assert!(report.mime_bundle().plain_text().contains("VQA exact match"));
    assert!(report.metrics().iter().any(|(k, _)| k == "vqa_accuracy"));
}
