//! Prefetching micro-batches on a worker thread changes nothing but the time: the same losses
//! and weights bit for bit, the same errors at the same step, no hang and no thread left behind
//! when a run stops early. The interrupt flag is process-wide, so these tests take turns.

use pivot::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    clear_interrupt();
    g
}

fn weights(m: &Mllm) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (p, vs) in [("t.", m.tower.var_store()), ("p.", m.projector.var_store()), ("l.", m.lm.var_store())] {
        v.extend(vs.variables().into_iter().map(|(n, t)| (format!("{p}{n}"), t.detach().copy())));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_identical(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        assert!(x.equal(y), "{what}: {n} differs (max |Δ| {})", (x - y).abs().max().double_value(&[]));
    }
}

/// Every logged value but the timings, exactly.
fn assert_same_log(a: &TrainLog, b: &TrainLog, what: &str) {
    let timing = ["samples_per_second", "tokens_per_second", "step_seconds"];
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (x, y) in a.rows.iter().zip(&b.rows) {
        let keep = |r: &StepMetrics| r.values.iter().filter(|(k, _)| !timing.contains(&k.as_str())).cloned().collect::<Vec<_>>();
        assert_eq!((x.step, x.epoch), (y.step, y.epoch), "{what}");
        assert_eq!(keep(x), keep(y), "{what}: step {}", x.step);
    }
}

fn after(log: &TrainLog, steps: usize) -> TrainLog {
    let mut tail = TrainLog::new("tail");
    tail.rows = log.rows[steps..].to_vec();
    tail
}

/// Prefetch worker threads alive in this process.
fn prefetch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.trim() == "pivot-prefetch")
                .count()
        })
        .unwrap_or(0)
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn within(secs: u64, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        // The thread panicked: re-raise its message.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(t.join().unwrap_err()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish within {secs} s"),
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pivot-prefetch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The samples with their images written to `dir` as PNG files.
fn on_disk(data: &VqaDataset, dir: &Path) -> VqaDataset {
    let samples = data
        .samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let path = dir.join(format!("img-{i}.png"));
            s.image.load().unwrap().save(&path).unwrap();
            VqaSample { image: ImageSource::File(path), ..s.clone() }
        })
        .collect();
    VqaDataset::new(samples)
}

#[test]
fn sft_and_stage1_are_bit_identical_with_and_without_prefetch() {
    let _g = serial();
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.vqa(Split::Train, 12);
    tch::manual_seed(1);
    let init = Mllm::tiny(Device::Cpu);
    // 3 steps per epoch: step 4 is the first after an epoch boundary's reshuffle.
    let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(2).grad_accum(2).max_steps(4).seed(4).quiet();
    let run = |prefetch: usize| {
        let mut m = init.clone();
        let log = SftTrainer::new(cfg.clone().prefetch(prefetch)).run(&mut m, &data).unwrap();
        assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
        (log, weights(&m))
    };
    let (log0, w0) = run(0);
    assert_eq!(log0.len(), 4);
    for prefetch in [1, 2] {
        let (log, w) = run(prefetch);
        assert_same_log(&log0, &log, &format!("SFT prefetch {prefetch}"));
        assert_identical(&w0, &w, &format!("SFT prefetch {prefetch}"));
    }

    // Stage 1's projector step (captions, `plain` template) goes through the same path.
    let captions = world.captions(Split::Train, 8);
    let stage1 = |prefetch: usize| {
        let mut m = init.clone();
        let s = Stage1 { projector: TrainConfig { lr: 1e-3, ..TrainConfig::default() }.trainable(false, true, false).batch_size(2).max_steps(3).quiet().prefetch(prefetch), ..Stage1::default() };
        let log = s.run_projector(&mut m, &captions).unwrap();
        (log, weights(&m))
    };
    let ((la, wa), (lb, wb)) = (stage1(0), stage1(2));
    assert_same_log(&la, &lb, "stage 1 projector");
    assert_identical(&wa, &wb, "stage 1 projector");
}

