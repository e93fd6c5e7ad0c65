//! Pilot of the embedded study's design (issue 14): how long the tower pretraining takes and
//! where its linear probe lands, whether the stage-1 base uses the image (two-way choice with
//! the images vs blank images), and the text-only baseline on the balanced pairs. A measurement
//! tool, not a test: it prints what it measured and never fails on the numbers.
//!
//! ```text
//! cargo run --release -p pivot --example study_pilot -- [key=value ...]
//!   cache=DIR            pretrained-tower cache (default target/study-pilot/tower)
//!   pretrain_steps, scenes, batch, lr: TowerPretrain's defaults unless given (its seeds: `seed`, as 02)
//!   probe_train=600      probe_val=600          linear probe on Eval-part scenes
//!   s1_captions=1024     s1_vqa=2048   proj_steps=100   full_steps=400   s1_batch=16
//!   proj_lr=1e-3         full_lr=1e-3  tower_lr_div=5
//!   choice=400           eval pairs    seed=0   threads=N   skip=probe,stage1
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
        // As 02 runs it: the world and the initialisation both follow `seed`.
        world_seed: seed,
        seed,
        live: false,
        ..d
    };
    let t = Instant::now();
    let tower = pre.load_or_run(VisionConfig::tiny(), &cache, device)?;
    println!("{tower}");
    println!("pretrain wall {:.1} s (training alone {:.1} s), threads {}", t.elapsed().as_secs_f64(), tower.seconds, tch::get_num_threads());
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

    let stage1_world = ShapesWorld::new(ShapesConfig::default().seed(seed)).part(StudyPart::Stage1);
    let t = Instant::now();
    let pairs_eval = eval.balanced_preferences(Split::Test, num("choice", 400))?;
    let pairs_s1 = stage1_world.balanced_preferences(Split::Train, num("s1_vqa", 2048))?;
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

    let mut base = tower.mllm(LanguageModel::tiny(device))?;
    let caps = stage1_world.captions(Split::Train, num("s1_captions", 1024));
    let vqa = pairs_s1.to_sft();
    let full_lr = float("full_lr", 1e-3);
    let mut stage1 = Stage1::default().seed(seed);
    stage1.projector = stage1.projector.max_steps(num("proj_steps", 100)).batch_size(num("s1_batch", 16)).lr(float("proj_lr", 1e-3)).quiet();
    stage1.full = stage1.full.max_steps(num("full_steps", 400)).batch_size(num("s1_batch", 16)).lr(full_lr).quiet();
    stage1.full.tower_lr = Some(full_lr / float("tower_lr_div", 5.0));
    let t = Instant::now();
    let log = stage1.run(&mut base, &caps, &vqa)?;
    println!(
        "stage 1: projector {} steps (loss {:.3} -> {:.3}), full {} steps (loss {:.3} -> {:.3}) in {:.1} s",
        log.projector.len(),
        log.projector.mean_first("loss", 5),
        log.projector.mean_last("loss", 5),
        log.full.len(),
        log.full.mean_first("loss", 5),
        log.full.mean_last("loss", 5),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let use_ = ChoiceEval::default().quiet().image_use(&base, &pairs_eval)?;
    println!("{use_} ({:.1} s)", t.elapsed().as_secs_f64());
    println!("{}", use_.with_image);
    let image_pairs = eval.image_preferences(Split::Test, num("choice", 400))?;
    let r = ChoiceEval::default().quiet().run(&base, &image_pairs)?;
    println!("image-counterfactual choice (right image vs changed image): {:.3}", r.accuracy());
    Ok(())
}
