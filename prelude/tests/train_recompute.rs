//! Activation checkpointing (recompute in backward) of the tower's and the LM's layers trains
//! exactly as without it: SFT and DPO steps on the tiny MLLM end with bitwise-equal weights and
//! losses, with recomputation of the tower alone (SFT) or of tower and LM (DPO).

use pivot::prelude::*;

fn weights(m: &Mllm) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (p, vs) in [("t.", m.tower.var_store()), ("p.", m.projector.var_store()), ("l.", m.lm.var_store())] {
        v.extend(vs.variables().into_iter().map(|(n, t)| (format!("{p}{n}"), t.detach().copy())));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_identical(what: &str, a: &Mllm, b: &Mllm) {
    for ((n, x), (_, y)) in weights(a).iter().zip(weights(b)) {
        assert!(x.equal(&y), "{what}: {n} differs (max |Δ| {:e})", (x - &y).abs().max().double_value(&[]));
    }
}

fn losses(log: &TrainLog) -> Vec<f64> {
    log.rows.iter().map(|r| r.get("loss").unwrap()).collect()
}

#[test]
fn sft_and_dpo_steps_equal_with_and_without_recompute() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let vqa = world.vqa(Split::Train, 8);
    let pairs = world.preferences(Split::Train, 8);
    tch::manual_seed(5);
    let init = Mllm::tiny(Device::Cpu);
    let cfg = TrainConfig { lr: 1e-3, warmup_ratio: 0.0, ..TrainConfig::default() }.batch_size(4).max_steps(2).quiet();

    let mut plain = init.clone();
    let plain_log = SftTrainer::new(cfg.clone()).run(&mut plain, &vqa).unwrap();
    // The tower alone here (a switch per module); both under DPO below. About 10 s of CPU.
    for (tower, lm) in [(true, false)] {
        let mut m = init.clone();
        let log = SftTrainer::new(TrainConfig { recompute_tower: tower, recompute_lm: lm, ..cfg.clone() }).run(&mut m, &vqa).unwrap();
        assert_eq!(losses(&log), losses(&plain_log));
        assert_identical(&format!("SFT, recompute tower {tower} LM {lm}"), &m, &plain);
        assert!(!m.tower.recomputes() && !m.lm.recomputes(), "the run leaves the model as it found it");
    }

    let dpo = |recompute: bool| {
        let mut m = init.clone();
        let c = DpoConfig { train: TrainConfig { recompute_tower: recompute, recompute_lm: recompute, ..cfg.clone() }, ..DpoConfig::default() };
        let log = DpoTrainer::new(c).run(&mut m, &pairs).unwrap();
        (m, losses(&log))
    };
    let ((a, la), (b, lb)) = (dpo(false), dpo(true));
    assert_eq!(la, lb);
    assert_identical("DPO", &a, &b);
    assert!(weights(&a).iter().zip(weights(&init)).any(|((_, x), (_, y))| !x.equal(&y)), "DPO did not train");
}
