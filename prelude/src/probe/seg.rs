//! Segmentation probes on frozen patch tokens: patch-seg (what PIVOT used) and a dense
//! DINOv2-style linear probe with mIoU. Inputs are tensors: tokens [N, h·w, D] (suffix/patch
//! tokens only) and masks [N, H, W] of class ids with H = h·p, W = w·p.

use crate::error::{PivotError, Result};
use std::time::Instant;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// How a p×p block of pixel labels becomes a patch label (patch-seg `label_reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchLabels {
    /// Multi-hot of every class present; "unlabeled" kept only when it is the sole class. BCE loss.
    Union,
    /// The most frequent class (ties → lowest id). CE loss.
    Majority,
}

/// Probe head on each patch token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegHead {
    Linear,
    /// D → hidden → GELU (exact erf) → C, as patch-seg's `mlp` head (hidden 1024).
    Mlp { hidden: i64 },
}

/// Per-patch class counts [B, h·w, C] (int64) from masks [B, H, W]; pixels with ids ≥ C
/// (e.g. 255 = ignore) are not counted.
pub fn patch_class_counts(mask: &Tensor, patch: i64, num_classes: i64) -> Result<Tensor> {
    let s = mask.size();
    if s.len() != 3 || s[1] % patch != 0 || s[2] % patch != 0 {
        return Err(PivotError::invalid(format!(
            "patch labels: mask must be [B, H, W] with H and W multiples of the patch size {patch}, got {s:?}"
        )));
    }
    let (b, h, w) = (s[0], s[1] / patch, s[2] / patch);
    let m = mask.to_kind(Kind::Int64).view([b, h, patch, w, patch]).permute([0, 1, 3, 2, 4]).reshape([b, h * w, patch * patch]);
    // Out-of-range ids land in an extra bin that is dropped: scatter_add needs every index valid.
    let m = m.where_self(&m.lt(num_classes).logical_and(&m.ge(0)), &m.full_like(num_classes));
    let counts = Tensor::zeros([b, h * w, num_classes + 1], (Kind::Int64, mask.device()))
        .scatter_add(2, &m, &m.ones_like());
    Ok(counts.narrow(2, 0, num_classes))
}

/// Union targets [B, h·w, C] float (0/1) from counts.
pub fn union_targets(counts: &Tensor, unlabeled: Option<i64>) -> Tensor {
    let present = counts.gt(0);
    let present = match unlabeled {
        Some(u) => {
            let c = counts.size()[2];
            let others = present.index_fill(2, &Tensor::from_slice(&[u]).to_device(counts.device()), 0).any_dim(2, true);
            let keep_u = Tensor::ones([c], (Kind::Bool, counts.device()))
                .index_fill(0, &Tensor::from_slice(&[u]).to_device(counts.device()), 0);
            // Unlabeled survives only where no other class is present.
            present.logical_and(&keep_u.view([1, 1, c]).logical_or(&others.logical_not()))
        }
        None => present,
    };
    present.to_kind(Kind::Float)
}

/// Majority targets [B, h·w] int64 from counts (lowest id wins ties); -100 where no pixel counted.
pub fn majority_targets(counts: &Tensor) -> Tensor {
    let arg = counts.argmax(2, false);
    let any = counts.sum_dim_intlist([2i64].as_slice(), false, Kind::Int64).gt(0);
    arg.where_self(&any, &arg.full_like(-100))
}

/// Patch-seg metrics (definitions of patch-seg `loss.py`): macro averages over classes with at
/// least one positive patch in the ground truth. A class never predicted has precision 0 (patch-seg
/// yields NaN there, which would poison the macro mean); F1 = 2PR/(P+R+1e-6).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PatchSegMetrics {
    pub macro_recall: f64,
    pub macro_precision: f64,
    pub macro_f1: f64,
    pub macro_accuracy: f64,
    pub micro_accuracy: f64,
    pub classes_present: usize,
}

/// Per-class one-vs-rest 2×2 confusion counts.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryConfusions {
    pub tp: Vec<u64>,
    pub fp: Vec<u64>,
    pub fn_: Vec<u64>,
    pub tn: Vec<u64>,
    /// true for union (multi-label) counting; false for majority (one label per patch).
    pub multilabel: bool,
}

