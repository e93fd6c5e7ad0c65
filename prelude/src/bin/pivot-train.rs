//! `pivot-train CONFIG`: stage 1, SFT or DPO from a TOML file, alone or as one rank of a
//! data-parallel run started by torchrun:
//!
//! ```text
//! pivot-train run.toml
//! torchrun --standalone --nproc-per-node 2 --no-python pivot-train run.toml
//! ```
//!
//! The file (relative paths are taken from its folder):
//!
//! ```toml
//! stage = "dpo"              # "stage1", "sft" or "dpo"
//! threads = 1                # torch threads per rank (default: torch's choice)
//! device = "cpu"             # or "cuda": each rank takes GPU LOCAL_RANK
//! backend = "nccl"           # c10d backend; absent: NCCL for cuda, Gloo for cpu. Named, a
//!                            # one-rank torchrun run also forms a (one-rank) group
//!
//! [model]
//! pretrained = "base"        # a `save_pretrained` folder; absent: the tiny MLLM from `seed`
//! seed = 0
//! dtype = "bf16"             # or "fp32" (default): the weights' dtype for training
//! output = "out/dpo"         # rank 0 writes the trained model and log.csv here
//!
//! [data]                     # files, or the built-in world
//! preferences = "pairs.jsonl"  # DPO (`vqa` for SFT and stage 1's full step, `captions` for its first)
//! image_root = "images"
//! # world = { seed = 0, samples = 64 }
//! # world = { seed = 0, samples = 64, part = "stage2", balanced = true, image_pairs = true }
//! #   the study's rows, as notebooks 03 and 09 train on them: one scene stream of the world
//! #   (`pretrain`, `stage1`, `stage2`, `eval`), balanced pairs (SFT: their chosen answers), and for
//! #   DPO also each pair's image-counterfactual form (`image_rejected`)
//!
//! [train]                    # every TrainConfig field (SFT); DPO: [dpo] and [dpo.train];
//! lr = 5e-6                  # stage 1: [stage1.projector] and [stage1.full]
//! batch_size = 2
//! ```
//!
//! Restarts: under `torchrun --max-restarts K`, a failed worker makes torchrun stop every rank and
//! start them all again with `TORCHELASTIC_RESTART_COUNT` raised; such a restarted attempt
//! resumes each stage from the newest complete checkpoint in its `checkpoint_dir` (when there is
//! one and `resume_from` is not set), so the run continues from its last complete checkpoint.
//!
//! `pivot-train --memory siglip2-so400m-patch16-384 qwen2.5-7b` prints what a rank holds per
//! component (`pivot::train::memory`, as in docs/memory.md).
//!
//! `pivot-train --check-dist [gloo|nccl]` (under torchrun) only checks that the ranks' collectives
//! give the right values, before a long run is trusted to them (NCCL: on CUDA tensors and on CPU
//! ones staged through the GPU; at one rank too).
//!
//! `PIVOT_METRICS_JSONL=PATH`: rank 0 appends each step's metrics to PATH (stage 1: the full part's
//! steps numbered after the projector part's), one JSON object a line (`{"step":1,"epoch":0.25,"values":[["loss",0.69],...]}`, `StepMetrics`), written whole
//! per step, so a launcher (`pivot::train::launch`) can follow the run.
//!
//! A bad file stops before anything runs, naming the file, line and field. Every rank prints a
//! digest of its final weights (equal digests: the ranks stayed in step) and the bytes it put into
//! all-reduces per step, and the bytes of checkpoint files it wrote.

