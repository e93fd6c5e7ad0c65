//! Training-step and probe-fit benchmark of the prelude, the Rust half of `benches/` (the Python
//! references are `benches/ref_train.py` and `benches/ref_probe.py`; `benches/run.py` runs both
//! back to back and prints the table). A benchmark, not a test: it reports and never fails on speed.
//!
//! ```text
//! bench_train export --size cpu --out DIR          shapes.json + batch.safetensors for the reference
//! bench_train dpo    --size cpu --variant pivot    one DPO configuration, JSON on stdout
//!                    (variants: pivot = 2 encodings + online ref, single, cached, single_cached)
//! bench_train sft    --size cpu
//! bench_train probe  --features F.safetensors      LogisticRegression::fit on the reference's features
//! common options: --steps N --warmup W --threads T --device cpu|cuda --json PATH
//! ```
//!
//! Each configuration runs in its own process so that the peak RSS (VmHWM) belongs to it alone.
//! On a GPU box without a Rust toolchain, copy the built binary and point it at that machine's
//! torch: `LD_LIBRARY_PATH=$(python -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib`
//! (see benches/README.md).

use pivot::prelude::*;
use std::collections::BTreeMap;
use std::time::Instant;

struct Size {
    name: &'static str,
    vision: VisionConfig,
    lm: Qwen2Config,
    /// Text tokens of a chosen / rejected sequence (ids including the one image placeholder).
    chosen_len: usize,
    rejected_len: usize,
    dpo_pairs: usize,
    sft_batch: usize,
    kind: Kind,
}

fn size(name: &str) -> Result<Size> {
    Ok(match name {
        // Scaled-down SigLIP (160 px / 16 → 100 image tokens, 5 × 384, the last layer unused as in
        // PIVOT) + Qwen2-style decoder (4 × 384, GQA 6/2, 32k vocabulary), fp32.
        "cpu" => Size {
            name: "cpu",
            vision: VisionConfig {
                name: "bench-siglip-384x5".into(),
                hidden_size: 384,
                intermediate_size: 1536,
                num_hidden_layers: 5,
                num_attention_heads: 6,
                image_size: 160,
                patch_size: 16,
                use_head: false,
                ..VisionConfig::tiny()
            },
            lm: Qwen2Config {
                name: "bench-qwen2-384x4".into(),
                vocab_size: 32000,
                hidden_size: 384,
                intermediate_size: 1024,
                num_hidden_layers: 4,
                num_attention_heads: 6,
                num_key_value_heads: 2,
                head_dim: 64,
                rope_theta: 1e6,
                ..Qwen2Config::tiny(32000)
            },
            chosen_len: 96,
            rejected_len: 80,
            dpo_pairs: 2,
            sft_batch: 4,
            kind: Kind::Float,
        },
        // The real shapes: SigLIP2-So400m/16 at 384 (576 tokens) + Qwen2.5-0.5B, bf16.
        "gpu" => Size {
            name: "gpu",
            vision: VisionConfig::preset("siglip2-so400m-patch16-384")?,
            lm: Qwen2Config::preset("qwen2.5-0.5b")?,
            chosen_len: 512,
            rejected_len: 448,
            dpo_pairs: 4,
            sft_batch: 8,
            kind: Kind::BFloat16,
        },
        other => return Err(PivotError::invalid(format!("unknown size `{other}` (cpu, gpu)"))),
    })
}

struct Args {
    cmd: String,
    opts: BTreeMap<String, String>,
}

