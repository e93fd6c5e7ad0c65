//! DPO step time: one vs two image encodings per pair, online vs cached reference log-probs.
//!
//! `cargo run -p pivot --example bench_dpo [-- STEPS BATCH]` (release for real numbers:
//! `cargo run --release -p pivot --example bench_dpo`). Uses CUDA when available. A benchmark,
//! not a test: it prints a table and asserts nothing.

use pivot::prelude::*;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let steps = args.first().copied().unwrap_or(10);
    let batch = args.get(1).copied().unwrap_or(8);
    let dev = Device::cuda_if_available();
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.preferences(Split::Train, batch * (steps + 1));
    println!("DPO step time, tiny MLLM on {dev:?}, {batch} pairs per step, median of {steps} steps after 1 warm-up\n");

    let modes = [("PIVOT: 2 encodings, online ref", true, false), ("1 encoding, online ref", false, false), ("2 encodings, cached ref", true, true), ("1 encoding, cached ref", false, true)];
    let mut rows = Vec::new();
    for (name, double, cached) in modes {
        tch::manual_seed(0);
        let mut mllm = Mllm::tiny(dev);
        let cfg = DpoConfig {
            double_encoding: double,
            cached_reference: cached,
            train: TrainConfig::default().lr(1e-4).batch_size(batch).max_steps(steps + 1).quiet(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let log = DpoTrainer::new(cfg).run(&mut mllm, &data)?;
        let total = t0.elapsed().as_secs_f64();
        let step_s = log.get("step_seconds");
        let setup = total - step_s.iter().sum::<f64>();
        let med = median(step_s[1..].to_vec());
        rows.push((name, med, setup, log.mean_last("samples_per_second", steps)));
    }
    let base = rows[0].1;
    println!("{:<34} {:>12} {:>10} {:>14} {:>12}", "mode", "step (ms)", "speed-up", "pairs/s", "setup (ms)");
    for (name, med, setup, sps) in &rows {
        println!("{name:<34} {:>12.1} {:>9.2}x {:>14.1} {:>12.1}", med * 1e3, base / med, sps, setup * 1e3);
    }
    println!("\nsetup = run time outside the steps (reference copy, or reference log-probs of the whole set: {} pairs)", data.len());
    Ok(())
}
