//! Pilot of the embedded study's design (issue 14): how long the tower pretraining takes and
//! where its linear probe lands, whether the stage-1 base uses the image (two-way choice with
//! the images vs blank images), and the text-only baseline on the balanced pairs. A measurement
//! tool, not a test: it prints what it measured and never fails on the numbers.
//!
//! ```text
//! cargo run --release -p pivot --example study_pilot -- [key=value ...]
//!   cache=DIR            pretrained-tower cache (default target/study-pilot/tower)
//!   pretrain_steps, scenes, batch, lr, categorical (0/1), patch (patch_weight), patch_shape_only (0/1): TowerPretrain's defaults unless given (its seeds: `seed`, as 02)
//!   seg=0                patch-seg probe (as 05: MLP 256, 10 epochs) on `seg` + seg/2 Eval scenes, random and pretrained tower
//!   probe_train=600      probe_val=600          linear probe on Eval-part scenes
//!   s1_captions=4096     s1_vqa=8192   proj_steps=100   full_steps=1600  s1_batch=16
//!   proj_lr=1e-3         full_lr=1e-3  tower_lr_div=5
//!   s1_drop=CAT,..       question categories left out of the stage-1 rows (as many rows drawn from the others)
//!   describe=1           the captions also join the full step as VQA rows (CAPTION_PROMPT, "Describe the image briefly .")
//!   choice=400           eval pairs    seed=0   threads=N   skip=probe,stage1,stage2
//!   hidden=96 layers=4 heads=4   the tower's shape (VisionConfig::tiny's unless given)
//!   base_cache=DIR       save the stage-1 base there, and load it from there when it exists
//!   s2_steps=6 s2_batch=8 s2_n=64 sft_lr=1e-4 dpo_lr=2e-5 beta=0.1   stage 2 as 03 / 09 train it
//! ```

use pivot::prelude::*;
use std::collections::HashMap;
use std::time::Instant;

