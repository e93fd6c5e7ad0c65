//! The one training loop behind `SftTrainer`, `DpoTrainer` and `Stage1`. An objective turns a
//! micro-batch into a loss and metrics; the loop owns everything else (order, accumulation,
//! clipping, schedule, AdamW, non-finite guard, interruption, checkpoints, log, live view).
//! The CPU half of each micro-batch (`Objective::collate`) runs `TrainConfig::prefetch`
//! micro-batches ahead on a worker thread while the model computes.
//!
//! One optimizer step ([`Loop::step`]): for each micro-batch check for an interrupt, forward,
//! guard the loss, backward; then all-reduce the gradients (data parallel), clip, update.
//! Interrupts are checked before every micro-batch, so a step of thousands of micro-batches
//! stops within one of them; the partial gradients are dropped and the weights and optimizer
//! state stay those of the last completed step.
//!
//! Under a process group ([`dist`]) each rank collates only its shard of every global
//! micro-batch, gradients are averaged over the ranks, and the ranks agree on every stop (an
//! interrupt, a non-finite loss or a failure on one rank stops all of them at the same point);
//! rank 0 alone shows progress and writes the model into checkpoints (under ZeRO-1 each rank writes
//! its own shard of the optimizer state beside it).

use super::checkpoint::{self, TrainerState};
use super::dist::{self, ProcessGroup, ReduceOp};
use super::fault;
use super::log::{LiveView, StepMetrics, TrainLog};
use super::optim::{AdamW, ParamGroup, cosine_schedule};
use super::prefetch::prefetch;
use super::profile::StepTimer;
use crate::data::{collate_on_use, ImageSample, SkipPolicy, Skipped};
use crate::error::{PivotError, Result};
use crate::model::{Batch, Batcher, Checkpoint, Mllm};
use crate::runtime::check_interrupt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