fn to_u64(t: &Tensor) -> Vec<u64> {
    let v: Vec<i64> = Vec::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Int64)).unwrap_or_default();
    v.into_iter().map(|x| x as u64).collect()
}

impl BinaryConfusions {
    pub fn new(num_classes: usize, multilabel: bool) -> Self {
        let z = vec![0u64; num_classes];
        BinaryConfusions { tp: z.clone(), fp: z.clone(), fn_: z.clone(), tn: z, multilabel }
    }

    /// Multi-label update: pred and target [M, C] booleans (or 0/1).
    pub fn update_multilabel(&mut self, pred: &Tensor, target: &Tensor) {
        let p = pred.to_kind(Kind::Bool);
        let t = target.to_kind(Kind::Bool).to_device(p.device());
        let sum = |m: Tensor| to_u64(&m.sum_dim_intlist([0i64].as_slice(), false, Kind::Int64));
        let (np, nt) = (p.logical_not(), t.logical_not());
        for (acc, v) in [
            (&mut self.tp, sum(p.logical_and(&t))),
            (&mut self.fp, sum(p.logical_and(&nt))),
            (&mut self.fn_, sum(np.logical_and(&t))),
            (&mut self.tn, sum(np.logical_and(&nt))),
        ] {
            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
    }

    /// Single-label update: class ids pred and target [M]; targets < 0 are skipped.
    pub fn update_single(&mut self, pred: &Tensor, target: &Tensor) {
        let c = self.tp.len() as i64;
        let valid = target.ge(0);
        let t = target.masked_select(&valid).to_kind(Kind::Int64);
        let p = pred.to_device(t.device()).masked_select(&valid.to_device(pred.device())).to_kind(Kind::Int64);
        let p = p.to_device(t.device());
        self.update_from_matrix(&ConfusionMatrix::from_pairs(&p, &t, c));
    }

    fn update_from_matrix(&mut self, m: &ConfusionMatrix) {
        let k = m.num_classes;
        let total: u64 = m.counts.iter().sum();
        for c in 0..k {
            let tp = m.get(c, c);
            let row: u64 = (0..k).map(|j| m.get(c, j)).sum();
            let col: u64 = (0..k).map(|i| m.get(i, c)).sum();
            self.tp[c] += tp;
            self.fn_[c] += row - tp;
            self.fp[c] += col - tp;
            // row + col can exceed total (a class that is both common and often predicted):
            // add tp first so the unsigned arithmetic never goes below zero.
            self.tn[c] += total + tp - row - col;
        }
    }

    pub fn metrics(&self) -> PatchSegMetrics {
        let k = self.tp.len();
        let mut m = PatchSegMetrics::default();
        let (mut correct, mut all) = (0u64, 0u64);
        for c in 0..k {
            let (tp, fp, fneg, tn) = (self.tp[c] as f64, self.fp[c] as f64, self.fn_[c] as f64, self.tn[c] as f64);
            if self.multilabel {
                correct += self.tp[c] + self.tn[c];
                all += self.tp[c] + self.tn[c] + self.fp[c] + self.fn_[c];
            } else {
                correct += self.tp[c];
            }
            if tp + fneg == 0.0 {
                continue;
            }
            m.classes_present += 1;
            let recall = tp / (tp + fneg);
            let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
            m.macro_recall += recall;
            m.macro_precision += precision;
            m.macro_f1 += 2.0 * precision * recall / (precision + recall + 1e-6);
            m.macro_accuracy += (tp + tn) / (tp + fp + fneg + tn);
        }
        if !self.multilabel {
            // Every patch counts once in tp+fn of its true class.
            all = self.tp.iter().zip(&self.fn_).map(|(a, b)| a + b).sum();
        }
        let n = m.classes_present as f64;
        if n > 0.0 {
            m.macro_recall /= n;
            m.macro_precision /= n;
            m.macro_f1 /= n;
            m.macro_accuracy /= n;
        } else {
            m.macro_recall = f64::NAN;
            m.macro_precision = f64::NAN;
            m.macro_f1 = f64::NAN;
            m.macro_accuracy = f64::NAN;
        }
        m.micro_accuracy = if all > 0 { correct as f64 / all as f64 } else { f64::NAN };
        m
    }
}

/// A K×K confusion matrix (rows = ground truth, columns = prediction), accumulated on any device.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    /// Row-major counts.
    pub counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        ConfusionMatrix { num_classes, counts: vec![0; num_classes * num_classes] }
    }

    fn from_pairs(pred: &Tensor, target: &Tensor, k: i64) -> Self {
        let flat = (target * k + pred).bincount::<Tensor>(None, k * k);
        ConfusionMatrix { num_classes: k as usize, counts: to_u64(&flat.narrow(0, 0, k * k)) }
    }

    pub fn get(&self, truth: usize, pred: usize) -> u64 {
        self.counts[truth * self.num_classes + pred]
    }

    /// Adds predictions vs labels of any shape; labels equal to `ignore` or outside 0..K are skipped.
    /// Predictions outside 0..K count as wrong for the true class only.
    pub fn update(&mut self, pred: &Tensor, target: &Tensor, ignore: Option<i64>) {
        let k = self.num_classes as i64;
        let t = target.to_kind(Kind::Int64).reshape([-1]);
        let p = pred.to_device(t.device()).to_kind(Kind::Int64).reshape([-1]);
        let mut valid = t.ge(0).logical_and(&t.lt(k));
        if let Some(ig) = ignore {
            valid = valid.logical_and(&t.ne(ig));
        }
        let (t, p) = (t.masked_select(&valid), p.masked_select(&valid));
        let p_ok = p.ge(0).logical_and(&p.lt(k));
        // An out-of-range prediction goes to a spare column that is dropped after counting.
        let p = p.where_self(&p_ok, &p.full_like(k));
        let flat = (t * (k + 1) + p).bincount::<Tensor>(None, k * (k + 1)).narrow(0, 0, k * (k + 1));
        let v = to_u64(&flat);
        for r in 0..self.num_classes {
            for c in 0..self.num_classes {
                self.counts[r * self.num_classes + c] += v[r * (self.num_classes + 1) + c];
            }
        }
    }

    /// IoU per class; NaN where the class is neither in ground truth nor predicted (U = 0).
    pub fn iou(&self) -> Vec<f64> {
        let k = self.num_classes;
        (0..k)
            .map(|c| {
                let i = self.get(c, c);
                let row: u64 = (0..k).map(|j| self.get(c, j)).sum();
                let col: u64 = (0..k).map(|j| self.get(j, c)).sum();
                let u = row + col - i;
                if u == 0 { f64::NAN } else { i as f64 / u as f64 }
            })
            .collect()
    }

    /// Mean IoU over classes with U > 0 (NaN-mean, as mmseg).
    pub fn miou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
    }

    /// Σ I_c / #valid pixels ("aAcc").
    pub fn pixel_accuracy(&self) -> f64 {
        let total: u64 = self.counts.iter().sum();
        let diag: u64 = (0..self.num_classes).map(|c| self.get(c, c)).sum();
        if total == 0 { f64::NAN } else { diag as f64 / total as f64 }
    }

    /// Patch-seg majority-mode metrics from this matrix.
    pub fn patch_metrics(&self) -> PatchSegMetrics {
        let mut b = BinaryConfusions::new(self.num_classes, false);
        b.update_from_matrix(self);
        b.metrics()
    }
}

