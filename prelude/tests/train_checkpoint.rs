//! Kill-and-resume gives the uninterrupted run bit for bit; a cut-off checkpoint is refused.

use pivot::prelude::*;
use std::path::Path;

fn weights(m: &Mllm) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (p, vs) in [("t.", m.tower.var_store()), ("p.", m.projector.var_store()), ("l.", m.lm.var_store())] {
        v.extend(vs.variables().into_iter().map(|(n, t)| (format!("{p}{n}"), t.detach().copy())));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
fn assert_identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(b) {
        assert!(x.equal(y), "{n} differs after resume (max |Δ| {})", (x - y).abs().max().double_value(&[]));
    }
}
fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pivot-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn sft_resume_is_bit_identical() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 12);
    tch::manual_seed(3);
    let init = Mllm::tiny(Device::Cpu);
    let dir = tmp("sft");
    // 6 steps over 3 epochs (2 steps each): the resume point crosses an epoch boundary's reshuffle.
    let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(3).grad_accum(2).max_steps(6).seed(7).quiet();

    let mut full = init.clone();
    let full_log = SftTrainer::new(cfg.clone().checkpoints(&dir, 3)).run(&mut full, &data).unwrap();
    assert!(dir.join("step-000003/MANIFEST.json").is_file());
    assert!(dir.join("step-000006/MANIFEST.json").is_file());

    // A fresh process would start from the same initial model and continue from step 3.
    let mut resumed = init.clone();
    let log = SftTrainer::new(cfg.clone()).resume(&mut resumed, &data, dir.join("step-000003")).unwrap();
    assert_identical(&weights(&full), &weights(&resumed));
    assert_eq!(log.len(), 6, "the resumed log continues the saved one");
    assert_eq!(log.get("loss"), full_log.get("loss"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dpo_resume_is_bit_identical_with_online_and_cached_reference() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.preferences(Split::Train, 8);
    for cached in [false, true] {
        tch::manual_seed(5);
        let init = Mllm::tiny(Device::Cpu);
        let dir = tmp(&format!("dpo-{cached}"));
        let cfg = DpoConfig {
            cached_reference: cached,
            train: TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(2).max_steps(5).quiet(),
            ..Default::default()
        };
        let mut full = init.clone();
        let mut c = cfg.clone();
        c.train = c.train.checkpoints(&dir, 2);
        DpoTrainer::new(c).run(&mut full, &data).unwrap();
        // Resuming from the parent directory picks the newest complete checkpoint (step 4).
        let mut resumed = init.clone();
        let log = DpoTrainer::new(cfg).resume(&mut resumed, &data, &dir).unwrap();
        assert_eq!(log.len(), 5);
        assert_identical(&weights(&full), &weights(&resumed));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn corrupt(dir: &Path, how: &str) {
    match how {
        "no-manifest" => std::fs::remove_file(dir.join("MANIFEST.json")).unwrap(),
        "truncated" => {
            let f = dir.join("model.safetensors");
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
        }
        "missing-file" => std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn a_cut_off_checkpoint_is_never_loaded() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 8);
    for how in ["no-manifest", "truncated", "missing-file"] {
        tch::manual_seed(0);
        let dir = tmp(&format!("cut-{how}"));
        let cfg = TrainConfig::default().batch_size(4).max_steps(2).quiet();
        let mut m = Mllm::tiny(Device::Cpu);
        SftTrainer::new(cfg.clone().checkpoints(&dir, 1)).run(&mut m, &data).unwrap();
        let last = dir.join("step-000002");
        corrupt(&last, how);
        let err = verify_checkpoint(&last).unwrap_err().to_string();
        assert!(err.contains("not a complete trainer checkpoint"), "{how}: {err}");

        // Named directly: refused with that error, the model untouched.
        let mut r = Mllm::tiny(Device::Cpu);
        let before = weights(&r);
        let e = SftTrainer::new(cfg.clone()).resume(&mut r, &data, &last).unwrap_err();
        assert!(e.to_string().contains("not a complete trainer checkpoint"), "{how}: {e}");
        assert_identical(&before, &weights(&r));
        // Through the parent directory: the complete step-1 checkpoint is used instead.
        assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("step-000001"));
        let _ = std::fs::remove_dir_all(&dir);
    }
    // A leftover `.tmp` directory (a crash before the rename) is ignored.
    let dir = tmp("cut-tmp");
    std::fs::create_dir_all(dir.join("step-000009.tmp")).unwrap();
    assert!(latest_checkpoint(&dir).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resuming_a_different_run_is_refused() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 8);
    let dir = tmp("mismatch");
    let cfg = TrainConfig::default().batch_size(4).max_steps(2).quiet();
    let mut m = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg.clone().checkpoints(&dir, 1)).run(&mut m, &data).unwrap();
    let e = SftTrainer::new(cfg.seed(99)).resume(&mut m, &data, &dir).unwrap_err();
    assert!(e.to_string().contains("different run"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