use pivot::prelude::*;
use pivot::train::dist;
use serde::Deserialize;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    stage: StageName,
    #[serde(default)]
    threads: Option<i32>,
    #[serde(default)]
    device: DeviceName,
    #[serde(default)]
    backend: Option<dist::Backend>,
    #[serde(default)]
    model: ModelSection,
    data: DataSection,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    dpo: DpoConfig,
    #[serde(default)]
    stage1: Stage1,
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StageName {
    Stage1,
    Sft,
    Dpo,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DeviceName {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    pretrained: Option<PathBuf>,
    #[serde(default)]
    seed: i64,
    output: Option<PathBuf>,
    /// The weights' dtype for training (bf16: AdamW keeps an fp32 master copy).
    #[serde(default)]
    dtype: DtypeName,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DtypeName {
    #[default]
    Fp32,
    Bf16,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSection {
    world: Option<WorldData>,
    captions: Option<PathBuf>,
    vqa: Option<PathBuf>,
    preferences: Option<PathBuf>,
    image_root: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorldData {
    #[serde(default)]
    seed: u64,
    samples: usize,
    #[serde(default)]
    part: Option<PartName>,
    #[serde(default)]
    balanced: bool,
    #[serde(default)]
    image_pairs: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PartName {
    Pretrain,
    Stage1,
    Stage2,
    Eval,
}

impl From<PartName> for StudyPart {
    fn from(p: PartName) -> Self {
        match p {
            PartName::Pretrain => StudyPart::Pretrain,
            PartName::Stage1 => StudyPart::Stage1,
            PartName::Stage2 => StudyPart::Stage2,
            PartName::Eval => StudyPart::Eval,
        }
    }
}

impl WorldData {
    fn world(&self) -> ShapesWorld {
        let world = ShapesWorld::new(ShapesConfig { seed: self.seed, ..ShapesConfig::default() });
        match self.part {
            Some(p) => world.part(p.into()),
            None => world,
        }
    }

    /// The world's preference pairs: plain, or balanced (plus their image-counterfactual form).
    fn preferences(&self, world: &ShapesWorld) -> Result<PreferenceDataset> {
        if !self.balanced {
            return Ok(world.preferences(Split::Train, self.samples));
        }
        let pairs = world.balanced_preferences(Split::Train, self.samples)?;
        Ok(if self.image_pairs {
            PreferenceDataset::new([pairs.samples, world.image_preferences(Split::Train, self.samples)?.samples].concat())
        } else {
            pairs
        })
    }

    /// The world's VQA samples: plain, or the balanced pairs' chosen answers.
    fn vqa(&self, world: &ShapesWorld) -> Result<VqaDataset> {
        Ok(if self.balanced { world.balanced_preferences(Split::Train, self.samples)?.to_sft() } else { world.vqa(Split::Train, self.samples) })
    }
}

/// `file:line:column: field `a.b`: message`, from toml's span of the offending key or value.
fn toml_error(path: &Path, text: &str, err: &toml::de::Error) -> PivotError {
    let Some(span) = err.span() else {
        return PivotError::config(path.display().to_string(), "", err.message());
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    // The key on the error's line (before `=`), under the nearest `[table]` above it.
    let key = line_text.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string()).unwrap_or_else(|| line_text.trim().to_string());
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let field = match table {
        Some(t) if !key.starts_with('[') => format!("{t}.{key}"),
        _ => key,
    };
    PivotError::config(format!("{}:{line}:{column}", path.display()), field, err.message().trim())
}

impl RunConfig {
    fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| PivotError::file(path, e))?;
        let mut cfg: RunConfig = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut Option<PathBuf>| {
            if let Some(q) = p.as_mut().filter(|q| q.is_relative()) {
                *q = base.join(&*q);
            }
        };
        for p in [&mut cfg.model.pretrained, &mut cfg.model.output, &mut cfg.data.captions, &mut cfg.data.vqa, &mut cfg.data.preferences, &mut cfg.data.image_root] {
            resolve(p);
        }
        for t in [&mut cfg.train, &mut cfg.dpo.train, &mut cfg.stage1.projector, &mut cfg.stage1.full] {
            resolve(&mut t.checkpoint_dir);
            resolve(&mut t.resume_from);
        }
        let needs = |field: &str, what: &str| PivotError::config(path.display().to_string(), field, format!("stage {:?} needs {what}", cfg.stage));
        let world = cfg.data.world.is_some();
        match cfg.stage {
            StageName::Dpo if !world && cfg.data.preferences.is_none() => return Err(needs("data.preferences", "preference pairs (or data.world)")),
            StageName::Sft if !world && cfg.data.vqa.is_none() => return Err(needs("data.vqa", "VQA samples (or data.world)")),
            StageName::Stage1 if !world && (cfg.data.vqa.is_none() || cfg.data.captions.is_none()) => {
                return Err(needs("data.captions", "captions and data.vqa (or data.world)"));
            }
            _ => {}
        }
        if cfg.data.world.as_ref().is_some_and(|w| w.image_pairs && !w.balanced) {
            // The image-counterfactual rows are made from the balanced pairs; unbalanced, they would be ignored.
            return Err(PivotError::config(path.display().to_string(), "data.world.image_pairs", "needs `balanced = true`"));
        }
        Ok(cfg)
    }

    fn image_root(&self) -> PathBuf {
        self.data.image_root.clone().unwrap_or_else(|| PathBuf::from("."))
    }
}

/// On a restarted attempt of a torchrun job, continue every stage from the newest complete
/// checkpoint in its `checkpoint_dir` (see the module doc).
fn resume_after_restart(cfg: &mut RunConfig, rank: usize) -> Result<()> {
    let restart = match std::env::var("TORCHELASTIC_RESTART_COUNT") {
        Ok(v) => v.trim().parse::<usize>().map_err(|_| PivotError::config("environment", "TORCHELASTIC_RESTART_COUNT", format!("`{v}` is not a number")))?,
        Err(_) => 0,
    };
    if restart == 0 {
        return Ok(());
    }
    for t in [&mut cfg.train, &mut cfg.dpo.train, &mut cfg.stage1.projector, &mut cfg.stage1.full] {
        let Some(dir) = t.checkpoint_dir.as_ref().filter(|_| t.resume_from.is_none()) else { continue };
        if let Some(latest) = pivot::train::latest_checkpoint(dir) {
            if rank == 0 {
                let line = format!("pivot-train: restart {restart}: resuming from {}\n", latest.display());
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
            t.resume_from = Some(latest);
        }
    }
    Ok(())
}

/// The `PIVOT_METRICS_JSONL` step hook (see the module doc): a no-op on other ranks or without the
/// variable. A failed write is reported once and training goes on (the log is also saved at the end).
fn metrics_sink(rank: usize) -> Result<impl FnMut(&StepMetrics) + 'static> {
    let path = std::env::var_os("PIVOT_METRICS_JSONL").filter(|_| rank == 0).map(PathBuf::from);
    let mut file = match &path {
        Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| PivotError::invalid(format!("PIVOT_METRICS_JSONL {}: {e}", p.display())))?),
        None => None,
    };
    Ok(move |row: &StepMetrics| {
        let Some(f) = file.as_mut() else { return };
        let mut line = serde_json::to_string(row).unwrap_or_default();
        line.push('\n');
        if let Err(e) = std::io::Write::write_all(f, line.as_bytes()) {
            eprintln!("pivot-train: PIVOT_METRICS_JSONL: {e} (no more metrics lines)");
            file = None;
        }
    })
}

/// A digest of every weight's bytes (name order): equal digests mean bitwise-equal models.
fn weights_digest(mllm: &Mllm) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for vs in [mllm.tower.var_store(), mllm.projector.var_store(), mllm.lm.var_store()] {
        let mut named: Vec<_> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in named {
            h.write(name.as_bytes());
            let t = t.detach().to_device(Device::Cpu).contiguous().to_kind(Kind::Float).reshape([-1]);
            let v: Vec<f32> = Vec::try_from(&t).unwrap_or_default();
            v.iter().for_each(|x| h.write_u32(x.to_bits()));
        }
    }
    h.finish()
}

