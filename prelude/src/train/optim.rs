//! AdamW and the cosine schedule, written out rather than taken from `tch::nn::Optimizer`
//! because a checkpoint must carry the moment estimates (tch keeps them inside libtorch, out of
//! reach), and because PIVOT gives the vision tower its own learning rate.
//!
//! ZeRO-1 ([`AdamW::shard_over`]): under a process group of W ranks each flat segment is padded
//! to a multiple of W and cut into W equal chunks; rank r keeps the fp32 master and both moments
//! of chunk r only (12 bytes per parameter become 12/W). A step reduce-scatters the gradients
//! (rank r receives the sum of chunk r), updates its chunk, and all-gathers the weights. The
//! arithmetic per element is plain AdamW's, so the weights equal plain data parallel's up to the
//! rounding of the global gradient norm (summed from per-chunk norms). A checkpoint of a sharded
//! run holds each rank's chunks as that rank wrote them ([`OptimizerState::Shard`], with the
//! layout: world size and every segment's parameters and chunk length), so no rank ever holds
//! the whole state; an unsharded run writes the whole state under per-parameter names. Either
//! resumes at any W: each rank copies its new chunk out of the saved chunks that overlap it
//! ([`SavedState`]), parameter by parameter, so even a different split into segments reads back.

use super::dist::{ProcessGroup, ReduceOp};
use crate::error::{PivotError, Result};
use crate::model::{Checkpoint, Mllm};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// The three parts of an MLLM, each its own parameter group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ParamGroup {
    Tower,
    Projector,
    Lm,
}

impl ParamGroup {
    pub const ALL: [ParamGroup; 3] = [ParamGroup::Tower, ParamGroup::Projector, ParamGroup::Lm];