/// timm `CosineLRScheduler(t_initial=total, lr_min, warmup_t, warmup_lr_init=0)` per update:
/// linear warmup from 0, then cosine over the absolute step (timm's default `warmup_prefix=False`).
pub fn cosine_warmup_lr(step: i64, total: i64, warmup: i64, lr: f64, lr_min: f64) -> f64 {
    if step < warmup {
        lr * step as f64 / warmup as f64
    } else {
        lr_min + 0.5 * (lr - lr_min) * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos())
    }
}

fn check_tokens_masks(tokens: &Tensor, masks: &Tensor, what: &str) -> Result<(i64, i64, i64, i64)> {
    let ts = tokens.size();
    let ms = masks.size();
    if ts.len() != 3 || ms.len() != 3 || ts[0] != ms[0] || ts[0] == 0 {
        return Err(PivotError::invalid(format!(
            "{what}: expected tokens [N, h*w, D] and masks [N, H, W] with the same non-zero N, got {ts:?} and {ms:?}"
        )));
    }
    Ok((ts[0], ts[1], ts[2], ms[1] * ms[2]))
}

/// Every mask id must be a class (0..C) or the ignore index: the patch-seg counts would drop any
/// other id silently and the dense cross-entropy would index past its classes (a device assert on
/// CUDA). The error names the first offending sample and id.
fn check_mask_ids(masks: &Tensor, num_classes: i64, ignore: i64, what: &str) -> Result<()> {
    let m = masks.to_kind(Kind::Int64);
    let bad = m.lt(0).logical_or(&m.ge(num_classes)).logical_and(&m.ne(ignore));
    let per_sample = bad.reshape([m.size()[0], -1]).any_dim(1, false);
    let samples = per_sample.nonzero();
    if samples.size()[0] == 0 {
        return Ok(());
    }
    let i = samples.int64_value(&[0, 0]);
    let id = m.get(i).masked_select(&bad.get(i)).int64_value(&[0]);
    Err(PivotError::invalid(format!(
        "{what}: sample {i} has mask id {id}, which is neither one of the {num_classes} classes (0..={}) nor the ignore index {ignore}",
        num_classes - 1
    )))
}