/// Optimisation settings shared by every trainer. Defaults follow PIVOT's stage-2 SFT script
/// (AdamW, lr 5e-6, weight decay 0, cosine, warmup ratio 0.03, clip 1.0) at a CPU-sized batch.
/// `pivot-train` reads it from TOML (every field optional, unknown names refused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Samples (SFT) or pairs (DPO) per micro-batch on each rank (data-parallel runs take
    /// `batch_size × ranks` per global micro-batch, each rank its own shard).
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
    /// An image that fails to decode when its micro-batch is collated (corrupt inside a file the
    /// load-time check passed): `Error` stops the run with an error naming the file; `Skip`
    /// leaves that sample out of its micro-batch, prints its file and lists it in the run's
    /// `TrainLog::skipped`. TOML: `bad_images = "skip"`.
    pub bad_images: SkipPolicy,
    /// Under a process group: 0 keeps the whole optimizer state on every rank (plain data
    /// parallel); 1 is ZeRO-1: each rank keeps the fp32 master weights and AdamW moments of
    /// 1/ranks of the parameters (gradients reduce-scattered, weights all-gathered). Results
    /// equal stage 0's up to float rounding; checkpoints resume at any number of ranks.
    pub zero_stage: u8,
    /// Activation checkpointing of the tower's (any family) and of the LM's layers: each keeps
    /// its input only and is recomputed in backward. Same gradients, less memory (see
    /// docs/memory.md), about one more forward of those layers per step.
    pub recompute_tower: bool,
    pub recompute_lm: bool,
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
            bad_images: SkipPolicy::Error,
            zero_stage: 0,
            recompute_tower: false,
            recompute_lm: false,
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
    pub fn bad_images(mut self, policy: SkipPolicy) -> Self {
        self.bad_images = policy;
        self
    }

    fn group_lrs(&self) -> [f64; 3] {
        [self.tower_lr.unwrap_or(self.lr), self.projector_lr.unwrap_or(self.lr), self.lr]
    }

    /// Steps per epoch and in all, for `n` samples shared by `world` ranks.
    fn validate(&self, n: usize, world: usize) -> Result<(usize, usize)> {
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
        if self.zero_stage > 1 {
            return bad("zero_stage", format!("{} is not supported: 0 (plain data parallel) or 1 (ZeRO-1: sharded optimizer state)", self.zero_stage));
        }
        if !(self.train_tower || self.train_projector || self.train_lm) {
            return bad("train_*", "nothing is trainable".into());
        }
        let per_step = self.batch_size * self.grad_accum * world;
        let steps_per_epoch = n / per_step;
        if steps_per_epoch == 0 {
            let ranks = if world > 1 { format!(" × {world} ranks") } else { String::new() };
            return Err(PivotError::invalid(format!(
                "{n} samples are fewer than one optimizer step needs (batch_size {} × grad_accum {}{ranks})",
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
    /// Data-set rows `prepare` found unusable under [`SkipPolicy::Skip`] (DPO: pairs whose image
    /// failed in the cached reference pass), with why: the loop leaves them out of every
    /// micro-batch and records them as skipped, so both passes see the same pairs.
    fn dropped_rows(&self) -> HashMap<usize, Skipped> {
        HashMap::new()
    }
}

/// A training micro-batch: the rows it holds, the rows left out for a bad image, the batch
/// (`None` when no row is left: the micro-batch is skipped).
type MicroBatch = (Vec<usize>, Vec<Skipped>, Result<Option<Batch>>);

/// [`collate`] for the training loop: the objective's `dropped` rows are left out, images that
/// fail to decode are handled by `policy` ([`collate_on_use`]); the rows returned are those in
/// the batch.
fn collate_micro<S: ImageSample, O: Objective<S>>(b: &Batcher, data: &[S], rows: Vec<usize>, policy: SkipPolicy, dropped: &HashMap<usize, Skipped>) -> MicroBatch {
    let (gone, rows): (Vec<usize>, Vec<usize>) = rows.into_iter().partition(|r| dropped.contains_key(r));
    let mut skipped: Vec<Skipped> = gone.iter().map(|r| dropped[r].clone()).collect();
    if rows.is_empty() {
        return (rows, skipped, Ok(None));
    }
    let samples: Vec<&S> = rows.iter().map(|&i| &data[i]).collect();
    let c = collate_on_use(&samples, policy, |s| O::collate(b, s));
    skipped.extend(c.skipped);
    // Under `Skip` a micro-batch whose every image failed is skipped, not a failure.
    let batch = if c.kept.is_empty() && policy == SkipPolicy::Skip { Ok(None) } else { c.batch.map(Some) };
    (c.kept.iter().map(|&i| rows[i]).collect(), skipped, batch)
}

/// Which shard of the data this process trains on.
#[derive(Clone, Copy)]
struct Shard {
    rank: usize,
    world: usize,
}

/// The data-set rows of every micro-batch this rank runs in steps `start..total`, in training
/// order: a step takes `batch × accum × world` rows of the epoch's order, a global micro-batch
/// `batch × world` of them, and rank r the r-th `batch` of those.
fn schedule(cfg: &TrainConfig, n: usize, steps_per_epoch: usize, start: usize, total: usize, shard: Shard) -> impl Iterator<Item = Vec<usize>> + Send + 'static {
    let (seed, shuffle, batch, accum) = (cfg.seed, cfg.shuffle, cfg.batch_size, cfg.grad_accum);
    let global = batch * shard.world;
    let mut order = (usize::MAX, Vec::new());
    (start..total).flat_map(move |step| {
        let epoch = step / steps_per_epoch;
        if order.0 != epoch {
            order = (epoch, epoch_order(seed, epoch, n, shuffle));
        }
        let first = (step % steps_per_epoch) * global * accum;
        let rows = &order.1[first..first + global * accum];
        rows.chunks(global).map(|micro| micro[shard.rank * batch..(shard.rank + 1) * batch].to_vec()).collect::<Vec<_>>()
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
pub struct Hooks {
    pub(crate) on_step: Vec<Box<dyn FnMut(&StepMetrics)>>,
    /// The log of the last run, also after an error (interrupt, non-finite loss).
    pub(crate) last_log: Option<TrainLog>,
}

/// Runs `obj` over `data`, on the process group's shard when one is set up. On error the
/// partial log lands in `hooks.last_log`.
pub(crate) fn run<S: Sync + ImageSample, O: Objective<S>>(
    label: &str,
    mllm: &mut Mllm,
    data: &[S],
    cfg: &TrainConfig,
    obj: &mut O,
    hooks: &mut Hooks,
) -> Result<TrainLog> {
    let group = dist::group();
    let shard = group.map_or(Shard { rank: 0, world: 1 }, |g| Shard { rank: g.rank(), world: g.world() });
    let (steps_per_epoch, total) = cfg.validate(data.len(), shard.world)?;
    // Trainable flags are per tensor, so remember each one and give them back afterwards:
    // a run must not silently unfreeze a transplanted tower for the next cell.
    let flags: Vec<(Tensor, bool)> = ParamGroup::ALL
        .iter()
        .flat_map(|m| m.vars(mllm))
        .map(|(_, t)| {
            let f = t.requires_grad();
            (t, f)
        })
        .collect();
    mllm.set_trainable(cfg.train_tower, cfg.train_projector, cfg.train_lm);
    // Likewise the activation checkpointing switches.
    let recomputed = (mllm.tower.recomputes(), mllm.lm.recomputes());
    let mut log = TrainLog::new(label);
    let result = (|| {
        mllm.lm.set_recompute(cfg.recompute_lm);
        mllm.tower.set_recompute(cfg.recompute_tower);
        let (nan_at, interrupt_at, kill_at) = (fault::nan_step(shard.rank)?, fault::interrupt_step(shard.rank)?, fault::kill_step(shard.rank)?);
        let mut opt = AdamW::new(mllm, cfg.group_lrs(), cfg.betas, cfg.eps, cfg.weight_decay)?;
        if let (Some(g), 1) = (group, cfg.zero_stage) {
            opt.shard_over(g)?;
        }
        let mut lp = Loop { label, cfg, obj, hooks: &mut *hooks, opt, group, shard, steps_per_epoch, total, nan_at, interrupt_at, kill_at, skipped: Vec::new() };
        lp.run(mllm, data, &mut log)
    })();
    for (t, f) in flags {
        let _ = t.set_requires_grad(f);
    }
    mllm.tower.set_recompute(recomputed.0);
    mllm.lm.set_recompute(recomputed.1);
    hooks.last_log = Some(log.clone());
    result.map(|()| log)
}

/// One run's state: settings, objective, optimizer and where the run stands.
struct Loop<'a, O> {
    label: &'a str,
    cfg: &'a TrainConfig,
    obj: &'a mut O,
    hooks: &'a mut Hooks,
    opt: AdamW,
    group: Option<&'static ProcessGroup>,
    shard: Shard,
    steps_per_epoch: usize,
    total: usize,
    /// Fault injection: the step whose loss is made NaN on this rank, and the step in whose last
    /// micro-batch this rank sees an interrupt request.
    nan_at: Option<usize>,
    interrupt_at: Option<usize>,
    /// Samples left out of the current step for a bad image ([`TrainConfig::bad_images`]).
    skipped: Vec<Skipped>,
    /// ... and the step in whose last micro-batch this rank SIGKILLs itself.
    kill_at: Option<usize>,
}

/// Why a rank wants the run to stop in the middle of a step.
enum Stop {
    Interrupt(PivotError),
    NonFinite(PivotError),
    Failed(PivotError),
}

/// Sums over the micro-batches of a step.
#[derive(Default)]
struct Sums {
    /// Micro-batches that ran (not skipped for want of a usable sample).
    micro_batches: usize,
    loss: f64,
    samples: usize,
    tokens: usize,
    metrics: Vec<(String, f64)>,
}

impl<O> Loop<'_, O> {
    fn at(&self, step: usize, micro: usize) -> String {
        let mut at = format!("{} step {} of {}", self.label, step + 1, self.total);
        if self.cfg.grad_accum > 1 {
            at.push_str(&format!(", micro-batch {} of {}", micro + 1, self.cfg.grad_accum));
        }
        at
    }

    /// Every rank learns whether any rank must stop (one small all-reduce under a process
    /// group), so all of them leave at the same point instead of waiting for each other in the
    /// next collective. A rank's own reason wins over what it hears from the others.
    fn agree<T>(&self, step: usize, micro: usize, local: std::result::Result<T, Stop>) -> Result<T> {
        let Some(g) = self.group else {
            return local.map_err(Stop::into_error);
        };
        let mut flags = [0.0f32; 3];
        match &local {
            Ok(_) => {}
            Err(Stop::Interrupt(_)) => flags[0] = 1.0,
            Err(Stop::NonFinite(_)) => flags[1] = 1.0,
            Err(Stop::Failed(_)) => flags[2] = 1.0,
        }
        let t = Tensor::from_slice(&flags);
        g.all_reduce(&[&t], ReduceOp::Max)?;
        flags.copy_from_slice(&Vec::<f32>::try_from(&t)?);
        let value = local.map_err(Stop::into_error)?;
        let elsewhere = |what: &str| format!("{} ({what} on another rank)", self.at(step, micro));
        if flags[2] > 0.0 {
            Err(PivotError::invalid(format!("{}: stopped", elsewhere("a failure"))))
        } else if flags[1] > 0.0 {
            Err(PivotError::NonFinite { what: format!("{} loss on another rank", self.label), step: step + 1, last_good: step })
        } else if flags[0] > 0.0 {
            Err(PivotError::Interrupted { at: elsewhere("an interrupt") })
        } else {
            Ok(value)
        }
    }
}

impl Stop {
    fn into_error(self) -> PivotError {
        match self {
            Stop::Interrupt(e) | Stop::NonFinite(e) | Stop::Failed(e) => e,
        }
    }
}

impl<O> Loop<'_, O> {
    /// Continues from `cfg.resume_from` or starts afresh (every rank from rank 0's weights);
    /// returns the first step to run.
    fn start<S>(&mut self, mllm: &mut Mllm, data: &[S], log: &mut TrainLog) -> Result<usize>
    where
        O: Objective<S>,
    {
        if let Some(g) = self.group {
            // Before `prepare`, so that DPO's reference copy is the same on every rank.
            let weights: Vec<Tensor> = ParamGroup::ALL.iter().flat_map(|m| m.vars(mllm)).map(|(_, t)| t.detach()).collect();
            g.broadcast(&weights.iter().collect::<Vec<_>>(), 0)?;
        }
        let Some(dir) = &self.cfg.resume_from else {
            self.obj.prepare(mllm, data, None)?;
            return Ok(0);
        };
        let ck = checkpoint::open(dir)?;
        let s = &ck.state;
        let c = self.cfg;
        // The data order depends on the samples per step, not on how ranks and accumulation
        // split them: a run saved at one number of ranks continues at another.
        let expect = (self.obj.name(), data.len(), c.batch_size * c.grad_accum * self.shard.world, c.seed, self.total);
        let found = (s.objective.as_str(), s.data_len, s.samples_per_step(), s.seed, s.total_steps);
        if expect != found {
            return Err(PivotError::invalid(format!(
                "checkpoint {} was written by a different run: (objective, samples, samples per step, seed, steps) = {found:?}, this run has {expect:?} \
                 (samples per step: batch_size × grad_accum × ranks)",
                dir.display()
            )));
        }
        self.obj.prepare(mllm, data, ck.objective.as_ref())?;
        checkpoint::load_model(mllm, &ck.model, "")?;
        self.opt.load_state(ck.optimizer)?;
        self.opt.t = ck.state.adam_t;
        *log = ck.state.log;
        Ok(ck.state.step)
    }

    fn run<S: Sync + ImageSample>(&mut self, mllm: &mut Mllm, data: &[S], log: &mut TrainLog) -> Result<()>
    where
        O: Objective<S>,
    {
        // A rank that cannot start (a checkpoint it cannot read) stops the others too.
        let started = self.start(mllm, data, log).map_err(Stop::Failed);
        let start = self.agree(0, 0, started)?;
        // The CPU side of the micro-batches runs ahead on a worker; the model stays on this thread.
        let mllm: &Mllm = mllm;
        let batcher = mllm.batcher();
        let rows = schedule(self.cfg, data.len(), self.steps_per_epoch, start, self.total, self.shard);
        let policy = self.cfg.bad_images;
        let dropped = self.obj.dropped_rows();
        let micro_batches = rows.map(|rows| collate_micro::<S, O>(&batcher, data, rows, policy, &dropped));
        let mut live = LiveView::new(self.label, self.total, self.cfg.live && self.shard.rank == 0);
        let result = prefetch(self.cfg.prefetch, micro_batches, |batches| -> Result<()> {
            for step in start..self.total {
                let row = self.step::<S>(mllm, step, batches);
                for skipped in self.skipped.drain(..) {
                    eprintln!("{} step {}: skipped {skipped}", self.label, step + 1);
                    log.skipped.push(skipped);
                }
                let row = row?;
                log.rows.push(row.clone());
                for f in &mut self.hooks.on_step {
                    f(&row);
                }
                live.update(log, &row, step + 1 == self.total);
                self.checkpoint::<S>(mllm, data.len(), step, log)?;
            }
            Ok(())
        });
        if result.is_err() {
            // A failed step (bad data, non-finite loss, interrupt) leaves no partial gradient behind.
            self.opt.zero_grad();
        }
        result?;
        live.finish(log);
        Ok(())
    }

    /// One optimizer step: accumulate, guard, all-reduce, clip, update.
    fn step<S>(&mut self, mllm: &Mllm, step: usize, batches: &mut impl Iterator<Item = MicroBatch>) -> Result<StepMetrics>
    where
        O: Objective<S>,
    {
        let timer = StepTimer::start(mllm.device());
        let t0 = Instant::now();
        let mut sums = Sums::default();
        for micro in 0..self.cfg.grad_accum {
            if self.interrupt_at == Some(step + 1) && micro + 1 == self.cfg.grad_accum {
                crate::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if self.kill_at == Some(step + 1) && micro + 1 == self.cfg.grad_accum {
                fault::kill_self();
            }
            self.agree(step, micro, check_interrupt(&self.at(step, micro)).map_err(Stop::Interrupt))?;
            let forward = self.forward::<S>(mllm, step, batches, &timer);
            // A micro-batch with no sample left (every image bad under `Skip`) adds nothing.
            if let Some((m, loss)) = self.agree(step, micro, forward)? {
                (&m.loss / self.cfg.grad_accum as f64).backward();
                timer.mark("backward");
                sums.add(loss, m);
            }
        }
        if self.count_everywhere(sums.micro_batches)? == 0 {
            // Nothing ran on any rank: no gradient, so no update (AdamW's momentum would move
            // the weights anyway); the row says so by having no loss.
            return self.metrics(step, sums, 0.0, cosine_schedule(step, self.total, self.cfg.warmup_ratio), t0);
        }
        self.all_reduce_gradients()?;
        timer.mark("all-reduce");
        let grad_norm = self.opt.grad_norm()?;
        timer.mark("grad norm");
        if !grad_norm.is_finite() {
            // The gradients are the same on every rank after the all-reduce: so is this exit.
            return Err(PivotError::NonFinite { what: format!("{} gradient norm ({grad_norm})", self.label), step: step + 1, last_good: step });
        }
        let clip = match self.cfg.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        let lr_scale = cosine_schedule(step, self.total, self.cfg.warmup_ratio);
        self.opt.step(lr_scale, clip)?;
        timer.mark("optimizer");
        self.opt.zero_grad();
        timer.mark("zero grad");
        self.metrics(step, sums, grad_norm, lr_scale, t0)
    }

    /// Micro-batches run in this step on all ranks together (`local` on this one).
    fn count_everywhere(&self, local: usize) -> Result<usize> {
        let Some(g) = self.group else { return Ok(local) };
        let t = Tensor::from_slice(&[local as f64]);
        g.all_reduce(&[&t], ReduceOp::Sum)?;
        Ok(t.double_value(&[0]) as usize)
    }

    /// The next micro-batch's loss and metrics, with the loss guarded; `None` for a micro-batch
    /// with no sample left.
    fn forward<S>(&mut self, mllm: &Mllm, step: usize, batches: &mut impl Iterator<Item = MicroBatch>, timer: &StepTimer) -> std::result::Result<Option<(Micro, f64)>, Stop>
    where
        O: Objective<S>,
    {
        let (rows, skipped, batch) = batches.next().ok_or_else(|| Stop::Failed(PivotError::invalid("the batch preparation thread stopped")))?;
        self.skipped.extend(skipped);
        let Some(batch) = batch.map_err(Stop::Failed)? else { return Ok(None) };
        let batch = batch.to_device(mllm.device()).map_err(Stop::Failed)?;
        timer.mark("data");
        let mut m = self.obj.micro_step(mllm, &rows, batch).map_err(Stop::Failed)?;
        if self.nan_at == Some(step + 1) {
            m.loss = m.loss * f64::NAN;
        }
        let loss = m.loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(Stop::NonFinite(PivotError::NonFinite { what: format!("{} loss ({loss})", self.label), step: step + 1, last_good: step }));
        }
        Ok(Some((m, loss)))
    }

    /// Averages the flat gradient buffers over the ranks (ZeRO-1: each rank's chunk of them).
    fn all_reduce_gradients(&mut self) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        if self.opt.is_sharded() {
            return self.opt.reduce_scatter_grads();
        }
        let grads = self.opt.flat_grads()?;
        g.all_reduce(&grads.iter().collect::<Vec<_>>(), ReduceOp::Sum)?;
        for t in &grads {
            let _ = t.shallow_clone().g_div_scalar_(self.shard.world as f64);
        }
        Ok(())
    }

    /// The step's row of the log: means over micro-batches (and ranks), throughput of all ranks.
    fn metrics(&self, step: usize, mut sums: Sums, grad_norm: f64, lr_scale: f64, t0: Instant) -> Result<StepMetrics> {
        if let Some(g) = self.group {
            let mut v = vec![sums.loss, sums.samples as f64, sums.tokens as f64, sums.micro_batches as f64];
            v.extend(sums.metrics.iter().map(|(_, x)| *x));
            let t = Tensor::from_slice(&v);
            g.all_reduce(&[&t], ReduceOp::Sum)?;
            let v = Vec::<f64>::try_from(&t)?;
            (sums.loss, sums.samples, sums.tokens, sums.micro_batches) = (v[0], v[1] as usize, v[2] as usize, v[3] as usize);
            sums.metrics.iter_mut().zip(&v[4..]).for_each(|(m, x)| m.1 = *x);
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        // Means over the micro-batches that ran (a skipped one has no loss to average).
        let n = sums.micro_batches as f64;
        let mut row = StepMetrics { step: step + 1, epoch: (step + 1) as f64 / self.steps_per_epoch as f64, values: Vec::new() };
        if sums.micro_batches > 0 {
            row.set("loss", sums.loss / n);
            for (k, v) in sums.metrics {
                row.set(&k, v / n);
            }
        }
        row.set("learning_rate", self.cfg.lr * lr_scale);
        row.set("grad_norm", grad_norm);
        row.set("samples_per_second", sums.samples as f64 / secs);
        row.set("tokens_per_second", sums.tokens as f64 / secs);
        row.set("step_seconds", secs);
        Ok(row)
    }

    /// Saves after every `checkpoint_every` steps: rank 0 writes the model and the trainer state,
    /// each rank its shard of a ZeRO-1 optimizer state (else rank 0 the whole of it); all ranks
    /// learn if any part failed.
    fn checkpoint<S>(&self, mllm: &Mllm, data_len: usize, step: usize, log: &TrainLog) -> Result<()>
    where
        O: Objective<S>,
    {
        let c = self.cfg;
        if c.checkpoint_every == 0 || (step + 1) % c.checkpoint_every != 0 {
            return Ok(());
        }
        let dir = c.checkpoint_dir.as_ref().ok_or_else(|| PivotError::config("trainer config", "checkpoint_dir", "checkpoint_every is set but checkpoint_dir is not"))?;
        let state = TrainerState {
            format: 1,
            objective: self.obj.name().to_string(),
            step: step + 1,
            total_steps: self.total,
            steps_per_epoch: self.steps_per_epoch,
            data_len,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            world: self.shard.world,
            seed: c.seed,
            adam_t: self.opt.t,
            log: log.clone(),
        };
        let path = checkpoint::checkpoint_path(dir, step + 1);
        let objective = if self.shard.rank == 0 { self.obj.state() } else { Vec::new() };
        let saved = self.opt.checkpoint_state().and_then(|opt| checkpoint::save(&path, mllm, &opt, &objective, &state, self.group));
        self.agree(step, c.grad_accum - 1, saved.map_err(Stop::Failed))
    }
}

impl Sums {
    fn add(&mut self, loss: f64, m: Micro) {
        self.micro_batches += 1;
        self.loss += loss;
        self.samples += m.samples;
        self.tokens += m.tokens;
        for (k, v) in m.metrics {
            match self.metrics.iter_mut().find(|(n, _)| *n == k) {
                Some(slot) => slot.1 += v,
                None => self.metrics.push((k, v)),
            }
        }
    }
}