    /// Prefix of this module's tensors in trainer checkpoints.
    pub fn prefix(self) -> &'static str {
        match self {
            ParamGroup::Tower => "tower.",
            ParamGroup::Projector => "projector.",
            ParamGroup::Lm => "lm.",
        }
    }

    pub(crate) fn vars(self, mllm: &Mllm) -> Vec<(String, Tensor)> {
        let vs = match self {
            ParamGroup::Tower => mllm.tower.var_store(),
            ParamGroup::Projector => mllm.projector.var_store(),
            ParamGroup::Lm => mllm.lm.var_store(),
        };
        // Sorted so that the order of updates, and so the floating-point results, never depend
        // on hash-map iteration order.
        let mut v: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(n, t)| (format!("{}{n}", self.prefix()), t)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// One trainable tensor.
pub(crate) struct Param {
    pub name: String,
    pub module: ParamGroup,
    pub tensor: Tensor,
}

/// The parameters of one module and one dtype that the loss reaches, stored contiguously.
///
/// At the first update every parameter becomes a view into `flat` and every gradient a view
/// into `grad`, so clipping, the update and zeroing are a few kernels over the whole run rather
/// than a few per tensor: on a GPU a per-tensor AdamW is bound by kernel launches (measured on
/// an H100 at SigLIP2-So + Qwen2.5-0.5B: 72 ms of a 310 ms DPO step, against 18 ms for torch's
/// multi-tensor AdamW).
struct Segment {
    module: ParamGroup,
    params: Vec<(String, Tensor)>,
    numels: Vec<i64>,
    /// Weights and gradients of every parameter, then zeros up to a multiple of the ranks that
    /// share the optimizer state (ZeRO-1; one rank: no padding).
    flat: Tensor,
    grad: Tensor,
    /// This rank's chunk `lo..lo + len` of `flat`: the part whose optimizer state it holds (the
    /// whole of `flat` unless sharded).
    lo: i64,
    len: i64,
    /// ZeRO-1: the reduce-scattered (summed, then averaged) gradient of this rank's chunk.
    grad_chunk: Option<Tensor>,
    /// fp32 master copy of bf16/f16 weights (of the chunk): an lr-1e-6 update is below bf16's
    /// resolution (8 bits of mantissa), so applied to the bf16 weights directly it would round
    /// to nothing.
    master: Option<Tensor>,
    /// The moments of the chunk.
    m: Tensor,
    v: Tensor,
    /// 0-d f32 on the segment's device: the fused kernel's step count and gradient divisor.
    step: Tensor,
    grad_scale: Tensor,
}

impl Segment {
    /// `rank` of `world` ranks sharing the optimizer state (0 of 1: unsharded).
    fn new(module: ParamGroup, params: Vec<(String, Tensor)>, rank: usize, world: usize) -> Segment {
        let numels: Vec<i64> = params.iter().map(|(_, t)| t.numel() as i64).collect();
        let n: i64 = numels.iter().sum();
        let len = (n + world as i64 - 1) / world as i64;
        let pad = len * world as i64 - n;
        let (flat, grad) = tch::no_grad(|| {
            let padded = |parts: Vec<Tensor>| {
                let mut parts = parts;
                if pad > 0 {
                    parts.push(Tensor::zeros([pad], (parts[0].kind(), parts[0].device())));
                }
                Tensor::cat(&parts, 0)
            };
            let flat = padded(params.iter().map(|(_, t)| t.detach().reshape([-1])).collect());
            let grad = padded(params.iter().map(|(_, t)| t.grad().reshape([-1])).collect());
            (flat, grad)
        });
        let lo = rank as i64 * len;
        let chunk = flat.narrow(0, lo, len);
        let master = (flat.kind() != Kind::Float).then(|| chunk.to_kind(Kind::Float));
        let (m, v) = (chunk.zeros_like().to_kind(Kind::Float), chunk.zeros_like().to_kind(Kind::Float));
        let grad_chunk = (world > 1).then(|| Tensor::zeros([len], (grad.kind(), grad.device())));
        let step = Tensor::zeros([], (Kind::Float, flat.device()));
        let grad_scale = Tensor::ones([], (Kind::Float, flat.device()));
        let seg = Segment { module, params, numels, flat, grad, lo, len, grad_chunk, master, m, v, step, grad_scale };
        let mut off = 0;
        for ((_, t), n) in seg.params.iter().zip(&seg.numels) {
            let shape = t.size();
            t.shallow_clone().set_data(&seg.flat.narrow(0, off, *n).view(shape.as_slice()));
            t.grad().set_data(&seg.grad.narrow(0, off, *n).view(shape.as_slice()));
            off += n;
        }
        seg
    }

    /// Re-attaches any gradient that autograd allocated anew (e.g. after something set it to
    /// a fresh tensor) to its slot of `grad`.
    fn attach_grads(&self) {
        let mut off = 0;
        for ((_, t), n) in self.params.iter().zip(&self.numels) {
            let mut g = t.grad();
            let slot = self.grad.narrow(0, off, *n);
            if !g.defined() {
                // zero_grad keeps gradients defined; an undefined one means the loss no longer
                // reaches this tensor: a zero gradient, as for a frozen input.
                let _ = slot.shallow_clone().zero_();
            } else if g.data_ptr() != slot.data_ptr() {
                tch::no_grad(|| slot.shallow_clone().copy_(&g.reshape([-1])));
                g.set_data(&slot.view(t.size().as_slice()));
            }
            off += n;
        }
    }

    /// The gradient of this rank's chunk (the averaged one under ZeRO-1).
    fn chunk_grad(&self) -> Tensor {
        match &self.grad_chunk {
            Some(g) => g.shallow_clone(),
            None => self.grad.narrow(0, self.lo, self.len),
        }
    }

    /// The weights the update writes: the fp32 master chunk, else the chunk of the weights.
    fn chunk_weights(&self) -> Tensor {
        match &self.master {
            Some(m) => m.shallow_clone(),
            None => self.flat.narrow(0, self.lo, self.len),
        }
    }

    /// This rank's chunks of optimizer state, by checkpoint name: the moments and the master copy.
    fn slots(&self) -> Vec<(&'static str, &Tensor)> {
        let mut slots = vec![("m", &self.m), ("v", &self.v)];
        if let Some(master) = &self.master {
            slots.push(("master", master));
        }
        slots
    }

    /// The parameters that overlap this rank's chunk: (name, weights, where the parameter starts
    /// in `flat`, the overlap `a..b` in `flat`'s coordinates).
    fn overlaps(&self) -> Vec<(&str, &Tensor, i64, std::ops::Range<i64>)> {
        let (lo, hi) = (self.lo, self.lo + self.len);
        let mut out = Vec::new();
        let mut start = 0;
        for ((name, t), &n) in self.params.iter().zip(&self.numels) {
            let (a, b) = (start.max(lo), (start + n).min(hi));
            if a < b {
                out.push((name.as_str(), t, start, a..b));
            }
            start += n;
        }
        out
    }

    /// Fills this rank's chunks from whole per-parameter tensors (`m.<param>`, `v.<param>`,
    /// `master.<param>`), whatever the ranks that wrote them.
    fn fill_from_whole(&self, pending: &[(String, Tensor)]) -> Result<()> {
        let find = |key: &str| pending.iter().find(|(k, _)| k == key).map(|(_, t)| t);
        for (slot, buf) in self.slots() {
            for (name, weights, start, r) in self.overlaps() {
                let key = format!("{slot}.{name}");
                let src = match (find(&key), slot) {
                    (Some(t), _) => t.shallow_clone(),
                    // Checkpoints of fp32 models have no master copy: the weights are it.
                    (None, "master") => weights.detach(),
                    (None, _) => {
                        return Err(PivotError::invalid(format!(
                            "optimizer state `{key}` is missing from the checkpoint, but the loss reaches `{name}`"
                        )));
                    }
                };
                if src.size() != weights.size() {
                    return Err(PivotError::invalid(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        src.size(),
                        weights.size()
                    )));
                }
                let src = src.reshape([-1]).narrow(0, r.start - start, r.end - r.start);
                tch::no_grad(|| buf.narrow(0, r.start - self.lo, r.end - r.start).copy_(&src));
            }
        }
        Ok(())
    }

    /// Fills this rank's chunks from the shards of a ZeRO-1 checkpoint: each parameter's part of
    /// the chunk is found in the saved segment that holds the parameter, and copied from the
    /// saved ranks whose ranges overlap it. Only those ranks' buffers are read, one slot at a time.
    fn fill_from_shards(&self, layout: &ShardLayout, files: &[Checkpoint]) -> Result<()> {
        // Where each saved parameter lies: segment, offset in its flat buffers, elements.
        let mut saved: HashMap<&str, (usize, i64, i64)> = HashMap::new();
        for (i, seg) in layout.segments.iter().enumerate() {
            let mut off = 0;
            for (name, n) in &seg.params {
                saved.insert(name.as_str(), (i, off, *n));
                off += n;
            }
        }
        for (slot, buf) in self.slots() {
            let mut read: HashMap<(usize, usize), Tensor> = HashMap::new();
            for (name, weights, start, r) in self.overlaps() {
                let dst = buf.narrow(0, r.start - self.lo, r.end - r.start);
                let n = weights.numel() as i64;
                let found = saved.get(name).copied();
                let Some((i, off, saved_n)) = found.filter(|&(i, _, _)| slot != "master" || layout.segments[i].master) else {
                    if slot == "master" {
                        // Saved from fp32 weights (no master copy): the weights are it.
                        let w = weights.detach().reshape([-1]).narrow(0, r.start - start, r.end - r.start);
                        tch::no_grad(|| dst.shallow_clone().copy_(&w));
                        continue;
                    }
                    return Err(PivotError::invalid(format!(
                        "optimizer state of `{name}` is missing from the checkpoint's shards, but the loss reaches it"
                    )));
                };
                if saved_n != n {
                    return Err(PivotError::invalid(format!(
                        "optimizer state of `{name}` has {saved_n} elements in the checkpoint's shards, the parameter has {n}"
                    )));
                }
                // Elements a..b of this parameter (in `flat`) are sa..sb of saved segment i.
                let (sa, sb) = (off + r.start - start, off + r.end - start);
                let chunk = layout.segments[i].chunk;
                for k in (sa / chunk) as usize..=((sb - 1) / chunk) as usize {
                    let src = match read.entry((k, i)) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => e.insert(files[k].tensor(&format!("{slot}.{i}"))?),
                    };
                    let (ka, kb) = (sa.max(k as i64 * chunk), sb.min((k as i64 + 1) * chunk));
                    let part = src.narrow(0, ka - k as i64 * chunk, kb - ka);
                    tch::no_grad(|| dst.narrow(0, ka - sa, kb - ka).copy_(&part));
                }
            }
        }
        Ok(())
    }

    /// `(name, view)` of a flat state tensor per parameter, shaped like the parameter.
    fn views(&self, flat: &Tensor) -> Vec<(String, Tensor)> {
        let mut off = 0;
        let mut out = Vec::with_capacity(self.params.len());
        for ((name, t), n) in self.params.iter().zip(&self.numels) {
            out.push((name.clone(), flat.narrow(0, off, *n).view(t.size().as_slice())));
            off += n;
        }
        out
    }
}