fn run(path: &Path) -> Result<()> {
    let cfg = RunConfig::load(path)?;
    if let Some(n) = cfg.threads {
        tch::set_num_threads(n);
    }
    pivot::runtime::install_sigint_handler();
    let backend = cfg.backend.unwrap_or(match cfg.device {
        DeviceName::Cpu => dist::Backend::Gloo,
        DeviceName::Cuda => dist::Backend::Nccl,
    });
    let group = dist::init_from_env(backend, cfg.backend.is_some())?;
    let mut cfg = cfg;
    resume_after_restart(&mut cfg, group.map_or(0, |g| g.rank()))?;
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
    let device = match cfg.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => Device::Cuda(group.map_or(0, |g| g.local_rank())),
    };
    tch::manual_seed(cfg.model.seed);
    let mut mllm = match &cfg.model.pretrained {
        Some(dir) => Mllm::from_pretrained(dir, device)?,
        None => Mllm::tiny(device),
    };
    if cfg.model.dtype == DtypeName::Bf16 {
        mllm = mllm.to_kind(Kind::BFloat16);
    }
    let shapes = cfg.data.world.as_ref().map(|w| (w.world(), w));
    let root = cfg.image_root();
    let vqa = || -> Result<VqaDataset> {
        match (&shapes, &cfg.data.vqa) {
            (_, Some(p)) => VqaDataset::from_llava_json(p, &root),
            (Some((w, spec)), None) => spec.vqa(w),
            (None, None) => unreachable!("checked in RunConfig::load"),
        }
    };
    let quiet = |mut t: TrainConfig| {
        t.live &= rank == 0;
        t
    };
    let sink = metrics_sink(rank)?;
    let log = match cfg.stage {
        StageName::Sft => SftTrainer::new(quiet(cfg.train.clone())).on_step(sink).run(&mut mllm, &vqa()?)?,
        StageName::Dpo => {
            let data = match (&shapes, &cfg.data.preferences) {
                (_, Some(p)) => PreferenceDataset::from_jsonl(p, &root)?,
                (Some((w, spec)), None) => spec.preferences(w)?,
                (None, None) => unreachable!("checked in RunConfig::load"),
            };
            let mut dpo = cfg.dpo.clone();
            dpo.train = quiet(dpo.train);
            DpoTrainer::new(dpo).on_step(sink).run(&mut mllm, &data)?
        }
        StageName::Stage1 => {
            let captions = match (&shapes, &cfg.data.captions) {
                (_, Some(p)) => CaptionDataset::from_jsonl(p, &root)?,
                (Some((w, spec)), None) => w.captions(Split::Train, spec.samples),
                (None, None) => unreachable!("checked in RunConfig::load"),
            };
            let mut s = cfg.stage1.clone();
            (s.projector, s.full) = (quiet(s.projector), quiet(s.full));
            // One count over both parts (the full part's steps follow the projector's), as the
            // launcher shows them in one curve and as Stage1Log::plot draws them.
            let (mut sink, mut offset, mut last) = (sink, 0, 0);
            let logs = s.run_with(&mut mllm, &captions, &vqa()?, move |row: &StepMetrics| {
                if row.step <= last {
                    offset += last;
                }
                last = row.step;
                sink(&StepMetrics { step: offset + row.step, ..row.clone() });
            })?;
            let mut log = logs.full;
            log.rows.splice(0..0, logs.projector.rows);
            log
        }
    };
    if rank == 0
        && let Some(out) = &cfg.model.output
    {
        mllm.save_pretrained(out)?;
        log.save_csv(out.join("log.csv"))?;
    }
    let (reduced, broadcast) = group.map_or((0, 0), |g| (g.bytes_all_reduced(), g.bytes_broadcast()));
    let (scattered, gathered) = group.map_or((0, 0), |g| (g.bytes_reduce_scattered(), g.bytes_all_gathered()));
    let steps = log.len().max(1) as u64;
    let line = format!(
        "pivot-train rank {rank}/{world}: {} steps, final loss {:.6}, weights digest {:016x}, {} bytes all-reduced per step, {} bytes reduce-scattered and {} bytes all-gathered per step, {broadcast} bytes broadcast, {} bytes written to checkpoints\n",
        log.len(),
        log.last().and_then(|r| r.get("loss")).unwrap_or(f64::NAN),
        weights_digest(&mllm),
        reduced / steps,
        scattered / steps,
        gathered / steps,
        pivot::train::checkpoint::bytes_written(),
    );
    // One write, as for errors in `main`.
    std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes()).map_err(|e| PivotError::invalid(format!("stdout: {e}")))?;
    Ok(())
}

