//! The one training loop behind `SftTrainer`, `DpoTrainer` and `Stage1`. An objective turns a
//! micro-batch into a loss and metrics; the loop owns everything else (order, accumulation,
//! clipping, schedule, AdamW, non-finite guard, interruption, checkpoints, log, live view).
//! The CPU half of each micro-batch (`Objective::collate`) runs `TrainConfig::prefetch`
//! micro-batches ahead on a worker thread while the model computes.

use super::checkpoint::{self, TrainerState};
use super::log::{LiveView, StepMetrics, TrainLog};
use super::optim::{AdamW, cosine_schedule};
use super::prefetch::prefetch;
use super::profile;
use crate::error::{PivotError, Result};
use crate::model::{Batch, Batcher, Checkpoint, Mllm};
use crate::runtime::check_interrupt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

/// Optimisation settings shared by every trainer. Defaults follow PIVOT's stage-2 SFT script
/// (AdamW, lr 5e-6, weight decay 0, cosine, warmup ratio 0.03, clip 1.0) at a CPU-sized batch.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate of the LM (and of tower/projector unless set below).
    pub lr: f64,
    /// PIVOT's `--mm_vision_tower_lr` (stage-1 full training uses 2e-6).
    pub tower_lr: Option<f64>,
    pub projector_lr: Option<f64>,
    /// Which parts are trained; the others are frozen for the run and restored afterwards.
    pub train_tower: bool,
    pub train_projector: bool,
    pub train_lm: bool,
    /// Decoupled (AdamW) weight decay; PIVOT uses 0.
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub warmup_ratio: f64,
    /// Samples (SFT) or pairs (DPO) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub epochs: usize,
    /// Overrides `epochs` (cycling through the data as needed).
    pub max_steps: Option<usize>,
    /// Global gradient-norm clipping; `None` disables it.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub shuffle: bool,
    /// Progress bar (and live loss curve in Jupyter).
    pub live: bool,
    /// Save a checkpoint every this many optimizer steps under `checkpoint_dir` (0: never).
    pub checkpoint_every: usize,
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from a checkpoint directory (or the newest complete one inside it).
    pub resume_from: Option<PathBuf>,
    /// Micro-batches prepared ahead on a worker thread (images decoded, tokenised, resized,
    /// pinned for CUDA) while the model computes; 0 prepares each on the main thread when it is
    /// needed. Results do not depend on it.
    pub prefetch: usize,
    /// Test hook: makes the loss NaN at this optimizer step (1-based).
    #[doc(hidden)]
    pub inject_nan_at: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 5e-6,
            tower_lr: None,
            projector_lr: None,
            train_tower: true,
            train_projector: true,
            train_lm: true,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            warmup_ratio: 0.03,
            batch_size: 8,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            max_grad_norm: Some(1.0),
            seed: 0,
            shuffle: true,
            live: true,
            checkpoint_every: 0,
            checkpoint_dir: None,
            resume_from: None,
            prefetch: 2,
            inject_nan_at: None,
        }
    }
}

impl TrainConfig {
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = Some(steps);
        self
    }
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    pub fn grad_accum(mut self, grad_accum: usize) -> Self {
        self.grad_accum = grad_accum;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn trainable(mut self, tower: bool, projector: bool, lm: bool) -> Self {
        (self.train_tower, self.train_projector, self.train_lm) = (tower, projector, lm);
        self
    }
    pub fn checkpoints(mut self, dir: impl Into<PathBuf>, every: usize) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self.checkpoint_every = every;
        self
    }
    pub fn quiet(mut self) -> Self {
        self.live = false;
        self
    }
    pub fn prefetch(mut self, micro_batches: usize) -> Self {
        self.prefetch = micro_batches;
        self
    }

    fn group_lrs(&self) -> [f64; 3] {
        [self.tower_lr.unwrap_or(self.lr), self.projector_lr.unwrap_or(self.lr), self.lr]
    }

    fn validate(&self, n: usize) -> Result<(usize, usize)> {
        let bad = |field: &str, msg: String| Err(PivotError::config("trainer config", field, msg));
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("{} is not a valid learning rate", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", format!("{} is outside [0, 1)", self.warmup_ratio));
        }
        if !(self.train_tower || self.train_projector || self.train_lm) {
            return bad("train_*", "nothing is trainable".into());
        }
        let per_step = self.batch_size * self.grad_accum;
        let steps_per_epoch = n / per_step;
        if steps_per_epoch == 0 {
            return Err(PivotError::invalid(format!(
                "{n} samples are fewer than one optimizer step needs (batch_size {} × grad_accum {})",
                self.batch_size, self.grad_accum
            )));
        }
        let total = self.max_steps.unwrap_or(self.epochs * steps_per_epoch);
        if total == 0 {
            return bad("epochs", "zero optimizer steps requested".into());
        }
        Ok((steps_per_epoch, total))
    }
}