#[test]
fn dpo_is_bit_identical_with_and_without_prefetch() {
    let _g = serial();
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.preferences(Split::Train, 8);
    tch::manual_seed(2);
    let init = Mllm::tiny(Device::Cpu);
    for (double_encoding, cached_reference) in [(false, false), (true, false), (false, true)] {
        let what = format!("DPO double_encoding {double_encoding} cached_reference {cached_reference}");
        let run = |prefetch: usize| {
            let cfg = DpoConfig {
                double_encoding,
                cached_reference,
                sft_weight: 0.5,
                // No warmup: step 1 moves the policy away from the reference.
                train: TrainConfig { lr: 1e-3, warmup_ratio: 0.0, ..TrainConfig::default() }.batch_size(2).grad_accum(2).max_steps(2).quiet().prefetch(prefetch),
                ..Default::default()
            };
            let mut m = init.clone();
            let log = DpoTrainer::new(cfg).run(&mut m, &data).unwrap();
            assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
            (log, weights(&m))
        };
        let (log0, w0) = run(0);
        let (log2, w2) = run(2);
        assert_eq!(log0.len(), 2);
        assert!(log0.get("rewards/margins")[1] != 0.0, "{what}: the policy has moved away from the reference");
        assert_same_log(&log0, &log2, &what);
        assert_identical(&w0, &w2, &what);
    }
    // The public precompute (prefetching) matches a batch-by-batch computation.
    let cached = reference_logps(&init, &data.samples, 3).unwrap();
    assert_eq!(cached.size(), [8, 2]);
    for (k, chunk) in data.samples.chunks(3).enumerate() {
        let one = reference_logps(&init, chunk, 3).unwrap();
        assert!(one.equal(&cached.narrow(0, 3 * k as i64, chunk.len() as i64)), "chunk {k}");
    }
}