/// All-reduce (sum, max; f32, f64, bf16; several tensors per call), broadcast and barrier on
/// rank-dependent values, each compared with what it must give.
fn check_dist(backend: dist::Backend) -> Result<()> {
    let single = backend == dist::Backend::Nccl;
    let g = dist::init_from_env(backend, single)?.ok_or_else(|| PivotError::invalid("--check-dist needs WORLD_SIZE > 1 (run it under torchrun)"))?;
    let (r, w) = (g.rank() as f64, g.world() as f64);
    // NCCL: the tensors live on the rank's GPU, but for the max all-reduce's, which stays on
    // the CPU as the trainers' flags do.
    let dev = if backend == dist::Backend::Nccl { Device::Cuda(g.local_rank()) } else { Device::Cpu };
    let expect = |what: &str, got: &Tensor, want: &Tensor| -> Result<()> {
        let err = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]);
        if err == 0.0 { Ok(()) } else { Err(PivotError::invalid(format!("{what}: off by up to {err} on rank {r}"))) }
    };
    let ramp = Tensor::arange(4096, (Kind::Float, dev));
    let (a, b) = (&ramp * (r + 1.0), Tensor::full([3], r + 1.0, (Kind::Double, dev)));
    let c = Tensor::full([64], r + 1.0, (Kind::BFloat16, dev));
    g.all_reduce(&[&a, &b, &c], dist::ReduceOp::Sum)?;
    let tri = w * (w + 1.0) / 2.0;
    expect("all_reduce sum f32", &a, &(&ramp * tri))?;
    expect("all_reduce sum f64", &b, &Tensor::full([3], tri, (Kind::Double, dev)))?;
    expect("all_reduce sum bf16", &c, &Tensor::full([64], tri, (Kind::BFloat16, dev)))?;
    let m = Tensor::from_slice(&[r as f32, -(r as f32)]);
    g.all_reduce(&[&m], dist::ReduceOp::Max)?;
    expect("all_reduce max", &m, &Tensor::from_slice(&[(w - 1.0) as f32, 0.0]))?;
    let root = g.world() - 1;
    let x = Tensor::full([5, 7], r, (Kind::Float, dev));
    g.broadcast(&[&x], root)?;
    expect("broadcast", &x, &Tensor::full([5, 7], root as f64, (Kind::Float, dev)))?;
    // Reduce-scatter: chunk k of rank r's input is (r + 1)·(k·4 + 0..4); rank r gets chunk r summed.
    let whole = Tensor::arange(4 * g.world() as i64, (Kind::Float, dev)) * (r + 1.0);
    let chunk = Tensor::zeros([4], (Kind::Float, dev));
    g.reduce_scatter(&chunk, &whole)?;
    expect("reduce_scatter", &chunk, &((Tensor::arange(4, (Kind::Float, dev)) + 4.0 * r) * tri))?;
    let gathered = Tensor::zeros([3 * g.world() as i64], (Kind::BFloat16, dev));
    g.all_gather(&gathered, &Tensor::full([3], r, (Kind::BFloat16, dev)))?;
    let ranks = Tensor::arange(g.world() as i64, (Kind::Float, dev)).repeat_interleave_self_int(3, None, None);
    expect("all_gather", &gathered, &ranks)?;
    g.barrier()?;
    let line = format!("pivot-train rank {}/{}: collectives ok over {} (all_reduce sum f32/f64/bf16, max, broadcast, reduce_scatter, all_gather, barrier)\n", g.rank(), g.world(), g.backend());
    std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes()).map_err(|e| PivotError::invalid(format!("stdout: {e}")))?;
    Ok(())
}