/// Optimiser settings of a segmentation probe: finite, lr > 0, 0 <= min_lr <= lr, weight decay >= 0.
fn check_probe_hyper(what: &str, num_classes: i64, lr: f64, min_lr: f64, weight_decay: f64, batch_size: i64, epochs: usize) -> Result<()> {
    let bad = |field: &str, msg: String| Err(PivotError::config(what, field, msg));
    if num_classes < 1 {
        return bad("num_classes", format!("{num_classes}: must be at least 1"));
    }
    if !(lr.is_finite() && lr > 0.0) {
        return bad("lr", format!("{lr} is not a positive finite learning rate"));
    }
    if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
        return bad("min_lr", format!("{min_lr} is outside [0, lr = {lr}]"));
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return bad("weight_decay", format!("{weight_decay} is not a finite value >= 0"));
    }
    if batch_size < 1 {
        return bad("batch_size", format!("{batch_size}: must be at least 1"));
    }
    if epochs == 0 {
        return bad("epochs", "must be at least 1".into());
    }
    Ok(())
}

fn grid_of(tokens: i64, masks: &Tensor, what: &str) -> Result<(i64, i64, i64)> {
    let ms = masks.size();
    let (hh, ww) = (ms[1], ms[2]);
    // Grid with the mask's aspect ratio: h/w = H/W and h·w = tokens.
    for h in 1..=tokens {
        if tokens % h == 0 {
            let w = tokens / h;
            if hh * w == ww * h && hh % h == 0 {
                return Ok((h, w, hh / h));
            }
        }
    }
    Err(PivotError::invalid(format!("{what}: {tokens} patch tokens do not tile a {hh}×{ww} mask")))
}

fn build_head(vs: &nn::Path, head: SegHead, d: i64, c: i64) -> nn::Sequential {
    match head {
        SegHead::Linear => nn::seq().add(nn::linear(vs / "fc", d, c, Default::default())),
        SegHead::Mlp { hidden } => nn::seq()
            .add(nn::linear(vs / "fc1", d, hidden, Default::default()))
            .add_fn(|x| x.gelu("none"))
            .add(nn::linear(vs / "fc2", hidden, c, Default::default())),
    }
}

/// Result of [`PatchSegProbe`].
#[derive(Debug, Clone)]
pub struct PatchSegReport {
    pub labels: PatchLabels,
    pub head: SegHead,
    /// Val metrics after each epoch.
    pub epochs: Vec<PatchSegMetrics>,
    pub train_loss: Vec<f64>,
    /// Epoch (0-based) with the best macro recall, as patch-seg reports.
    pub best_epoch: usize,
    pub best: PatchSegMetrics,
    pub num_classes: i64,
    pub n_train: i64,
    pub n_val: i64,
    pub fit_seconds: f64,
}