#[test]
fn a_missing_image_fails_the_step_that_needs_it_and_names_the_file() {
    let _g = serial();
    within(300, "training over a missing image", || {
        let world = ShapesWorld::new(ShapesConfig::default());
        let dir = temp_dir("missing");
        let data = on_disk(&world.vqa(Split::Train, 8), &dir);
        tch::manual_seed(3);
        let init = Mllm::tiny(Device::Cpu);
        // In order, one sample per micro-batch, two per step: sample 5 is step 3's second micro-batch.
        let cfg = TrainConfig { lr: 1e-3, shuffle: false, ..TrainConfig::default() }.batch_size(1).grad_accum(2).max_steps(4).quiet();

        // The weights after step 2 of this schedule, with every file present.
        let mut two = init.clone();
        let mut trainer = SftTrainer::new(cfg.clone().prefetch(0)).on_step(|m| {
            if m.step == 2 {
                pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        assert!(matches!(trainer.run(&mut two, &data), Err(PivotError::Interrupted { .. })));
        let log_two = trainer.last_log().unwrap().clone();

        let missing = dir.join("img-5.png");
        std::fs::remove_file(&missing).unwrap();
        for prefetch in [0, 2, 8] {
            let mut m = init.clone();
            let mut trainer = SftTrainer::new(cfg.clone().prefetch(prefetch));
            let err = trainer.run(&mut m, &data).unwrap_err();
            assert!(matches!(&err, PivotError::File { path, .. } if *path == missing), "prefetch {prefetch}: {err:?}");
            assert!(err.to_string().contains("img-5.png"), "{err}");
            assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
            let log = trainer.last_log().unwrap();
            assert_same_log(&log_two, log, &format!("steps before the missing file, prefetch {prefetch}"));
            assert_identical(&weights(&two), &weights(&m), &format!("weights after the failed step, prefetch {prefetch}"));
            assert_ne!(m.provenance.stage, Stage::Sft);
            // The model trains on once the data is fixed.
            assert!(m.lm.var_store().variables().values().all(|t| t.requires_grad()));
        }

        // DPO's cached reference reads every image before step 1: the error comes from there.
        let prefs: Vec<PreferenceSample> = data
            .samples
            .iter()
            .map(|s| PreferenceSample {
                image: s.image.clone(),
                question: s.question.clone(),
                chosen: s.answer.clone(),
                rejected: "no".into(),
                category: s.category.clone(),
                image_rejected: None,
            })
            .collect();
        let prefs = PreferenceDataset::new(prefs);
        let mut m = init.clone();
        let cfg = DpoConfig { cached_reference: true, train: cfg.clone().batch_size(2).grad_accum(1).prefetch(2), ..Default::default() };
        let mut trainer = DpoTrainer::new(cfg);
        let err = trainer.run(&mut m, &prefs).unwrap_err();
        assert!(matches!(&err, PivotError::File { path, .. } if *path == missing), "{err:?}");
        assert_eq!(trainer.last_log().map(|l| l.len()), Some(0));
        assert_identical(&weights(&init), &weights(&m), "DPO that never started");
        assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn early_exits_stop_the_worker_without_a_hang() {
    let _g = serial();
    within(300, "runs that stop early", || {
        let world = ShapesWorld::new(ShapesConfig::default());
        let data = world.vqa(Split::Train, 16);
        tch::manual_seed(4);
        let init = Mllm::tiny(Device::Cpu);
        let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(2).max_steps(200).quiet().prefetch(4);

        // A non-finite loss with the worker far from done.
        let mut m = init.clone();
        let train = cfg.clone();
        pivot::train::fault::inject_nan_at(Some(2));
        let mut trainer = SftTrainer::new(train);
        let result = trainer.run(&mut m, &data);
        pivot::train::fault::inject_nan_at(None);
        match result {
            Err(PivotError::NonFinite { step, last_good, .. }) => assert_eq!((step, last_good), (2, 1)),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(trainer.last_log().unwrap().len(), 1);
        assert_eq!(prefetch_threads(), 0, "the worker outlived the run");

        // An interrupt from a step callback.
        let mut m = init.clone();
        let mut trainer = SftTrainer::new(cfg.clone()).on_step(|r| {
            if r.step == 1 {
                pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let err = trainer.run(&mut m, &data).unwrap_err();
        assert!(matches!(err, PivotError::Interrupted { .. }), "{err}");
        assert!(err.to_string().contains("step 2"), "{err}");
        assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
        assert!(!interrupt_requested());

        // More prefetch than the run has micro-batches.
        let mut m = init.clone();
        let log = SftTrainer::new(cfg.clone().max_steps(3).prefetch(32)).run(&mut m, &data).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
    });
}

#[test]
fn resuming_mid_epoch_gives_the_same_run_with_and_without_prefetch() {
    let _g = serial();
    within(300, "resumed runs", || {
        let world = ShapesWorld::new(ShapesConfig::default());
        let data = world.vqa(Split::Train, 12);
        tch::manual_seed(5);
        let init = Mllm::tiny(Device::Cpu);
        let dir = temp_dir("resume");
        // 4 steps per epoch; the checkpoint at step 3 sits mid-epoch.
        let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }.batch_size(3).max_steps(6).seed(9).quiet();
        let mut full = init.clone();
        let full_log = SftTrainer::new(cfg.clone().prefetch(0).checkpoints(&dir, 3)).run(&mut full, &data).unwrap();
        for prefetch in [0, 2] {
            let mut resumed = init.clone();
            let log = SftTrainer::new(cfg.clone().prefetch(prefetch)).resume(&mut resumed, &data, dir.join("step-000003")).unwrap();
            // The first 3 rows come back from the checkpoint's JSON: compare the steps run here.
            assert_eq!(log.get("loss"), full_log.get("loss"));
            assert_same_log(&after(&full_log, 3), &after(&log, 3), &format!("resumed, prefetch {prefetch}"));
            assert_identical(&weights(&full), &weights(&resumed), &format!("resumed, prefetch {prefetch}"));
            assert_eq!(prefetch_threads(), 0, "the worker outlived the run");
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