/// The layout of a ZeRO-1 checkpoint's optimizer state: rank k of `world` saved elements
/// `k·chunk .. (k+1)·chunk` of each segment's flat buffers (padded with zeros to `chunk × world`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ShardLayout {
    pub world: usize,
    pub segments: Vec<SavedSegment>,
}

/// One segment (module × dtype × device) of a sharded checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SavedSegment {
    pub module: ParamGroup,
    /// Its parameters in flat order, with their element counts.
    pub params: Vec<(String, i64)>,
    /// Elements of each rank's range.
    pub chunk: i64,
    /// Whether an fp32 master copy of the weights was saved (bf16/f16 weights).
    pub master: bool,
}

impl ShardLayout {
    /// The buffers every shard holds for segment `i`: `m.i`, `v.i` and `master.i` if saved.
    pub fn keys(&self, i: usize) -> Vec<String> {
        let mut keys = vec![format!("m.{i}"), format!("v.{i}")];
        if self.segments[i].master {
            keys.push(format!("master.{i}"));
        }
        keys
    }

    /// Rank `rank`'s element range of segment `i`'s buffers.
    pub fn range(&self, i: usize, rank: usize) -> std::ops::Range<i64> {
        let chunk = self.segments[i].chunk;
        rank as i64 * chunk..(rank as i64 + 1) * chunk
    }
}

/// What one rank puts into a checkpoint.
pub(crate) enum OptimizerState {
    /// The whole state of an unsharded optimizer: `m.<param>`, `v.<param>`, `master.<param>`.
    Whole(Vec<(String, Tensor)>),
    /// ZeRO-1: this rank's chunks (`m.<segment>`, ...; see [`ShardLayout::keys`]) and the layout
    /// of every rank's.
    Shard { layout: ShardLayout, rank: usize, tensors: Vec<(String, Tensor)> },
}

/// The optimizer state of a checkpoint, opened: one file of whole tensors, or one file per rank
/// of the run that wrote it (`files[k]` is rank k's), their shapes checked against the layout.
pub(crate) enum SavedState {
    Whole(Checkpoint),
    Shards { layout: ShardLayout, files: Vec<Checkpoint> },
}

/// State read from a checkpoint before the segments exist (they are built at the first update).
enum Pending {
    None,
    Whole(Vec<(String, Tensor)>),
    Shards { layout: ShardLayout, files: Vec<Checkpoint> },
}