/// patch-seg probe (iancovert/patch-seg `scripts/train.py`, linear/mlp heads): AdamW (lr 1e-3,
/// wd 0.01), batch 32 with drop_last, 5 epochs, per-step cosine to 1e-4 after 500 warmup steps,
/// seed 0. Runs in fp32 (patch-seg uses bf16 autocast).
#[derive(Debug, Clone)]
pub struct PatchSegProbe {
    pub labels: PatchLabels,
    pub head: SegHead,
    pub num_classes: i64,
    /// Class id treated as "unlabeled" by the union rule (COCO-Stuff/ADE20K: 0).
    pub unlabeled: Option<i64>,
    /// Mask value of pixels without a label (not counted); any other id must be a class.
    pub ignore_index: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub batch_size: i64,
    pub epochs: usize,
    pub warmup_steps: i64,
    pub seed: u64,
    /// Where to train; default: the tokens' device.
    pub device: Option<Device>,
}

impl PatchSegProbe {
    pub fn new(num_classes: i64) -> Self {
        PatchSegProbe {
            labels: PatchLabels::Union,
            head: SegHead::Mlp { hidden: 1024 },
            num_classes,
            unlabeled: Some(0),
            ignore_index: 255,
            lr: 1e-3,
            min_lr: 1e-4,
            weight_decay: 0.01,
            batch_size: 32,
            epochs: 5,
            warmup_steps: 500,
            seed: 0,
            device: None,
        }
    }

    fn targets(&self, masks: &Tensor, patch: i64) -> Result<Tensor> {
        let counts = patch_class_counts(masks, patch, self.num_classes)?;
        Ok(match self.labels {
            PatchLabels::Union => union_targets(&counts, self.unlabeled),
            PatchLabels::Majority => majority_targets(&counts),
        })
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let c = self.num_classes;
        match self.labels {
            PatchLabels::Union => logits.reshape([-1, c]).binary_cross_entropy_with_logits::<Tensor>(
                &targets.reshape([-1, c]),
                None,
                None,
                Reduction::Mean,
            ),
            PatchLabels::Majority => logits.reshape([-1, c]).cross_entropy_loss::<Tensor>(
                &targets.reshape([-1]),
                None,
                Reduction::Mean,
                -100,
                0.0,
            ),
        }
    }

