//! AdamW and the cosine schedule, written out rather than taken from `tch::nn::Optimizer`
//! because a checkpoint must carry the moment estimates (tch keeps them inside libtorch, out of
//! reach), and because PIVOT gives the vision tower its own learning rate.

use crate::error::{PivotError, Result};
use crate::model::Mllm;
use tch::{Kind, Tensor};

/// The three parts of an MLLM, each its own parameter group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// One trainable tensor with its AdamW moments.
pub(crate) struct Param {
    pub name: String,
    pub module: ParamGroup,
    pub tensor: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

/// AdamW with decoupled weight decay and bias correction (torch.optim.AdamW semantics).
pub struct AdamW {
    pub(crate) params: Vec<Param>,
    pub(crate) lrs: [f64; 3],
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates applied so far (the `t` of the bias correction).
    pub t: usize,
}

impl AdamW {
    /// Collects every parameter of `mllm` that currently requires grad. `lrs` are the peak
    /// learning rates of tower, projector and LM.
    pub(crate) fn new(mllm: &Mllm, lrs: [f64; 3], betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let mut params = Vec::new();
        for module in ParamGroup::ALL {
            for (name, tensor) in module.vars(mllm) {
                if tensor.requires_grad() {
                    let m = tensor.zeros_like().to_kind(Kind::Float);
                    let v = tensor.zeros_like().to_kind(Kind::Float);
                    params.push(Param { name, module, tensor, m, v });
                }
            }
        }
        AdamW { params, lrs, betas, eps, weight_decay, t: 0 }
    }

    pub(crate) fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Global L2 norm of all gradients (fp32), as torch's `clip_grad_norm_` computes it.
    pub(crate) fn grad_norm(&self) -> f64 {
        let sq: Vec<Tensor> = self
            .params
            .iter()
            .filter_map(|p| {
                let g = p.tensor.grad();
                g.defined().then(|| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            })
            .collect();
        if sq.is_empty() {
            return 0.0;
        }
        Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[])
    }

    /// Scales every gradient by `factor` (gradient clipping).
    pub(crate) fn scale_grads(&mut self, factor: f64) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(factor);
            }
        }
    }

    /// One update with the group learning rates scaled by `lr_scale` (the schedule factor).
    pub(crate) fn step(&mut self, lr_scale: f64) {
        self.t += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.tensor.grad();
                if !g.defined() {
                    // A parameter the loss does not reach (e.g. the SigLIP head): torch skips it too.
                    continue;
                }
                let lr = self.lrs[p.module as usize] * lr_scale;
                let g = g.to_kind(Kind::Float);
                let _ = p.m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = p.v.g_mul_scalar_(b2).g_add_(&(&g * &g * (1.0 - b2)));
                let denom = (&p.v / bc2).sqrt() + self.eps;
                let update = (&p.m / bc1) / denom;
                let mut w = p.tensor.shallow_clone();
                if self.weight_decay != 0.0 {
                    let _ = w.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = w.g_sub_(&(update * lr).to_kind(w.kind()));
            }
        });
    }

    /// Moment tensors under `m.<param>` / `v.<param>` names (for checkpoints).
    pub(crate) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("m.{}", p.name), p.m.shallow_clone()));
            out.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        out
    }

    pub(crate) fn load_state(&mut self, get: impl Fn(&str) -> Result<Tensor>) -> Result<()> {
        for p in &mut self.params {
            for (key, dst) in [(format!("m.{}", p.name), &mut p.m), (format!("v.{}", p.name), &mut p.v)] {
                let src = get(&key)?;
                if src.size() != dst.size() {
                    return Err(PivotError::invalid(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                tch::no_grad(|| dst.copy_(&src));
            }
        }
        Ok(())
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