/// AdamW with decoupled weight decay and bias correction (torch.optim.AdamW semantics; like
/// torch it leaves alone the parameters the loss never reaches, e.g. SigLIP's unused head).
pub struct AdamW {
    params: Vec<Param>,
    /// ZeRO-1: the ranks that share the optimizer state, each holding a chunk of it.
    shard: Option<&'static ProcessGroup>,
    /// Built at the first update, when the gradients show which parameters the loss reaches.
    segments: Vec<Segment>,
    /// Moments (and master weights) read from a checkpoint before the segments exist.
    pending: Pending,
    pub(crate) lrs: [f64; 3],
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates applied so far (the `t` of the bias correction).
    pub t: usize,
    /// Use libtorch's fused kernel (one pass per segment); off where it is unavailable, and in
    /// the tests that check it against the unfused update.
    pub(crate) fused: bool,
}

impl AdamW {
    /// Collects every parameter of `mllm` that currently requires grad. `lrs` are the peak
    /// learning rates of tower, projector and LM.
    pub(crate) fn new(mllm: &Mllm, lrs: [f64; 3], betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Self> {
        let mut params = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for module in ParamGroup::ALL {
            for (name, tensor) in module.vars(mllm) {
                // A tensor registered twice (tied weights) is one parameter.
                if tensor.requires_grad() && seen.insert(tensor.data_ptr() as usize) {
                    params.push(Param { name, module, tensor });
                }
            }
        }
        Self::from_params(params, lrs, betas, eps, weight_decay)
    }

    /// Refuses hyper-parameters that make the update undefined or silently wrong: ε = 0 divides
    /// 0 by 0 for a parameter whose gradient has always been zero, β ≥ 1 makes the bias
    /// correction divide by zero, β < 0 or a negative weight decay are no longer AdamW.
    pub(crate) fn from_params(params: Vec<Param>, lrs: [f64; 3], betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<Self> {
        let bad = |field: &str, msg: String| Err(PivotError::config("AdamW", field, msg));
        for (lr, group) in lrs.iter().zip(ParamGroup::ALL) {
            if !(lr.is_finite() && *lr >= 0.0) {
                return bad("lr", format!("{lr} (the {group:?} group's) is not a finite value >= 0"));
            }
        }
        for (beta, field) in [(betas.0, "betas.0"), (betas.1, "betas.1")] {
            if !(0.0..1.0).contains(&beta) {
                return bad(field, format!("{beta} is outside [0, 1)"));
            }
        }
        if !(eps.is_finite() && eps > 0.0) {
            return bad("eps", format!("{eps} is not a finite value > 0"));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return bad("weight_decay", format!("{weight_decay} is not a finite value >= 0"));
        }
        let fused = cfg!(pivot_fused_optim);
        Ok(AdamW { params, shard: None, segments: Vec::new(), pending: Pending::None, lrs, betas, eps, weight_decay, t: 0, fused })
    }

    /// ZeRO-1 over `group`: from the first update on, this rank keeps the optimizer state of its
    /// chunk only; [`AdamW::reduce_scatter_grads`] replaces the gradient all-reduce. Must be
    /// called on every rank of the group, before the first update.
    pub(crate) fn shard_over(&mut self, group: &'static ProcessGroup) -> Result<()> {
        if !self.segments.is_empty() {
            return Err(PivotError::invalid("AdamW::shard_over: the optimizer state already exists unsharded"));
        }
        self.shard = (group.world() > 1).then_some(group);
        Ok(())
    }

    /// Whether the optimizer state is sharded over more than one rank (ZeRO-1).
    pub(crate) fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    fn build_segments(&mut self) -> Result<()> {
        if !self.segments.is_empty() {
            return Ok(());
        }
        let (rank, world) = self.shard.map_or((0, 1), |g| (g.rank(), g.world()));
        let mut runs: Vec<(ParamGroup, Kind, tch::Device, Vec<(String, Tensor)>)> = Vec::new();
        for p in &self.params {
            if !p.tensor.grad().defined() {
                continue;
            }
            let key = (p.module, p.tensor.kind(), p.tensor.device());
            match runs.iter_mut().find(|r| (r.0, r.1, r.2) == key) {
                Some(r) => r.3.push((p.name.clone(), p.tensor.shallow_clone())),
                None => runs.push((key.0, key.1, key.2, vec![(p.name.clone(), p.tensor.shallow_clone())])),
            }
        }
        self.segments = runs.into_iter().map(|(module, _, _, params)| Segment::new(module, params, rank, world)).collect();
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => {}
            Pending::Whole(pending) => self.segments.iter().try_for_each(|seg| seg.fill_from_whole(&pending))?,
            Pending::Shards { layout, files } => self.segments.iter().try_for_each(|seg| seg.fill_from_shards(&layout, &files))?,
        }
        Ok(())
    }

    /// ZeRO-1's half of the gradient all-reduce: each rank receives the mean over the ranks of
    /// its chunk of every segment's gradient.
    pub(crate) fn reduce_scatter_grads(&mut self) -> Result<()> {
        let Some(g) = self.shard else {
            return Err(PivotError::invalid("AdamW::reduce_scatter_grads: the optimizer state is not sharded"));
        };
        self.build_segments()?;
        for s in &self.segments {
            s.attach_grads();
            let chunk = s.grad_chunk.as_ref().expect("sharded segments have a gradient chunk");
            g.reduce_scatter(chunk, &s.grad)?;
            let _ = chunk.shallow_clone().g_div_scalar_(g.world() as f64);
        }
        Ok(())
    }

    pub(crate) fn zero_grad(&mut self) {
        if self.segments.is_empty() {
            for p in &self.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.detach_().zero_();
                }
            }
        } else {
            for seg in &self.segments {
                let _ = seg.grad.shallow_clone().zero_();
            }
        }
    }

    /// The flat gradient buffer of every segment (the segments are built at the first call), for
    /// the data-parallel all-reduce that precedes the norm.
    pub(crate) fn flat_grads(&mut self) -> Result<Vec<Tensor>> {
        self.build_segments()?;
        Ok(self
            .segments
            .iter()
            .map(|s| {
                s.attach_grads();
                s.grad.shallow_clone()
            })
            .collect())
    }

    /// Global L2 norm of all gradients (fp32), as torch's `clip_grad_norm_` computes it. Under
    /// ZeRO-1 from the ranks' chunks (a collective), the same value on every rank.
    pub(crate) fn grad_norm(&mut self) -> Result<f64> {
        self.build_segments()?;
        let norms: Vec<Tensor> = self
            .segments
            .iter()
            .map(|s| {
                s.attach_grads();
                s.chunk_grad().linalg_norm(2.0, None::<&[i64]>, false, Kind::Float)
            })
            .collect();
        let Some(g) = self.shard else {
            if norms.is_empty() {
                return Ok(0.0);
            }
            return Ok(Tensor::stack(&norms, 0).linalg_norm(2.0, None::<&[i64]>, false, Kind::Float).double_value(&[]));
        };
        // Every rank has the same segments (the same model and loss), so each joins this one
        // all-reduce.
        let squares = if norms.is_empty() { Tensor::zeros([1], (Kind::Double, tch::Device::Cpu)) } else { Tensor::stack(&norms, 0).to_kind(Kind::Double).square().sum(Kind::Double).reshape([1]).to_device(tch::Device::Cpu) };
        g.all_reduce(&[&squares], ReduceOp::Sum)?;
        Ok(squares.double_value(&[0]).sqrt())
    }

    /// One update with the group learning rates scaled by `lr_scale` (the schedule factor) and
    /// every gradient multiplied by `grad_scale` (the clipping factor): torch.optim.AdamW, on the
    /// fp32 master copy where the weights are bf16/f16.
    pub(crate) fn step(&mut self, lr_scale: f64, grad_scale: f64) -> Result<()> {
        self.build_segments()?;
        self.t += 1;
        for i in 0..self.segments.len() {
            let lr = self.lrs[self.segments[i].module as usize] * lr_scale;
            if self.fused {
                match self.step_fused(i, lr, grad_scale) {
                    Ok(()) => continue,
                    // An unsupported device or dtype fails at dispatch, before any update.
                    Err(e) => {
                        eprintln!("pivot: fused AdamW unavailable ({e}); using the unfused update");
                        self.fused = false;
                    }
                }
            }
            self.step_unfused(i, lr, grad_scale);
        }
        self.all_gather_weights()?;
        self.check_finite()
    }

    /// ZeRO-1: every rank's updated chunk of the weights into every rank's `flat`.
    fn all_gather_weights(&self) -> Result<()> {
        let Some(g) = self.shard else { return Ok(()) };
        for s in &self.segments {
            // Gloo's all-gather wants its input apart from its output.
            let mine = s.flat.narrow(0, s.lo, s.len).copy();
            g.all_gather(&s.flat, &mine)?;
        }
        Ok(())
    }

    /// After an update: finite gradients and valid hyper-parameters can still overflow (an lr
    /// too large for the weights' dtype). Stop at the step that did it rather than a step later
    /// at a NaN loss with the cause gone. Under ZeRO-1 `flat` is whole and the same on every
    /// rank (a non-finite master chunk rounds to non-finite weights), so all ranks stop together.
    fn check_finite(&self) -> Result<()> {
        for s in &self.segments {
            for w in std::iter::once(&s.flat).chain(s.master.as_ref()) {
                // A sum is non-finite iff an element is (or the weights are beyond 1e38 anyway),
                // and needs no weight-sized temporary.
                let finite = tch::no_grad(|| w.sum(Kind::Float)).double_value(&[]).is_finite();
                if !finite {
                    let name = s.views(&s.flat).into_iter().find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0).map(|(n, _)| n);
                    return Err(PivotError::invalid(format!(
                        "AdamW update {} made the {:?} weights non-finite (first: `{}`; lr {:?} too large for their dtype?); \
                         the model's weights are no longer usable — resume from the last checkpoint",
                        self.t,
                        s.module,
                        name.unwrap_or_default(),
                        self.lrs[s.module as usize]
                    )));
                }
            }
        }
        Ok(())
    }

    /// libtorch's `_fused_adamw_` over the whole segment: one read and write of weights, gradient
    /// and moments instead of about ten passes (an H100 step of a 0.9 B model spent 29 ms here).
    fn step_fused(&mut self, i: usize, lr: f64, grad_scale: f64) -> Result<()> {
        let s = &mut self.segments[i];
        s.attach_grads();
        let _ = s.step.fill_(self.t as f64);
        // The kernel divides gradients by this; 1/clip turns that into the clipping factor.
        // Unclipped steps pass none (and skip the fill).
        if grad_scale != 1.0 {
            let _ = s.grad_scale.fill_(1.0 / grad_scale);
        }
        tch::no_grad(|| {
            // The kernel wants one dtype throughout: the fp32 master takes an fp32 gradient.
            let g = if s.master.is_some() { s.chunk_grad().to_kind(Kind::Float) } else { s.chunk_grad() };
            let w = s.chunk_weights();
            let scale = (grad_scale != 1.0).then_some(&s.grad_scale);
            fused::adamw(&w, &g, &s.m, &s.v, &s.step, lr, self.betas, self.weight_decay, self.eps, scale)?;
            if let Some(master) = &s.master {
                let _ = s.flat.narrow(0, s.lo, s.len).copy_(master);
            }
            Ok(())
        })
    }

    /// The same update op by op (torch's single-tensor AdamW with the √(bias correction) moved
    /// into the step size and ε, as its multi-tensor version does).
    fn step_unfused(&mut self, i: usize, lr: f64, grad_scale: f64) {
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
        let s = &mut self.segments[i];
        s.attach_grads();
        tch::no_grad(|| {
            let g = s.chunk_grad();
            let mut g = if g.kind() == Kind::Float { g } else { g.to_kind(Kind::Float) };
            if grad_scale != 1.0 {
                g = g * grad_scale;
            }
            let _ = s.m.lerp_(&g, 1.0 - b1);
            let _ = s.v.lerp_(&g.square(), 1.0 - b2);
            let mut denom = s.v.sqrt();
            let _ = denom.g_add_scalar_(self.eps * bc2_sqrt);
            let mut w = s.chunk_weights();
            if self.weight_decay != 0.0 {
                let _ = w.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = w.addcdiv_(&(&s.m * (-lr * bc2_sqrt / bc1)), &denom);
            if s.master.is_some() {
                let _ = s.flat.narrow(0, s.lo, s.len).copy_(&w);
            }
        });
    }

    /// Moments under `m.<param>` / `v.<param>` names, and `master.<param>` for bf16/f16
    /// parameters: whole tensors, so only where the state is not sharded.
    pub(crate) fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if self.shard.is_some() {
            return Err(PivotError::invalid("AdamW::state_tensors: the optimizer state is sharded (ZeRO-1); each rank holds a chunk of it"));
        }
        if self.segments.is_empty() {
            return match &self.pending {
                Pending::None => Ok(Vec::new()),
                Pending::Whole(p) => Ok(p.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()),
                Pending::Shards { .. } => Err(PivotError::invalid("a checkpoint before the first update of a run resumed from a sharded checkpoint")),
            };
        }
        let mut out = Vec::new();
        for s in &self.segments {
            for ((name, m), (_, v)) in s.views(&s.m).into_iter().zip(s.views(&s.v)) {
                out.push((format!("m.{name}"), m));
                out.push((format!("v.{name}"), v));
            }
            if let Some(master) = &s.master {
                out.extend(s.views(master).into_iter().map(|(name, t)| (format!("master.{name}"), t)));
            }
        }
        Ok(out)
    }

    /// What this rank writes into a checkpoint: the whole state when it is not sharded; under
    /// ZeRO-1 its own chunks and the layout of every rank's (the same on every rank, so no
    /// collective: nothing is gathered).
    pub(crate) fn checkpoint_state(&self) -> Result<OptimizerState> {
        let Some(g) = self.shard else { return Ok(OptimizerState::Whole(self.state_tensors()?)) };
        if self.segments.is_empty() {
            return Err(PivotError::invalid("a ZeRO-1 checkpoint before the first update: the optimizer state's shards do not exist yet"));
        }
        let mut segments = Vec::new();
        let mut tensors = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            segments.push(SavedSegment {
                module: s.module,
                params: s.params.iter().map(|(n, _)| n.clone()).zip(s.numels.iter().copied()).collect(),
                chunk: s.len,
                master: s.master.is_some(),
            });
            tensors.extend(s.slots().into_iter().map(|(slot, t)| (format!("{slot}.{i}"), t.shallow_clone())));
        }
        Ok(OptimizerState::Shard { layout: ShardLayout { world: g.world(), segments }, rank: g.rank(), tensors })
    }

    /// Reads the state a checkpoint holds for our parameters; it is applied (and checked) at
    /// the first update, when the parameters the loss reaches are known.
    pub(crate) fn load_state(&mut self, saved: SavedState) -> Result<()> {
        self.pending = match saved {
            SavedState::Whole(ck) => {
                let mut pending = Vec::new();
                for p in &self.params {
                    for prefix in ["m", "v", "master"] {
                        let key = format!("{prefix}.{}", p.name);
                        if ck.contains(&key) {
                            pending.push((key.clone(), ck.tensor(&key)?));
                        }
                    }
                }
                Pending::Whole(pending)
            }
            SavedState::Shards { layout, files } => Pending::Shards { layout, files },
        };
        Ok(())
    }
}