/// `--memory TOWER LM`: the per-rank memory table of a preset pair (`pivot::train::memory`).
fn memory(tower: &str, lm: &str) -> Result<()> {
    let (tower, lm) = (pivot::model::VisionConfig::preset(tower)?, pivot::model::Qwen2Config::preset(lm)?);
    if tower.family != pivot::model::VisionFamily::Siglip {
        return Err(PivotError::config("--memory", "TOWER", format!("`{}` is not a SigLIP-family tower (the only family the estimate counts)", tower.name)));
    }
    let table = pivot::train::memory::estimate(&tower, &lm, &Default::default()).to_string();
    std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes()).map_err(|e| PivotError::invalid(format!("stdout: {e}")))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.as_slice() {
        [_, flag] if flag == "--check-dist" => check_dist(dist::Backend::Gloo),
        [_, flag, backend] if flag == "--check-dist" => match backend.as_str() {
            "gloo" => check_dist(dist::Backend::Gloo),
            "nccl" => check_dist(dist::Backend::Nccl),
            other => Err(PivotError::config("--check-dist", "BACKEND", format!("`{other}` is neither gloo nor nccl"))),
        },
        [_, flag, tower, lm] if flag == "--memory" => memory(tower, lm),
        [_, config] if !config.starts_with("--") => run(Path::new(config)),
        _ => {
            eprintln!("usage: pivot-train CONFIG.toml | --check-dist [gloo|nccl] | --memory TOWER LM   (alone, or under torchrun --no-python)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let rank = std::env::var("RANK").map(|r| format!(" rank {r}")).unwrap_or_default();
            // One write: the ranks share torchrun's stderr, and a pipe keeps a single write of
            // under 4 KiB whole, where eprintln's pieces from two ranks can interleave.
            let line = format!("pivot-train{rank}: {e}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<RunConfig> {
        let dir = std::env::temp_dir().join(format!("pivot-train-cfg-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, text).unwrap();
        let r = RunConfig::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn every_train_config_field_and_relative_paths() {
        let cfg = load(
            "stage = \"dpo\"\nthreads = 1\n[model]\noutput = \"out\"\n[data]\nworld = { seed = 3, samples = 8 }\n\
             [dpo]\nbeta = 0.2\n[dpo.train]\nlr = 1e-5\ntower_lr = 2e-6\nprojector_lr = 1e-4\ntrain_tower = false\n\
             train_projector = true\ntrain_lm = true\nweight_decay = 0.1\nbetas = [0.8, 0.99]\neps = 1e-6\n\
             warmup_ratio = 0.1\nbatch_size = 2\ngrad_accum = 4\nepochs = 2\nmax_steps = 5\nmax_grad_norm = 0.5\n\
             seed = 7\nshuffle = false\nlive = false\ncheckpoint_every = 2\ncheckpoint_dir = \"ck\"\nprefetch = 0\n\
             zero_stage = 1\nrecompute_tower = true\nrecompute_lm = true\n",
        )
        .unwrap();
        let t = &cfg.dpo.train;
        assert_eq!((cfg.stage, cfg.dpo.beta, t.lr, t.tower_lr, t.betas, t.grad_accum, t.max_steps), (StageName::Dpo, 0.2, 1e-5, Some(2e-6), (0.8, 0.99), 4, Some(5)));
        assert_eq!((t.train_tower, t.shuffle, t.max_grad_norm, t.checkpoint_every, t.prefetch, t.zero_stage, t.recompute_tower, t.recompute_lm), (false, false, Some(0.5), 2, 0, 1, true, true));
        assert!(t.checkpoint_dir.as_ref().unwrap().ends_with("ck") && t.checkpoint_dir.as_ref().unwrap().is_absolute() == cfg.model.output.as_ref().unwrap().is_absolute());
        assert_eq!(cfg.dpo.label_smoothing, 0.0, "absent fields keep their defaults");
    }

    #[test]
    fn bad_files_name_file_line_and_field() {
        let err = load("stage = \"sft\"\n[data]\nworld = { samples = 8 }\n[train]\nlr = 1e-5\nbatch_sise = 2\n").unwrap_err().to_string();
        assert!(err.contains("run.toml:6:1") && err.contains("train.batch_sise") && err.contains("unknown field"), "{err}");
        let err = load("stage = \"sft\"\n[data]\nworld = { samples = 8 }\n[train]\nlr = \"fast\"\n").unwrap_err().to_string();
        assert!(err.contains("run.toml:5:") && err.contains("train.lr"), "{err}");
        let err = load("stage = \"ppo\"\n[data]\n").unwrap_err().to_string();
        assert!(err.contains("run.toml:1:") && err.contains("`stage`"), "{err}");
        let err = load("stage = \"dpo\"\n[data]\nvqa = \"x.json\"\n").unwrap_err().to_string();
        assert!(err.contains("data.preferences"), "{err}");
        let err = load("stage = \"dpo\"\n[data]\nworld = { samples = 8, image_pairs = true }\n").unwrap_err().to_string();
        assert!(err.contains("data.world.image_pairs") && err.contains("balanced"), "{err}");
    }
}