fn main() -> Result<()> {
    let args: HashMap<String, String> =
        std::env::args().skip(1).filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: usize| get(k, &d.to_string()).parse::<usize>().expect(k);
    let float = |k: &str, d: f64| get(k, &d.to_string()).parse::<f64>().expect(k);
    if let Some(t) = args.get("threads") {
        tch::set_num_threads(t.parse().expect("threads"));
    }
    let skip = get("skip", "");
    let seed = num("seed", 0) as u64;
    let device = Device::Cpu;
    let cache = get("cache", "target/study-pilot/tower");

    let d = TowerPretrain::default();
    let pre = TowerPretrain {
        steps: num("pretrain_steps", d.steps),
        scenes: num("scenes", d.scenes),
        batch_size: num("batch", d.batch_size),
        lr: float("lr", d.lr),
        categorical_groups: num("categorical", d.categorical_groups as usize) == 1,
        patch_weight: float("patch", d.patch_weight),
        patch_shape_only: num("patch_shape_only", d.patch_shape_only as usize) == 1,
        // As 02 runs it: the world and the initialisation both follow `seed`.
        world_seed: seed,
        seed,
        live: false,
        ..d
    };
    let t = Instant::now();
    let cpu0 = cpu_seconds();
    let tiny = VisionConfig::tiny();
    let hidden = num("hidden", tiny.hidden_size as usize) as i64;
    let config = VisionConfig {
        hidden_size: hidden,
        intermediate_size: 4 * hidden,
        num_hidden_layers: num("layers", tiny.num_hidden_layers as usize) as i64,
        num_attention_heads: num("heads", tiny.num_attention_heads as usize) as i64,
        ..tiny
    };
    let tower = pre.load_or_run(config, &cache, device)?;
    println!("{tower}");
    println!(
        "pretrain wall {:.1} s, CPU {:.1} s (training alone {:.1} s wall), threads {}",
        t.elapsed().as_secs_f64(),
        cpu_seconds() - cpu0,
        tower.seconds,
        tch::get_num_threads()
    );
    let losses = tower.log.get("loss");
    if !losses.is_empty() {
        let step_s = tower.log.get("step_seconds");
        println!(
            "  loss first {:.4} last {:.4}; mean step {:.3} s",
            losses[0],
            losses[losses.len() - 1],
            step_s.iter().sum::<f64>() / step_s.len() as f64
        );
    }

    let eval = ShapesWorld::new(ShapesConfig::default().seed(seed)).part(StudyPart::Eval);
    if !skip.contains("probe") {
        let t = Instant::now();
        let train = eval.classification(Split::Train, num("probe_train", 600));
        let val = eval.classification(Split::Val, num("probe_val", 600));
        tch::manual_seed(seed as i64);
        let random = Mllm::tiny(device).encoder();
        let r = LinearProbe::default().fit(&random, &train, &val)?;
        let p = LinearProbe::default().fit(&tower.encoder, &train, &val)?;
        println!(
            "linear probe top-1 (chance {:.3}): random tower {:.3}, pretrained {:.3} ({:.1} s)",
            1.0 / 12.0,
            r.report.top1,
            p.report.top1,
            t.elapsed().as_secs_f64()
        );
    }

    let seg = num("seg", 0);
    if seg > 0 {
        let t = Instant::now();
        let (train, val) = (eval.segmentation(Split::Train, seg), eval.segmentation(Split::Val, seg / 2));
        let probe = SegProbe::new(SegMethod::PatchSeg(PatchSegProbe {
            epochs: 10,
            head: SegHead::Mlp { hidden: 256 },
            warmup_steps: 5,
            ..PatchSegProbe::new(0)
        }));
        tch::manual_seed(seed as i64);
        let random = Mllm::tiny(device).encoder();
        let mut recall = Vec::new();
        for enc in [&random, &tower.encoder] {
            let r = probe.fit(enc, &train, &val)?;
            recall.push(match r.result {
                SegResult::PatchSeg(p) => p.best.macro_recall,
                SegResult::Dense(_) => f64::NAN,
            });
        }
        println!(
            "patch-seg macro recall ({seg} + {} Eval scenes): random tower {:.3}, pretrained {:.3} ({:.1} s)",
            seg / 2,
            recall[0],
            recall[1],
            t.elapsed().as_secs_f64()
        );
    }

    let stage1_world = ShapesWorld::new(ShapesConfig::default().seed(seed)).part(StudyPart::Stage1);
    let t = Instant::now();
    let pairs_eval = eval.balanced_preferences(Split::Test, num("choice", 400))?;
    // `s1_drop`: question categories left out of the stage-1 rows (more pairs are drawn so that
    // `s1_vqa` rows remain), e.g. `count`, which the base answers from a global summary anyway.
    let s1_drop: Vec<String> = get("s1_drop", "").split(',').filter(|c| !c.is_empty()).map(String::from).collect();
    let s1_vqa = num("s1_vqa", 8192);
    let mut pairs_s1 = stage1_world.balanced_preferences(Split::Train, s1_vqa * 5 / (5 - s1_drop.len().min(4)) + 16)?;
    pairs_s1.samples.retain(|s| !s1_drop.contains(&s.category));
    pairs_s1.samples.truncate(s1_vqa);
    println!("stage-1 question rows by category: {:?}", pairs_s1.category_counts());
    let legacy_train = ShapesWorld::new(ShapesConfig::default().seed(seed)).preferences(Split::Train, 2048);
    let legacy_test = ShapesWorld::new(ShapesConfig::default().seed(seed)).preferences(Split::Val, 2048);
    println!(
        "text-only answer-word baseline: balanced pairs {:.3} (fit on stage-1 rows, scored on eval rows), legacy world.preferences {:.3}; pairs built in {:.1} s; eval categories {:?}",
        text_only_accuracy(&pairs_s1, &pairs_eval),
        text_only_accuracy(&legacy_train, &legacy_test),
        t.elapsed().as_secs_f64(),
        pairs_eval.category_counts()
    );
    if skip.contains("stage1") {
        return Ok(());
    }

    let base_cache = get("base_cache", "");
    let base = if !base_cache.is_empty() && std::path::Path::new(&base_cache).join("config.json").is_file() {
        println!("stage 1: base loaded from {base_cache}");
        Mllm::from_pretrained(&base_cache, device)?
    } else {
        let mut base = tower.mllm(LanguageModel::tiny(device))?;
        let caps = stage1_world.captions(Split::Train, num("s1_captions", 4096));
        // As 02: with `describe=1` the captions also join the full step as VQA rows
        // (CAPTION_PROMPT -> the caption).
        let vqa = if num("describe", 1) == 1 { pairs_s1.to_sft().concat(&caps.to_vqa(CAPTION_PROMPT)) } else { pairs_s1.to_sft() };
        let full_lr = float("full_lr", 1e-3);
        let mut stage1 = Stage1::default().seed(seed);
        stage1.projector = stage1.projector.max_steps(num("proj_steps", 100)).batch_size(num("s1_batch", 16)).lr(float("proj_lr", 1e-3)).quiet();
        stage1.full = stage1.full.max_steps(num("full_steps", 1600)).batch_size(num("s1_batch", 16)).lr(full_lr).quiet();
        stage1.full.tower_lr = Some(full_lr / float("tower_lr_div", 5.0));
        let t = Instant::now();
        let cpu0 = cpu_seconds();
        let log = stage1.run(&mut base, &caps, &vqa)?;
        println!(
            "stage 1: projector {} steps (loss {:.3} -> {:.3}), full {} steps (loss {:.3} -> {:.3}) in {:.1} s wall, {:.1} CPU-s",
            log.projector.len(),
            log.projector.mean_first("loss", 5),
            log.projector.mean_last("loss", 5),
            log.full.len(),
            log.full.mean_first("loss", 5),
            log.full.mean_last("loss", 5),
            t.elapsed().as_secs_f64(),
            cpu_seconds() - cpu0
        );
        // The full step's loss curve in tenths: a drop below the text-only plateau (the deciding
        // word at its prior) is where the LM starts reading the image.
        let full_losses = log.full.get("loss");
        let tenth = (full_losses.len() / 10).max(1);
        let curve: Vec<String> = full_losses.chunks(tenth).map(|c| format!("{:.3}", c.iter().sum::<f64>() / c.len() as f64)).collect();
        println!("stage 1 full loss by tenths: {}", curve.join(" "));
        if !base_cache.is_empty() {
            base.save_pretrained(&base_cache)?;
        }
        base
    };
    let t = Instant::now();
    let use_ = ChoiceEval::default().quiet().image_use(&base, &pairs_eval)?;
    println!("base {use_} ({:.1} s)", t.elapsed().as_secs_f64());
    println!("{}", use_.with_image);
    let image_pairs = eval.image_preferences(Split::Test, num("choice", 400))?;
    let r = ChoiceEval::default().quiet().run(&base, &image_pairs)?;
    println!("image-counterfactual choice (right image vs changed image): {:.3}", r.accuracy());
    if skip.contains("stage2") {
        return Ok(());
    }

    // Stage 2 as 03 / 09 train it: both arms on the same balanced Stage2 rows, DPO also on their
    // image-counterfactual form; then how far each tower moved and the measures the pilot can
    // afford (probe top-1 on the Eval scenes, choice accuracy minus blank).
    let stage2 = ShapesWorld::new(ShapesConfig::default().seed(seed)).part(StudyPart::Stage2);
    let n2 = num("s2_n", 64);
    let pairs = stage2.balanced_preferences(Split::Train, n2)?;
    let cfg = |lr: f64| TrainConfig::default().max_steps(num("s2_steps", 6)).batch_size(num("s2_batch", 8)).lr(lr).seed(seed).quiet();
    let probe_sets = (!skip.contains("probe")).then(|| (eval.classification(Split::Train, num("probe_train", 600)), eval.classification(Split::Val, num("probe_val", 600))));
    let base_probe = match &probe_sets {
        Some((tr, va)) => LinearProbe::default().fit(&base.encoder(), tr, va)?.report.top1,
        None => f64::NAN,
    };
    println!("base: probe top-1 {base_probe:.3}, choice gain {:.3}", use_.gain());
    for arm in ["SFT", "DPO"] {
        let t = Instant::now();
        let mut m = base.clone();
        let log = if arm == "DPO" {
            let prefs = PreferenceDataset::new([pairs.samples.clone(), stage2.image_preferences(Split::Train, n2)?.samples].concat());
            DpoTrainer::new(DpoConfig { beta: float("beta", 0.1), train: cfg(float("dpo_lr", 2e-5)), ..Default::default() }).run(&mut m, &prefs)?
        } else {
            SftTrainer::new(cfg(float("sft_lr", 1e-4))).run(&mut m, &pairs.to_sft())?
        };
        let train_s = t.elapsed().as_secs_f64();
        let u = ChoiceEval::default().quiet().image_use(&m, &pairs_eval)?;
        let top1 = match &probe_sets {
            Some((tr, va)) => LinearProbe::default().fit(&m.encoder(), tr, va)?.report.top1,
            None => f64::NAN,
        };
        println!(
            "stage 2 {arm}: {} steps (loss {:.4} -> {:.4}) in {train_s:.1} s; relative tower change {:.3e}; probe top-1 {top1:.3}; {u}; gain {:.3}",
            log.len(),
            log.mean_first("loss", 3),
            log.mean_last("loss", 3),
            tower_change(&base, &m),
            u.gain()
        );
    }
    Ok(())
}

/// How far `m`'s tower moved from `from`'s: relative L2 change over all tower weights (03's).
fn tower_change(from: &Mllm, m: &Mllm) -> f64 {
    let b = from.tower.var_store().variables();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (k, v) in m.tower.var_store().variables() {
        num += (&v - &b[&k]).square().sum(Kind::Double).double_value(&[]);
        den += b[&k].square().sum(Kind::Double).double_value(&[]);
    }
    (num / den.max(1e-30)).sqrt()
}

/// CPU seconds (user + system) this process has used so far, from /proc/self/stat (Linux; NaN
/// elsewhere): the cost measure the study's budget is set in, since the wall time on a shared
/// machine depends on what else runs.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; in clock ticks
    // of 1/100 s on Linux.
    match (f.get(11).and_then(|v| v.parse::<f64>().ok()), f.get(12).and_then(|v| v.parse::<f64>().ok())) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}