#[cfg(pivot_fused_optim)]
mod fused {
    use crate::error::{PivotError, Result};
    use tch::Tensor;
    use torch_sys::C_tensor;

    unsafe extern "C" {
        // csrc/fused_optim.cpp: NULL or a malloc'ed error message.
        fn pivot_fused_adamw(
            params: *const *const C_tensor,
            grads: *const *const C_tensor,
            exp_avgs: *const *const C_tensor,
            exp_avg_sqs: *const *const C_tensor,
            steps: *const *const C_tensor,
            n: i32,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
            grad_scale: *const C_tensor,
        ) -> *mut libc::c_char;
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw(
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        step: &Tensor,
        lr: f64,
        (b1, b2): (f64, f64),
        weight_decay: f64,
        eps: f64,
        grad_scale: Option<&Tensor>,
    ) -> Result<()> {
        let one = |t: &Tensor| [t.as_ptr()];
        let (w, g, m, v, step) = (one(w), one(g), one(m), one(v), one(step));
        let scale = grad_scale.map_or(std::ptr::null(), |t| t.as_ptr());
        // SAFETY: every pointer is a live tch tensor (an `at::Tensor*`) borrowed for the call; the
        // C++ side catches every exception and returns its message instead.
        let err = unsafe {
            pivot_fused_adamw(w.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), step.as_ptr(), 1, lr, b1, b2, weight_decay, eps, scale)
        };
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: a NUL-terminated string from strdup, freed once here.
        let msg = unsafe {
            let m = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc::free(err.cast());
            m
        };
        Err(PivotError::invalid(format!("at::_fused_adamw_: {msg}")))
    }
}