impl Args {
    fn parse() -> Self {
        let mut it = std::env::args().skip(1);
        let cmd = it.next().unwrap_or_else(|| "help".into());
        let mut opts = BTreeMap::new();
        while let Some(k) = it.next() {
            let key = k.trim_start_matches("--").to_string();
            opts.insert(key, it.next().unwrap_or_default());
        }
        Args { cmd, opts }
    }
    fn get(&self, k: &str, default: &str) -> String {
        self.opts.get(k).cloned().unwrap_or_else(|| default.to_string())
    }
    fn num(&self, k: &str, default: usize) -> usize {
        self.opts.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}

fn build_model(s: &Size, dev: Device) -> Result<Mllm> {
    tch::manual_seed(0);
    let tower = VisionTower::new(s.vision.clone(), dev);
    let lm = LanguageModel::new(s.lm.clone(), Tokenizer::tiny(), dev)?;
    let m = Mllm::new(tower, lm, MllmConfig::default());
    Ok(if s.kind == Kind::Float { m } else { m.to_kind(s.kind) })
}

/// Pads an answer with words until the chat sequence has exactly `target` ids.
fn fit_answer(m: &Mllm, question: &str, answer: &str, filler: &[String], target: usize) -> Result<String> {
    let mut words: Vec<String> = answer.split_whitespace().map(str::to_string).collect();
    let mut k = 0;
    loop {
        let text = words.join(" ");
        let n = m.encode_chat(question, Some(&text))?.ids.len();
        if n == target {
            return Ok(text);
        }
        if n > target {
            return Err(PivotError::invalid(format!("prompt + answer already has {n} > {target} tokens")));
        }
        for _ in 0..target - n {
            words.push(filler[k % filler.len()].clone());
            k += 1;
        }
    }
}

/// ShapesWorld preference pairs (rendered at the tower's resolution) whose chosen / rejected
/// answers are lengthened to fixed sequence lengths (MMPR answers are long reasoning chains).
fn build_data(m: &Mllm, s: &Size, n: usize) -> Result<PreferenceDataset> {
    let world = ShapesWorld::new(ShapesConfig::default().seed(0).image_size(s.vision.image_size as u32));
    let mut data = world.preferences(Split::Train, n);
    for p in &mut data.samples {
        let filler: Vec<String> = format!("{} {} {}", p.chosen, p.question, p.rejected)
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        p.chosen = fit_answer(m, &p.question, &p.chosen, &filler, s.chosen_len)?;
        p.rejected = fit_answer(m, &p.question, &p.rejected, &filler, s.rejected_len)?;
    }
    Ok(data)
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// User + system CPU seconds of this process (all threads): less sensitive than wall time to
/// other processes sharing the cores.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

fn device(a: &Args) -> Device {
    match a.get("device", "cpu").as_str() {
        "cuda" => {
            if !cuda_available() {
                eprintln!("bench_train: --device cuda but no usable CUDA device; set LD_LIBRARY_PATH to torch/lib");
                std::process::exit(2);
            }
            Device::Cuda(0)
        }
        _ => Device::Cpu,
    }
}

fn param_count(m: &Mllm) -> i64 {
    [m.tower.var_store(), m.projector.var_store(), m.lm.var_store()]
        .iter()
        .flat_map(|vs| vs.variables().into_values())
        .map(|t| t.numel() as i64)
        .sum()
}

fn emit(a: &Args, v: serde_json::Value) {
    let text = serde_json::to_string(&v).expect("json");
    if let Some(p) = a.opts.get("json") {
        std::fs::write(p, &text).expect("writing --json");
    }
    println!("{text}");
}

/// Writes the shapes and the exact token ids / pixels the trainer sees, for the reference.
fn export(a: &Args, s: &Size) -> Result<()> {
    let out = std::path::PathBuf::from(a.get("out", "out/bench"));
    std::fs::create_dir_all(&out).map_err(|e| PivotError::file(&out, e))?;
    let m = build_model(s, Device::Cpu)?;
    let n = a.num("pairs", s.dpo_pairs.max(s.sft_batch) * 4);
    let data = build_data(&m, s, n)?;
    let (mut ids_c, mut lab_c, mut ids_r, mut lab_r, mut images) = (vec![], vec![], vec![], vec![], vec![]);
    for p in &data.samples {
        let c = m.encode_chat(&p.question, Some(&p.chosen))?;
        let r = m.encode_chat(&p.question, Some(&p.rejected))?;
        ids_c.extend(c.ids);
        lab_c.extend(c.labels);
        ids_r.extend(r.ids);
        lab_r.extend(r.labels);
        images.push(p.image.load()?);
    }
    let nn = n as i64;
    let t = |v: &Vec<i64>, len: usize| Tensor::from_slice(v).view([nn, len as i64]);
    let pixels = m.preprocess(&images)?.to_kind(Kind::Float);
    let tensors = [
        ("chosen_ids", t(&ids_c, s.chosen_len)),
        ("chosen_labels", t(&lab_c, s.chosen_len)),
        ("rejected_ids", t(&ids_r, s.rejected_len)),
        ("rejected_labels", t(&lab_r, s.rejected_len)),
        ("pixels", pixels),
    ];
    Tensor::write_safetensors(&tensors, out.join("batch.safetensors")).map_err(|e| PivotError::invalid(e.to_string()))?;
    let shapes = serde_json::json!({
        "size": s.name,
        "vision_hf": s.vision.to_hf_json(),
        "lm_hf": s.lm.to_hf_json(),
        "image_tokens": m.image_token_count(),
        "select_layer": m.config.select_layer,
        "chosen_len": s.chosen_len,
        "rejected_len": s.rejected_len,
        "dpo_pairs": s.dpo_pairs,
        "sft_batch": s.sft_batch,
        "dtype": if s.kind == Kind::Float { "float32" } else { "bfloat16" },
        "pad_id": m.tokenizer().pad,
        "num_pairs": n,
        "params": param_count(&m),
    });
    std::fs::write(out.join("shapes.json"), serde_json::to_string_pretty(&shapes).expect("json"))
        .map_err(|e| PivotError::file(out.join("shapes.json"), e))?;
    emit(a, serde_json::json!({"exported": out.display().to_string(), "pairs": n}));
    Ok(())
}

fn train(a: &Args, s: &Size, dpo: bool) -> Result<()> {
    let dev = device(a);
    let threads = a.num("threads", 0);
    if threads > 0 {
        tch::set_num_threads(threads as i32);
        tch::set_num_interop_threads(threads as i32);
    }
    let steps = a.num("steps", 5);
    let warmup = a.num("warmup", 1);
    let total = steps + warmup;
    let variant = a.get("variant", if dpo { "pivot" } else { "sft" });
    let (double, cached) = match variant.as_str() {
        "pivot" => (true, false),
        "single" => (false, false),
        "cached" => (true, true),
        "single_cached" => (false, true),
        _ => (false, false),
    };
    let t_build = Instant::now();
    let mut m = build_model(s, dev)?;
    let params = param_count(&m);
    // --batch: pairs (DPO) or sequences (SFT) per step instead of the size's.
    let batch = a.num("batch", if dpo { s.dpo_pairs } else { s.sft_batch });
    let prefs = build_data(&m, s, batch * total)?;
    let build_s = t_build.elapsed().as_secs_f64();

    let stamps = std::rc::Rc::new(std::cell::RefCell::new(Vec::<(Instant, f64)>::new()));
    let hook = {
        let stamps = stamps.clone();
        move |_: &StepMetrics| {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
            stamps.borrow_mut().push((Instant::now(), cpu_seconds()));
        }
    };
    // --prefetch 0 prepares each batch inside the step (as before the prefetch thread existed).
    let prefetch = a.num("prefetch", TrainConfig::default().prefetch);
    // --recompute none|tower|lm|both: activation checkpointing (docs/memory.md's "ckpt." columns).
    let recompute = a.get("recompute", "none");
    let (recompute_tower, recompute_lm) = match recompute.as_str() {
        "none" => (false, false),
        "tower" => (true, false),
        "lm" => (false, true),
        "both" => (true, true),
        other => return Err(PivotError::invalid(format!("--recompute `{other}`: none, tower, lm or both"))),
    };
    let train = TrainConfig { shuffle: false, recompute_tower, recompute_lm, ..TrainConfig::default() }.lr(1e-6).batch_size(batch).max_steps(total).prefetch(prefetch).quiet();
    let t0 = Instant::now();
    let log = if dpo {
        let cfg = DpoConfig { double_encoding: double, cached_reference: cached, train, ..Default::default() };
        DpoTrainer::new(cfg).on_step(hook).run(&mut m, &prefs)?
    } else {
        SftTrainer::new(train).on_step(hook).run(&mut m, &prefs.to_sft())?
    };
    let run_s = t0.elapsed().as_secs_f64();
    // Step k's time = its own step_seconds for the first, then the gap between hook calls (this
    // includes the hook/log overhead and, on CUDA, the synchronisation).
    let st = stamps.borrow();
    let step_secs = log.get("step_seconds");
    let mut times = vec![step_secs[0]];
    times.extend(st.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()));
    let cpu_times: Vec<f64> = st.windows(2).map(|w| w[1].1 - w[0].1).skip(warmup.saturating_sub(1)).collect();
    let setup_s = run_s - times.iter().sum::<f64>();
    let measured: Vec<f64> = times[warmup.min(times.len())..].to_vec();
    let tokens = log.get("tokens_per_second").iter().zip(&step_secs).map(|(t, s)| t * s).next().unwrap_or(0.0);
    let med = median(measured.clone());
    let samples = batch as f64;
    // PIVOT_PROFILE_STEPS=1: median seconds per phase over the measured steps.
    let phases: serde_json::Map<String, serde_json::Value> = pivot::train::take_step_profile()
        .into_iter()
        .map(|(name, v)| (name, serde_json::json!(median(v[warmup.min(v.len())..].to_vec()))))
        .collect();
    emit(
        a,
        serde_json::json!({
            "side": "ours",
            "task": if dpo { "dpo" } else { "sft" },
            "variant": variant,
            "prefetch": prefetch,
            "recompute": recompute,
            "size": s.name,
            "device": format!("{dev:?}"),
            "dtype": format!("{:?}", s.kind),
            "threads": tch::get_num_threads(),
            "batch": batch,
            "sequences": if dpo { 2 * batch } else { batch },
            "images_encoded": if dpo && double { 2 * batch } else { batch },
            "tokens_per_step": tokens,
            "step_s": med,
            "phases_s": phases,
            "step_times_s": measured,
            "step_cpu_s": median(cpu_times.clone()),
            "step_cpu_times_s": cpu_times,
            "tokens_per_s": tokens / med,
            "samples_per_s": samples / med,
            "setup_s": setup_s,
            "build_s": build_s,
            "peak_rss_mib": vm_hwm_mib(),
            "params": params,
            "loss_first": log.get("loss").first().copied(),
        }),
    );
    Ok(())
}

fn probe(a: &Args) -> Result<()> {
    let threads = a.num("threads", 0);
    if threads > 0 {
        tch::set_num_threads(threads as i32);
        tch::set_num_interop_threads(threads as i32);
    }
    let dev = device(a);
    let path = a.get("features", "out/bench/probe_features.safetensors");
    let c: f64 = a.get("c", "1.0").parse().unwrap_or(1.0);
    let map: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(|e| PivotError::invalid(format!("{path}: {e}")))?
        .into_iter()
        .collect();
    let get = |k: &str| map.get(k).map(|t| t.to_device(dev)).ok_or_else(|| PivotError::invalid(format!("{path}: no `{k}`")));
    let (xtr, ytr, xte, yte) = (get("x_train")?, get("y_train")?, get("x_test")?, get("y_test")?);
    let k = ytr.max().int64_value(&[]) + 1;
    let mut rows = Vec::new();
    // Default options (gtol 1e-7) and sklearn's stopping rule (tol 1e-4 on the max gradient entry),
    // each on the features as stored (float32: float32 products, as sklearn) and cast to float64
    // (float64 products throughout, what the fit did before it followed the features' precision).
    let xtr64 = xtr.to_kind(Kind::Double);
    let variants = [
        ("ours_default", None, &xtr),
        ("ours_sklearn_tol", Some(1e-4), &xtr),
        ("ours_default_f64", None, &xtr64),
        ("ours_sklearn_tol_f64", Some(1e-4), &xtr64),
    ];
    for (name, tol, x) in variants {
        let mut opts = LbfgsOptions::default();
        if let Some(t) = tol {
            opts.tolerance_grad = t;
        }
        let mut fit_times = Vec::new();
        let mut last = None;
        let mut transfers = 0;
        for _ in 0..a.num("repeats", 1) {
            let before = pivot::probe::lbfgs::host_transfers();
            let t0 = Instant::now();
            let model = LogisticRegression::fit_with(x, &ytr, c, opts, Some(k), None)?;
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
            fit_times.push(t0.elapsed().as_secs_f64());
            transfers = pivot::probe::lbfgs::host_transfers() - before;
            last = Some(model);
        }
        let model = last.expect("one fit");
        let top1 = model.predict(&xte).eq_tensor(&yte.to_kind(Kind::Int64)).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        rows.push(serde_json::json!({
            "name": name, "fit_s": median(fit_times), "top1": top1, "iterations": model.info.iterations,
            "evaluations": model.info.evaluations, "objective": model.objective(&xtr, &ytr),
            "converged": model.info.converged, "tolerance_grad": opts.tolerance_grad,
            "features": format!("{:?}", x.kind()),
            // Device→host transfers of the L-BFGS driver in one fit (each a sync on a GPU).
            "host_transfers": transfers,
        }));
    }
    emit(a, serde_json::json!({"side": "ours", "task": "probe", "device": format!("{dev:?}"), "threads": tch::get_num_threads(), "c": c, "fits": rows, "peak_rss_mib": vm_hwm_mib()}));
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let s = size(&a.get("size", "cpu"))?;
    match a.cmd.as_str() {
        "export" => export(&a, &s),
        "dpo" => train(&a, &s, true),
        "sft" => train(&a, &s, false),
        "probe" => probe(&a),
        _ => {
            eprintln!("usage: bench_train export|dpo|sft|probe [--size cpu|gpu] [--variant pivot|single|cached|single_cached] [--steps N] [--warmup W] [--threads T] [--device cpu|cuda] [--batch N] [--recompute none|tower|lm|both] [--json PATH]");
            Ok(())
        }
    }
}