    /// Trains on (train_tokens, train_masks), evaluates on val after every epoch.
    pub fn fit_tokens(
        &self,
        train_tokens: &Tensor,
        train_masks: &Tensor,
        val_tokens: &Tensor,
        val_masks: &Tensor,
    ) -> Result<PatchSegReport> {
        let start = Instant::now();
        let (n, t, d, _) = check_tokens_masks(train_tokens, train_masks, "PatchSegProbe train")?;
        let (nv, tv, dv, _) = check_tokens_masks(val_tokens, val_masks, "PatchSegProbe val")?;
        check_probe_hyper("PatchSegProbe", self.num_classes, self.lr, self.min_lr, self.weight_decay, self.batch_size, self.epochs)?;
        check_mask_ids(train_masks, self.num_classes, self.ignore_index, "PatchSegProbe train")?;
        check_mask_ids(val_masks, self.num_classes, self.ignore_index, "PatchSegProbe val")?;
        if tv != t || dv != d {
            return Err(PivotError::invalid(format!("PatchSegProbe: train tokens [{n},{t},{d}] vs val [{nv},{tv},{dv}]")));
        }
        let (_, _, patch) = grid_of(t, train_masks, "PatchSegProbe")?;
        let dev = self.device.unwrap_or(train_tokens.device());
        tch::manual_seed(self.seed as i64);
        let vs = nn::VarStore::new(dev);
        let head = build_head(&vs.root(), self.head, d, self.num_classes);
        let mut opt = nn::AdamW { wd: self.weight_decay, ..Default::default() }.build(&vs, self.lr)?;
        let bs = self.batch_size.min(n).max(1);
        let steps_per_epoch = (n / bs).max(1); // drop_last, as patch-seg's train loader
        let total = steps_per_epoch * self.epochs as i64;
        let mut step = 0;
        let mut report = PatchSegReport {
            labels: self.labels,
            head: self.head,
            epochs: vec![],
            train_loss: vec![],
            best_epoch: 0,
            best: PatchSegMetrics::default(),
            num_classes: self.num_classes,
            n_train: n,
            n_val: nv,
            fit_seconds: 0.0,
        };
        for epoch in 0..self.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            let mut loss_sum = 0.0;
            for s in 0..steps_per_epoch {
                crate::runtime::check_interrupt(&format!("patch-seg probe epoch {} of {}, batch {} of {steps_per_epoch}", epoch + 1, self.epochs, s + 1))?;
                let idx = perm.narrow(0, s * bs, bs);
                let x = train_tokens.index_select(0, &idx.to_device(train_tokens.device())).to_device(dev).to_kind(Kind::Float);
                let m = train_masks.index_select(0, &idx.to_device(train_masks.device())).to_device(dev);
                let y = self.targets(&m, patch)?;
                opt.set_lr(cosine_warmup_lr(step, total, self.warmup_steps, self.lr, self.min_lr));
                let loss = self.loss(&head.forward(&x), &y);
                opt.backward_step(&loss);
                loss_sum += loss.double_value(&[]);
                step += 1;
            }
            report.train_loss.push(loss_sum / steps_per_epoch as f64);
            let m = self.evaluate(&head, val_tokens, val_masks, patch, dev)?;
            if report.epochs.is_empty() || m.macro_recall > report.best.macro_recall {
                report.best = m;
                report.best_epoch = report.epochs.len();
            }
            report.epochs.push(m);
        }
        report.fit_seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    fn evaluate(&self, head: &nn::Sequential, tokens: &Tensor, masks: &Tensor, patch: i64, dev: Device) -> Result<PatchSegMetrics> {
        let n = tokens.size()[0];
        let mut conf = BinaryConfusions::new(self.num_classes as usize, self.labels == PatchLabels::Union);
        let mut i = 0;
        while i < n {
            crate::runtime::check_interrupt(&format!("patch-seg probe evaluation, image {} of {n}", i + 1))?;
            let len = self.batch_size.min(n - i);
            let x = tokens.narrow(0, i, len).to_device(dev).to_kind(Kind::Float);
            let y = self.targets(&masks.narrow(0, i, len).to_device(dev), patch)?;
            let logits = tch::no_grad(|| head.forward(&x)).reshape([-1, self.num_classes]);
            match self.labels {
                PatchLabels::Union => conf.update_multilabel(&logits.gt(0.0), &y.reshape([-1, self.num_classes])),
                PatchLabels::Majority => conf.update_single(&logits.argmax(-1, false), &y.reshape([-1])),
            }
            i += len;
        }
        Ok(conf.metrics())
    }
}

/// A trained per-patch linear layer of [`DenseSegProbe`].
#[derive(Debug)]
pub struct DenseSegHead {
    /// [C, D]
    pub weight: Tensor,
    /// [C]
    pub bias: Tensor,
    /// Token grid (h, w).
    pub grid: (i64, i64),
}

impl DenseSegHead {
    /// Logits [N, C, H, W] upsampled bilinearly (align_corners=false) to `size`.
    pub fn logits(&self, tokens: &Tensor, size: (i64, i64)) -> Tensor {
        let (h, w) = self.grid;
        let n = tokens.size()[0];
        let x = tokens.to_device(self.weight.device()).to_kind(Kind::Float);
        let l = x.matmul(&self.weight.tr()) + &self.bias; // [N, h*w, C]
        let l = l.permute([0, 2, 1]).reshape([n, -1, h, w]);
        l.upsample_bilinear2d([size.0, size.1], false, None, None)
    }

    /// Predicted class map [N, H, W] int64.
    pub fn predict(&self, tokens: &Tensor, size: (i64, i64)) -> Tensor {
        tch::no_grad(|| self.logits(tokens, size).argmax(1, false))
    }
}

/// Result of [`DenseSegProbe`].
#[derive(Debug)]
pub struct DenseSegReport {
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// NaN for classes absent from both ground truth and prediction.
    pub iou_per_class: Vec<f64>,
    pub confusion: ConfusionMatrix,
    pub train_loss: Vec<f64>,
    pub n_train: i64,
    pub n_val: i64,
    pub fit_seconds: f64,
    pub head: DenseSegHead,
}