/// What one micro-batch contributed.
pub(crate) struct Micro {
    /// Scalar loss with its graph (mean over the micro-batch).
    pub loss: Tensor,
    /// Metrics averaged over the micro-batches of a step (`loss` is added by the loop).
    pub metrics: Vec<(String, f64)>,
    pub samples: usize,
    pub tokens: usize,
}

/// A training objective over samples of type `S`, in two halves: `collate` (CPU only, on the
/// prefetch thread: it sees the batcher, never the model) and `micro_step` (the model).
pub(crate) trait Objective<S> {
    /// Short name stored in checkpoints ("sft", "dpo", ...).
    fn name(&self) -> &str;
    /// Called once before the first step: `resumed` holds this objective's saved tensors when
    /// continuing from a checkpoint (the MLLM still has its pre-resume weights at that point).
    fn prepare(&mut self, _mllm: &Mllm, _data: &[S], _resumed: Option<&Checkpoint>) -> Result<()> {
        Ok(())
    }
    /// Model inputs of `samples`, pixels still on the CPU.
    fn collate(b: &Batcher, samples: &[&S]) -> Result<Batch>;
    /// Loss of a collated micro-batch (pixels on the model's device) of the data-set rows `rows`.
    fn micro_step(&mut self, mllm: &Mllm, rows: &[usize], batch: Batch) -> Result<Micro>;
    /// Tensors a checkpoint must carry for this objective (DPO: the reference).
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
}

/// Collates the samples `rows` of `data` (on whichever thread runs it).
pub(crate) fn collate<S, O: Objective<S>>(b: &Batcher, data: &[S], rows: Vec<usize>) -> (Vec<usize>, Result<Batch>) {
    let samples: Vec<&S> = rows.iter().map(|&i| &data[i]).collect();
    let batch = O::collate(b, &samples);
    (rows, batch)
}

/// The data-set rows of every micro-batch of steps `start..total`, in training order.
fn schedule(cfg: &TrainConfig, n: usize, steps_per_epoch: usize, start: usize, total: usize) -> impl Iterator<Item = Vec<usize>> + Send + 'static {
    let (seed, shuffle, batch, accum) = (cfg.seed, cfg.shuffle, cfg.batch_size, cfg.grad_accum);
    let mut order = (usize::MAX, Vec::new());
    (start..total).flat_map(move |step| {
        let epoch = step / steps_per_epoch;
        if order.0 != epoch {
            order = (epoch, epoch_order(seed, epoch, n, shuffle));
        }
        let first = (step % steps_per_epoch) * batch * accum;
        order.1[first..first + batch * accum].chunks(batch).map(<[usize]>::to_vec).collect::<Vec<_>>()
    })
}

/// The sample order of one epoch: deterministic in (seed, epoch).
pub(crate) fn epoch_order(seed: u64, epoch: usize, n: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
    }
    order
}

/// Hooks and results a trainer keeps across runs.
#[derive(Default)]
pub(crate) struct Hooks {
    pub on_step: Vec<Box<dyn FnMut(&StepMetrics)>>,
    /// The log of the last run, also after an error (interrupt, non-finite loss).
    pub last_log: Option<TrainLog>,
}

/// Runs `obj` over `data`. On error the partial log lands in `hooks.last_log`.
pub(crate) fn run<S: Sync, O: Objective<S>>(
    label: &str,
    mllm: &mut Mllm,
    data: &[S],
    cfg: &TrainConfig,
    obj: &mut O,
    hooks: &mut Hooks,
) -> Result<TrainLog> {
    let (steps_per_epoch, total) = cfg.validate(data.len())?;
    // Trainable flags are per tensor, so remember each one and give them back afterwards:
    // a run must not silently unfreeze a transplanted tower for the next cell.
    let flags: Vec<(Tensor, bool)> = super::optim::ParamGroup::ALL
        .iter()
        .flat_map(|m| m.vars(mllm))
        .map(|(_, t)| {
            let f = t.requires_grad();
            (t, f)
        })
        .collect();
    mllm.set_trainable(cfg.train_tower, cfg.train_projector, cfg.train_lm);
    let mut log = TrainLog::new(label);
    let result = run_inner(label, mllm, data, cfg, obj, hooks, steps_per_epoch, total, &mut log);
    for (t, f) in flags {
        let _ = t.set_requires_grad(f);
    }
    hooks.last_log = Some(log.clone());
    result.map(|()| log)
}