#[cfg(not(pivot_fused_optim))]
mod fused {
    use crate::error::{PivotError, Result};
    use tch::Tensor;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: (f64, f64),
        _: f64,
        _: f64,
        _: Option<&Tensor>,
    ) -> Result<()> {
        Err(PivotError::invalid("built without torch's C++ headers"))
    }
}

/// Linear warmup then cosine decay to 0 (HF `get_cosine_schedule_with_warmup`); the factor that
/// multiplies the peak learning rate at optimizer step `step` (0-based).
pub fn cosine_schedule(step: usize, total: usize, warmup_ratio: f64) -> f64 {
    let warmup = (total as f64 * warmup_ratio).ceil() as usize;
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `tests/fixtures/generated/adamw`, written by torch.optim.AdamW (make_parity_fixtures.py).
    fn fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
        let dir = std::env::var_os("PIVOT_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/generated"))
            .join("adamw");
        let tensors = Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap_or_else(|e| panic!("AdamW fixture missing in {}: run `make fixtures` ({e})", dir.display()));
        let cfg = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        (tensors.into_iter().collect(), cfg)
    }

    /// Runs our AdamW through the fixture's six steps, the engine's way (norm, clip, step, zero),
    /// with the weights in `kind`, and compares weights (the fp32 master for bf16), moments and
    /// gradient norms with torch's.
    fn matches_torch(kind: Kind, fused: bool) {
        let (t, cfg) = fixture();
        let names = ["tower.a", "tower.b", "lm.c"];
        let params: Vec<Param> = names
            .iter()
            .map(|n| Param {
                name: n.to_string(),
                module: if n.starts_with("tower") { ParamGroup::Tower } else { ParamGroup::Lm },
                tensor: t[&format!("init.{n}")].to_kind(kind).set_requires_grad(true),
            })
            .collect();
        let f = |k: &str| cfg[k].as_f64().unwrap();
        let betas = (cfg["betas"][0].as_f64().unwrap(), cfg["betas"][1].as_f64().unwrap());
        let mut opt = AdamW::from_params(params, [f("lr_tower"), 0.0, f("lr_lm")], betas, f("eps"), f("weight_decay")).unwrap();
        opt.fused = fused;
        let max_norm = f("max_norm");
        for s in 0..cfg["steps"].as_u64().unwrap() as usize {
            // d/dp Σ p·g = g, exactly (g is bf16-representable).
            let loss = opt.params.iter().map(|p| (&p.tensor * t[&format!("grad.{s}.{}", p.name)].to_kind(kind)).sum(Kind::Float));
            loss.reduce(|a, b| a + b).unwrap().backward();
            let norm = opt.grad_norm().unwrap();
            let want = cfg["grad_norms"][s].as_f64().unwrap();
            assert!((norm - want).abs() < 1e-5 * want, "step {s}: grad norm {norm}, torch {want}");
            let clip = if norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
            opt.step(cfg["lr_scale"][s].as_f64().unwrap(), clip).unwrap();
            opt.zero_grad();
        }
        assert_eq!(opt.fused, fused, "the fused kernel failed and the update fell back");
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        for n in names {
            let p = &opt.params.iter().find(|p| p.name == n).unwrap().tensor;
            let w = if kind == Kind::Float { p.detach() } else { state[&format!("master.{n}")].shallow_clone() };
            if kind != Kind::Float {
                assert!(p.equal(&w.to_kind(kind)), "{n}: bf16 weights are not the rounded master copy");
            }
            for (what, ours, theirs) in [("weight", w, &t[&format!("param.{n}")]), ("m", state[&format!("m.{n}")].shallow_clone(), &t[&format!("m.{n}")]), ("v", state[&format!("v.{n}")].shallow_clone(), &t[&format!("v.{n}")])] {
                let err = (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double)).abs().max().double_value(&[]);
                let scale = theirs.abs().max().double_value(&[]).max(1e-3);
                assert!(err <= 2e-6 * scale, "{n} {what} ({kind:?}, fused {fused}): max |ours − torch| = {err:e} (scale {scale})");
            }
        }
    }

    #[test]
    fn unfused_matches_torch_adamw_fp32() {
        matches_torch(Kind::Float, false);
    }

    #[test]
    fn unfused_matches_torch_adamw_bf16_master() {
        matches_torch(Kind::BFloat16, false);
    }

    #[cfg(pivot_fused_optim)]
    #[test]
    fn fused_matches_torch_adamw_fp32() {
        matches_torch(Kind::Float, true);
    }

    #[cfg(pivot_fused_optim)]
    #[test]
    fn fused_matches_torch_adamw_bf16_master() {
        matches_torch(Kind::BFloat16, true);
    }

    /// bf16 parameters of `sizes` (so the segment keeps an fp32 master), with defined gradients as
    /// after a backward, named `lm.p<i>` for i in `ids`.
    fn bf16_params(sizes: &[i64], ids: std::ops::Range<usize>) -> Vec<(String, Tensor)> {
        ids.map(|i| {
            let t = Tensor::zeros([sizes[i]], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
            t.sum(Kind::Float).backward();
            (format!("lm.p{i}"), t)
        })
        .collect()
    }

    /// ZeRO-1 shards written at W ranks read back at W' ranks (1 to 4 each way, 23 elements so that
    /// most splits pad), and into another split of the parameters into segments: every rank gets
    /// exactly its new range of every buffer, each element from where the writer kept it (m holds
    /// its index in the saved flat buffer, v minus that, the master copy that plus a half), and
    /// zeros in its padding (the writers' padding, which holds values too, is never read).
    #[test]
    fn shards_reshard_to_any_number_of_ranks() {
        let sizes = [5i64, 7, 3, 1, 7];
        let n: i64 = sizes.iter().sum();
        let dir = std::env::temp_dir().join(format!("pivot-optim-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for world in 1..=4usize {
            let mut files = Vec::new();
            let mut layout = None;
            for rank in 0..world {
                let seg = Segment::new(ParamGroup::Lm, bf16_params(&sizes, 0..sizes.len()), rank, world);
                let index = Tensor::arange_start(seg.lo, seg.lo + seg.len, (Kind::Float, tch::Device::Cpu));
                let _ = seg.m.shallow_clone().copy_(&index);
                let _ = seg.v.shallow_clone().copy_(&(-&index));
                let _ = seg.master.as_ref().unwrap().shallow_clone().copy_(&(&index + 0.5));
                let tensors: Vec<(String, Tensor)> = seg.slots().into_iter().map(|(slot, t)| (format!("{slot}.0"), t.shallow_clone())).collect();
                let path = dir.join(format!("w{world}-r{rank}.safetensors"));
                crate::model::weights::write_safetensors(&tensors, &path).unwrap();
                files.push(Checkpoint::open(&path).unwrap());
                let params = seg.params.iter().map(|(p, _)| p.clone()).zip(seg.numels.iter().copied()).collect();
                layout = Some(ShardLayout { world, segments: vec![SavedSegment { module: ParamGroup::Lm, params, chunk: seg.len, master: true }] });
            }
            let layout = layout.unwrap();
            // One segment as saved, and parameters 0..2 and 2..5 as two.
            for split in [vec![0..sizes.len()], vec![0..2, 2..sizes.len()]] {
                for world2 in 1..=4usize {
                    for rank2 in 0..world2 {
                        for ids in &split {
                            let seg = Segment::new(ParamGroup::Lm, bf16_params(&sizes, ids.clone()), rank2, world2);
                            seg.fill_from_shards(&layout, &files).unwrap();
                            // Each element's index in the saved flat buffer, then this segment's padding.
                            let first: i64 = sizes[..ids.start].iter().sum();
                            let elems: i64 = sizes[ids.clone()].iter().sum();
                            let pad = seg.flat.numel() as i64 - elems;
                            let want = Tensor::cat(&[Tensor::arange_start(first, first + elems, (Kind::Float, tch::Device::Cpu)), Tensor::full([pad], f64::NAN, (Kind::Float, tch::Device::Cpu))], 0)
                                .narrow(0, seg.lo, seg.len);
                            let real = want.isfinite();
                            let at = format!("saved at {world}, read at rank {rank2} of {world2}, parameters {ids:?}");
                            for (got, expect) in [(&seg.m, want.shallow_clone()), (&seg.v, -&want), (seg.master.as_ref().unwrap(), &want + 0.5)] {
                                assert!(got.masked_select(&real).equal(&expect.masked_select(&real)), "{at}: {got} != {expect}");
                                assert_eq!(got.masked_select(&real.logical_not()).abs().sum(Kind::Float).double_value(&[]), 0.0, "{at}: padding read");
                            }
                        }
                    }
                }
            }
            assert!(n <= layout.segments[0].chunk * world as i64);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The CI build must compile the kernel in: without it the tests above would silently cover
    /// only the fallback.
    #[test]
    fn fused_kernel_is_built() {
        assert!(cfg!(pivot_fused_optim), "prelude built without csrc/fused_optim.cpp (torch headers not found)");
    }
}