/// Dense linear probe (DINOv2 "linear" segmentation without BN/multi-scale): per-patch linear layer
/// → bilinear upsample to the label size → per-pixel CE (ignore 255) → argmax; mIoU and aAcc
/// accumulated over the whole val set. Optimiser: AdamW + cosine with linear warmup (our choice;
/// the DINOv2 mmseg config is not part of the reference).
#[derive(Debug, Clone)]
pub struct DenseSegProbe {
    pub num_classes: i64,
    pub ignore_index: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub batch_size: i64,
    pub epochs: usize,
    pub warmup_steps: i64,
    pub seed: u64,
    pub device: Option<Device>,
}

impl DenseSegProbe {
    pub fn new(num_classes: i64) -> Self {
        DenseSegProbe {
            num_classes,
            ignore_index: 255,
            lr: 1e-3,
            min_lr: 0.0,
            weight_decay: 1e-4,
            batch_size: 8,
            epochs: 10,
            warmup_steps: 50,
            seed: 0,
            device: None,
        }
    }

    pub fn fit_tokens(
        &self,
        train_tokens: &Tensor,
        train_masks: &Tensor,
        val_tokens: &Tensor,
        val_masks: &Tensor,
    ) -> Result<DenseSegReport> {
        let start = Instant::now();
        let (n, t, d, _) = check_tokens_masks(train_tokens, train_masks, "DenseSegProbe train")?;
        let (nv, tv, _, _) = check_tokens_masks(val_tokens, val_masks, "DenseSegProbe val")?;
        check_probe_hyper("DenseSegProbe", self.num_classes, self.lr, self.min_lr, self.weight_decay, self.batch_size, self.epochs)?;
        check_mask_ids(train_masks, self.num_classes, self.ignore_index, "DenseSegProbe train")?;
        check_mask_ids(val_masks, self.num_classes, self.ignore_index, "DenseSegProbe val")?;
        if tv != t {
            return Err(PivotError::invalid(format!("DenseSegProbe: train has {t} tokens per image, val {tv}")));
        }
        let ms = train_masks.size();
        let size = (ms[1], ms[2]);
        let vsz = val_masks.size();
        let (h, w, _) = grid_of(t, train_masks, "DenseSegProbe")?;
        let dev = self.device.unwrap_or(train_tokens.device());
        tch::manual_seed(self.seed as i64);
        let vs = nn::VarStore::new(dev);
        let lin = nn::linear(vs.root() / "fc", d, self.num_classes, Default::default());
        let mut opt = nn::AdamW { wd: self.weight_decay, ..Default::default() }.build(&vs, self.lr)?;
        let bs = self.batch_size.min(n).max(1);
        let steps_per_epoch = (n / bs).max(1);
        let total = steps_per_epoch * self.epochs as i64;
        let head_of = |lin: &nn::Linear| DenseSegHead {
            weight: lin.ws.shallow_clone(),
            bias: lin.bs.as_ref().map(|b| b.shallow_clone()).unwrap_or_else(|| Tensor::zeros([self.num_classes], (Kind::Float, dev))),
            grid: (h, w),
        };
        let mut train_loss = vec![];
        let mut step = 0;
        for epoch in 0..self.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            let mut acc = 0.0;
            for s in 0..steps_per_epoch {
                crate::runtime::check_interrupt(&format!("dense seg probe epoch {} of {}, batch {} of {steps_per_epoch}", epoch + 1, self.epochs, s + 1))?;
                let idx = perm.narrow(0, s * bs, bs);
                let x = train_tokens.index_select(0, &idx.to_device(train_tokens.device()));
                let y = train_masks.index_select(0, &idx.to_device(train_masks.device())).to_device(dev).to_kind(Kind::Int64);
                opt.set_lr(cosine_warmup_lr(step, total, self.warmup_steps, self.lr, self.min_lr));
                let logits = head_of(&lin).logits(&x, size);
                let loss = logits.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, self.ignore_index, 0.0);
                opt.backward_step(&loss);
                let l = loss.double_value(&[]);
                // A batch made only of ignore pixels yields NaN; skip it in the running mean.
                if l.is_finite() {
                    acc += l;
                }
                step += 1;
            }
            train_loss.push(acc / steps_per_epoch as f64);
        }
        let head = head_of(&lin);
        let head = DenseSegHead { weight: head.weight.detach().copy(), bias: head.bias.detach().copy(), grid: head.grid };
        let mut conf = ConfusionMatrix::new(self.num_classes as usize);
        let mut i = 0;
        while i < nv {
            crate::runtime::check_interrupt(&format!("dense seg probe evaluation, image {} of {nv}", i + 1))?;
            let len = bs.min(nv - i);
            let pred = head.predict(&val_tokens.narrow(0, i, len), (vsz[1], vsz[2]));
            conf.update(&pred, &val_masks.narrow(0, i, len).to_device(dev), Some(self.ignore_index));
            i += len;
        }
        Ok(DenseSegReport {
            miou: conf.miou(),
            pixel_accuracy: conf.pixel_accuracy(),
            iou_per_class: conf.iou(),
            confusion: conf,
            train_loss,
            n_train: n,
            n_val: nv,
            fit_seconds: start.elapsed().as_secs_f64(),
            head,
        })
    }
}