#[allow(clippy::too_many_arguments)]
fn run_inner<S: Sync, O: Objective<S>>(
    label: &str,
    mllm: &mut Mllm,
    data: &[S],
    cfg: &TrainConfig,
    obj: &mut O,
    hooks: &mut Hooks,
    steps_per_epoch: usize,
    total: usize,
    log: &mut TrainLog,
) -> Result<()> {
    let mut opt = AdamW::new(mllm, cfg.group_lrs(), cfg.betas, cfg.eps, cfg.weight_decay)?;
    let mut start = 0;
    match &cfg.resume_from {
        Some(dir) => {
            let ck = checkpoint::open(dir)?;
            let s = &ck.state;
            let expect = (obj.name(), data.len(), cfg.batch_size, cfg.grad_accum, cfg.seed, total);
            let found = (s.objective.as_str(), s.data_len, s.batch_size, s.grad_accum, s.seed, s.total_steps);
            if expect != found {
                return Err(PivotError::invalid(format!(
                    "checkpoint {} was written by a different run: (objective, samples, batch, accum, seed, steps) = {found:?}, this run has {expect:?}",
                    dir.display()
                )));
            }
            obj.prepare(mllm, data, ck.objective.as_ref())?;
            checkpoint::load_model(mllm, &ck.model, "")?;
            opt.load_state(|k| ck.optimizer.tensor(k))?;
            opt.t = s.adam_t;
            start = s.step;
            *log = s.log.clone();
        }
        None => obj.prepare(mllm, data, None)?,
    }

    // The CPU side of the micro-batches runs ahead on a worker; the model stays on this thread.
    let mllm: &Mllm = mllm;
    let batcher = mllm.batcher();
    let micro_batches = schedule(cfg, data.len(), steps_per_epoch, start, total).map(|rows| collate::<S, O>(&batcher, data, rows));
    let dev = mllm.device();
    let mut live = LiveView::new(label, total, cfg.live);
    let result = prefetch(cfg.prefetch, micro_batches, |batches| -> Result<()> {
        for step in start..total {
            check_interrupt(&format!("{label} step {} of {total}", step + 1))?;
            let t0 = Instant::now();
            profile::begin(dev);
            let (mut sums, mut samples, mut tokens, mut loss_sum) = (Vec::<(String, f64)>::new(), 0, 0, 0.0);
            for _ in 0..cfg.grad_accum {
                let (rows, batch) = batches.next().ok_or_else(|| PivotError::invalid("the batch preparation thread stopped"))?;
                let batch = batch?.to_device(dev)?;
                profile::mark("data", dev);
                let mut micro = obj.micro_step(mllm, &rows, batch)?;
                if cfg.inject_nan_at == Some(step + 1) {
                    micro.loss = micro.loss * f64::NAN;
                }
                let loss = micro.loss.double_value(&[]);
                if !loss.is_finite() {
                    return Err(PivotError::NonFinite { what: format!("{label} loss ({loss})"), step: step + 1, last_good: step });
                }
                (&micro.loss / cfg.grad_accum as f64).backward();
                profile::mark("backward", dev);
                loss_sum += loss;
                samples += micro.samples;
                tokens += micro.tokens;
                for (k, v) in micro.metrics {
                    match sums.iter_mut().find(|(n, _)| *n == k) {
                        Some(slot) => slot.1 += v,
                        None => sums.push((k, v)),
                    }
                }
            }
            let grad_norm = opt.grad_norm()?;
            profile::mark("grad norm", dev);
            if !grad_norm.is_finite() {
                return Err(PivotError::NonFinite { what: format!("{label} gradient norm ({grad_norm})"), step: step + 1, last_good: step });
            }
            let clip = match cfg.max_grad_norm {
                Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
                _ => 1.0,
            };
            let scale = cosine_schedule(step, total, cfg.warmup_ratio);
            opt.step(scale, clip)?;
            profile::mark("optimizer", dev);
            opt.zero_grad();
            profile::mark("zero grad", dev);

            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            let n = cfg.grad_accum as f64;
            let mut row = StepMetrics { step: step + 1, epoch: (step + 1) as f64 / steps_per_epoch as f64, values: Vec::new() };
            row.set("loss", loss_sum / n);
            for (k, v) in sums {
                row.set(&k, v / n);
            }
            row.set("learning_rate", cfg.lr * scale);
            row.set("grad_norm", grad_norm);
            row.set("samples_per_second", samples as f64 / secs);
            row.set("tokens_per_second", tokens as f64 / secs);
            row.set("step_seconds", secs);
            log.rows.push(row.clone());
            for f in &mut hooks.on_step {
                f(&row);
            }
            live.update(log, &row, step + 1 == total);

            if cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0 {
                let dir = cfg.checkpoint_dir.as_ref().ok_or_else(|| {
                    PivotError::config("trainer config", "checkpoint_dir", "checkpoint_every is set but checkpoint_dir is not")
                })?;
                let state = TrainerState {
                    format: 1,
                    objective: obj.name().to_string(),
                    step: step + 1,
                    total_steps: total,
                    steps_per_epoch,
                    data_len: data.len(),
                    batch_size: cfg.batch_size,
                    grad_accum: cfg.grad_accum,
                    seed: cfg.seed,
                    adam_t: opt.t,
                    log: log.clone(),
                };
                checkpoint::save(&checkpoint::checkpoint_path(dir, step + 1), mllm, &opt, &obj.state(), &state)?;
            }
        }
        Ok(())
    });
    if result.is_err() {
        // A failed step (bad data, non-finite loss, interrupt) leaves no partial gradient behind.
        opt.zero_grad();
    }
    result?;
    live.finish(log);
    Ok(())
}