/// How the segmentation probes' reports show themselves: text, HTML, and `Metrics` rows for `Runs`.
mod display {
    use super::{DenseSegReport, PatchSegReport};
    use crate::plot::Metrics;
    use crate::plot::html::{key_value_table, percent};
    use crate::runtime::{MimeBundle, Rich};
    use std::fmt;

    impl PatchSegReport {
        fn rows(&self) -> Vec<(String, String)> {
            let b = &self.best;
            vec![
                ("labels / head".into(), format!("{:?} / {:?}", self.labels, self.head)),
                ("macro recall".into(), percent(b.macro_recall)),
                ("macro precision".into(), percent(b.macro_precision)),
                ("macro F1".into(), percent(b.macro_f1)),
                ("micro accuracy".into(), percent(b.micro_accuracy)),
                ("best epoch".into(), format!("{} of {}", self.best_epoch + 1, self.epochs.len())),
                ("classes present".into(), format!("{} of {}", b.classes_present, self.num_classes)),
                ("train / val".into(), format!("{} / {}", self.n_train, self.n_val)),
                ("fit time".into(), format!("{:.2} s", self.fit_seconds)),
            ]
        }

        pub fn to_html(&self) -> String {
            key_value_table("Patch segmentation probe", &self.rows())
        }
    }

    impl fmt::Display for PatchSegReport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            for (k, v) in self.rows() {
                writeln!(f, "{k:>16}: {v}")?;
            }
            Ok(())
        }
    }

    impl Rich for PatchSegReport {
        fn mime_bundle(&self) -> MimeBundle {
            MimeBundle::text(self.to_string()).with_html(self.to_html())
        }
    }

    impl Metrics for PatchSegReport {
        fn metrics(&self) -> Vec<(String, f64)> {
            let b = &self.best;
            vec![
                ("macro_recall".into(), b.macro_recall),
                ("macro_precision".into(), b.macro_precision),
                ("macro_f1".into(), b.macro_f1),
                ("micro_accuracy".into(), b.micro_accuracy),
            ]
        }
    }

    impl DenseSegReport {
        fn rows(&self) -> Vec<(String, String)> {
            let scored = self.iou_per_class.iter().filter(|v| !v.is_nan()).count();
            vec![
                ("mIoU".into(), percent(self.miou)),
                ("pixel accuracy".into(), percent(self.pixel_accuracy)),
                ("classes scored".into(), format!("{scored} of {}", self.iou_per_class.len())),
                ("train / val".into(), format!("{} / {}", self.n_train, self.n_val)),
                ("fit time".into(), format!("{:.2} s", self.fit_seconds)),
            ]
        }

        pub fn to_html(&self) -> String {
            key_value_table("Dense linear segmentation probe", &self.rows())
        }
    }

    impl fmt::Display for DenseSegReport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            for (k, v) in self.rows() {
                writeln!(f, "{k:>16}: {v}")?;
            }
            Ok(())
        }
    }

    impl Rich for DenseSegReport {
        fn mime_bundle(&self) -> MimeBundle {
            MimeBundle::text(self.to_string()).with_html(self.to_html())
        }
    }

    impl Metrics for DenseSegReport {
        fn metrics(&self) -> Vec<(String, f64)> {
            vec![("miou".into(), self.miou), ("pixel_accuracy".into(), self.pixel_accuracy)]
        }
    }
}
