//! Sigmoid DPO (TRL's default, PIVOT's stage 2) with the vision tower trainable.
//!
//! Chosen and rejected run as one batch `[chosen_0..B; rejected_0..B]`. By default each image is
//! encoded once and both sequences read the same image tokens (`image_of = [0..B, 0..B]`), which
//! halves the tower's cost; the tower's gradient is the same sum PIVOT gets from its two copies.
//! `double_encoding` reproduces PIVOT's `images + images` literally.
//!
//! Image-counterfactual pairs (PIVOT's `image_rejected`) score the rejected answer with their
//! own rejected image: a batch then holds the B chosen-side images followed by the rejected
//! images of the pairs that have one, and the rejected sequences of those pairs read them.
//!
//! Under `TrainConfig::bad_images = Skip` the cached reference pass drops a pair whose image
//! fails to decode (its reference log-probs stay NaN) and the training loop leaves the same
//! pair out of every policy micro-batch, recording it in `TrainLog::skipped` where it is met;
//! the loss is over the pairs kept, and a micro-batch with none left is skipped.

use super::checkpoint;
use super::engine::{self, Hooks, Micro, Objective, TrainConfig};
use super::log::TrainLog;
use super::prefetch::prefetch;
use super::profile;
use super::trainer::{Recipe, Trainer};
use crate::data::{collate_on_use, ImageSample, PreferenceDataset, PreferenceSample, SkipPolicy, Skipped};
use crate::error::{PivotError, Result};
use crate::model::{Batch, Batcher, Checkpoint, Encoded, Mllm, MllmOutput, Stage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Stage-2 DPO (PIVOT: β 0.1, lr 1e-6 for every part, 3 epochs, 256 pairs per step) against a
/// frozen copy of the model (or cached reference log-probs).
pub type DpoTrainer = Trainer<DpoConfig>;

/// `pivot-train` reads it from TOML (`[dpo]`, its optimisation settings under `[dpo.train]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// Inverse temperature of the implicit reward (PIVOT / TRL: 0.1).
    pub beta: f64,
    /// cDPO label smoothing ε: loss = −(1−ε)·logσ(βz) − ε·logσ(−βz). 0 in PIVOT.
    pub label_smoothing: f64,
    /// Weight of an added token-mean CE on the chosen answer (PIVOT's `gamma`, RPO): 0 in PIVOT.
    pub sft_weight: f64,
    /// Encode every image twice (once per sequence), as PIVOT does.
    pub double_encoding: bool,
    /// Compute reference log-probs once for the whole data set before training, instead of a
    /// reference forward every step. No reference copy of the model is kept then.
    pub cached_reference: bool,
    pub train: TrainConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            double_encoding: false,
            cached_reference: false,
            train: TrainConfig { lr: 1e-6, ..TrainConfig::default() },
        }
    }
}

impl std::ops::Deref for DpoConfig {
    type Target = TrainConfig;
    fn deref(&self) -> &TrainConfig {
        &self.train
    }
}
impl std::ops::DerefMut for DpoConfig {
    fn deref_mut(&mut self) -> &mut TrainConfig {
        &mut self.train
    }
}

/// The DPO loss and its implicit rewards for one batch.
pub struct DpoTerms {
    /// Mean loss (scalar, with graph).
    pub loss: Tensor,
    /// Per-pair losses [B].
    pub losses: Tensor,
    /// β(logπ(y_w) − logπ_ref(y_w)), detached [B].
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// TRL's sigmoid DPO loss on summed sequence log-probs [B] (fp32):
/// z = (π_w − π_l) − (ref_w − ref_l), loss = mean(−(1−ε)·logσ(βz) − ε·logσ(−βz)).
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
    label_smoothing: f64,
) -> DpoTerms {
    let pc = policy_chosen.to_kind(Kind::Float);
    let pr = policy_rejected.to_kind(Kind::Float);
    let rc = ref_chosen.to_kind(Kind::Float).detach();
    let rr = ref_rejected.to_kind(Kind::Float).detach();
    let z = (&pc - &pr) - (&rc - &rr);
    let bz = &z * beta;
    let losses = -bz.log_sigmoid() * (1.0 - label_smoothing) - (-&bz).log_sigmoid() * label_smoothing;
    DpoTerms {
        loss: losses.mean(Kind::Float),
        chosen_rewards: ((&pc - &rc) * beta).detach(),
        rejected_rewards: ((&pr - &rr) * beta).detach(),
        losses,
    }
}

impl DpoTerms {
    /// `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins` (TRL names,
    /// batch means).
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let m = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        let margins = &self.chosen_rewards - &self.rejected_rewards;
        vec![
            ("rewards/chosen".into(), m(&self.chosen_rewards)),
            ("rewards/rejected".into(), m(&self.rejected_rewards)),
            ("rewards/accuracies".into(), m(&margins.gt(0.0).to_kind(Kind::Float))),
            ("rewards/margins".into(), m(&margins)),
        ]
    }
}

enum Reference {
    None,
    /// A frozen deep copy of the policy at the start of training.
    Model(Box<Mllm>),
    /// [N, 2] (chosen, rejected) reference log-probs per data-set row.
    Cached(Tensor),
}

struct DpoObjective {
    beta: f64,
    label_smoothing: f64,
    sft_weight: f64,
    double_encoding: bool,
    cached: bool,
    /// `TrainConfig::prefetch`, for the cached reference's pass over the data.
    prefetch: usize,
    /// `TrainConfig::bad_images`, for the cached reference's pass over the data.
    bad_images: SkipPolicy,
    /// Pairs the cached reference pass could not score (their image failed under `Skip`).
    dropped: HashMap<usize, Skipped>,
    reference: Reference,
    /// Per data-set row: whether the pair has an `image_rejected` (set in `prepare`).
    has_rejected_image: Vec<bool>,
}

/// Which image row each of the 2B sequences `[chosen; rejected]` reads, for a batch laid out as
/// `collate` lays it out: the B images of the pairs, then the rejected images of the pairs that
/// have one, in pair order.
pub(crate) fn pair_image_of(has_rejected_image: &[bool]) -> Vec<usize> {
    let b = has_rejected_image.len();
    let mut next = b;
    let rejected = has_rejected_image.iter().enumerate().map(|(i, &own)| {
        if own {
            next += 1;
            next - 1
        } else {
            i
        }
    });
    (0..b).chain(rejected.collect::<Vec<_>>()).collect()
}

/// Summed log-probs [2B] of `[chosen; rejected]` with each image encoded once.
fn shared_logps(mllm: &Mllm, pixels: &Tensor, seqs: &[Encoded], image_of: &[usize]) -> Result<(MllmOutput, Tensor)> {
    let out = mllm.forward(pixels, seqs, image_of)?;
    let logps = mllm.sequence_logps(&out)?;
    Ok((out, logps))
}

/// Reference log-probs [N, 2] of a whole data set, computed without gradient.
pub fn reference_logps(mllm: &Mllm, data: &[PreferenceSample], batch_size: usize) -> Result<Tensor> {
    cached_logps(mllm, data, batch_size, TrainConfig::default().prefetch, SkipPolicy::Error).map(|(logps, _)| logps)
}

/// [`reference_logps`] with `ahead` batches prepared ahead, as the training loop does. Under
/// [`SkipPolicy::Skip`] a pair whose image fails to decode is left out of its batch (a batch
/// with no pair left is not run): its row stays NaN and is returned with why.
fn cached_logps(mllm: &Mllm, data: &[PreferenceSample], batch_size: usize, ahead: usize, policy: SkipPolicy) -> Result<(Tensor, HashMap<usize, Skipped>)> {
    let (n, size) = (data.len(), batch_size.max(1));
    let batcher = mllm.batcher();
    let chunks = (0..n).step_by(size).map(|i| (i..(i + size).min(n)).collect::<Vec<_>>());
    let batches = chunks.map(|rows| {
        let pairs: Vec<&PreferenceSample> = rows.iter().map(|&r| &data[r]).collect();
        let c = collate_on_use(&pairs, policy, |pairs| DpoObjective::collate(&batcher, pairs));
        let kept: Vec<usize> = c.kept.iter().map(|&i| rows[i]).collect();
        // One entry per pair left out, found by the file it names (in the order they failed).
        let mut gone: Vec<usize> = rows.iter().copied().filter(|r| !kept.contains(r)).collect();
        let dropped: Vec<(usize, Skipped)> = c
            .skipped
            .into_iter()
            .filter_map(|why| {
                let at = gone.iter().position(|&r| data[r].reads_file(&why.path))?;
                Some((gone.remove(at), why))
            })
            .collect();
        (kept, dropped, c.batch)
    });
    let (scored, dropped) = prefetch(ahead, batches, |batches| {
        tch::no_grad(|| {
            let (mut scored, mut dropped) = (Vec::new(), HashMap::new());
            for (kept, gone, batch) in batches {
                dropped.extend(gone);
                if kept.is_empty() && policy == SkipPolicy::Skip {
                    continue;
                }
                let batch = batch?.to_device(mllm.device())?;
                let own: Vec<bool> = kept.iter().map(|&r| data[r].image_rejected.is_some()).collect();
                let (_, logps) = shared_logps(mllm, &batch.pixels, &batch.seqs, &pair_image_of(&own))?;
                scored.push((kept, logps.view([2, -1]).transpose(0, 1)));
            }
            Ok::<_, PivotError>((scored, dropped))
        })
    })?;
    if dropped.is_empty() {
        return Ok((Tensor::cat(&scored.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), 0), dropped));
    }
    let kind = scored.first().map_or(Kind::Float, |(_, t)| t.kind());
    let all = Tensor::full([n as i64, 2], f64::NAN, (kind, mllm.device()));
    for (kept, logps) in scored {
        let idx: Vec<i64> = kept.iter().map(|&r| r as i64).collect();
        let _ = all.shallow_clone().index_copy_(0, &Tensor::from_slice(&idx).to_device(all.device()), &logps);
    }
    Ok((all, dropped))
}

/// The pairs a cached reference from a checkpoint could not score (NaN rows), for a resumed run.
fn unscored_rows(logps: &Tensor, data: &[PreferenceSample]) -> Result<HashMap<usize, Skipped>> {
    let unscored = logps.isnan().any_dim(1, false).to_device(tch::Device::Cpu);
    let unscored = Vec::<bool>::try_from(&unscored)?;
    Ok(unscored
        .iter()
        .enumerate()
        .filter(|&(_, &nan)| nan)
        .map(|(r, _)| {
            let path = data.get(r).and_then(|s| s.image().path()).map(|p| p.to_path_buf()).unwrap_or_default();
            let message = "its image failed to decode in the cached reference pass (before the checkpoint)".to_string();
            (r, Skipped { path, line: None, field: "image".into(), message })
        })
        .collect())
}

impl Objective<PreferenceSample> for DpoObjective {
    fn name(&self) -> &str {
        "dpo"
    }

    fn prepare(&mut self, mllm: &Mllm, data: &[PreferenceSample], resumed: Option<&Checkpoint>) -> Result<()> {
        self.has_rejected_image = data.iter().map(|s| s.image_rejected.is_some()).collect();
        // On resume the reference must be the model as it was at step 0, which only the checkpoint has.
        self.reference = match (self.cached, resumed) {
            (true, Some(ck)) => {
                let logps = ck.tensor("ref_logps")?.to_device(mllm.device());
                self.dropped = unscored_rows(&logps, data)?;
                Reference::Cached(logps)
            }
            (true, None) => {
                let (logps, dropped) = cached_logps(mllm, data, 16, self.prefetch, self.bad_images)?;
                for (r, why) in &dropped {
                    eprintln!("DPO reference pass: pair {r} dropped: {why}");
                }
                self.dropped = dropped;
                Reference::Cached(logps)
            }
            (false, resumed) => {
                let mut r = mllm.deep_clone()?;
                r.set_trainable(false, false, false);
                if let Some(ck) = resumed {
                    checkpoint::load_model(&r, ck, "ref.")?;
                }
                Reference::Model(Box::new(r))
            }
        };
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        match &self.reference {
            Reference::None => Vec::new(),
            Reference::Model(r) => checkpoint::model_tensors(r, "ref."),
            Reference::Cached(t) => vec![("ref_logps".into(), t.shallow_clone())],
        }
    }

    fn dropped_rows(&self) -> HashMap<usize, Skipped> {
        self.dropped.clone()
    }

    /// `[chosen_0..B; rejected_0..B]` with the B images once, then the pairs' own rejected
    /// images (see [`pair_image_of`]).
    fn collate(b: &Batcher, pairs: &[&PreferenceSample]) -> Result<Batch> {
        let chosen_side = pairs.iter().map(|s| s.image.load());
        let rejected_side = pairs.iter().filter_map(|s| s.image_rejected.as_ref()).map(|image| image.load());
        let images = chosen_side.chain(rejected_side).collect::<Result<Vec<_>>>()?;
        let mut seqs = Vec::with_capacity(2 * pairs.len());
        for s in pairs {
            seqs.push(b.encode_chat(&s.question, Some(&s.chosen))?);
        }
        for s in pairs {
            seqs.push(b.encode_chat(&s.question, Some(&s.rejected))?);
        }
        b.batch(&images, seqs)
    }

    fn micro_step(&mut self, mllm: &Mllm, rows: &[usize], batch: Batch) -> Result<Micro> {
        let b = rows.len() as i64;
        let Batch { pixels, seqs } = batch;
        let own: Vec<bool> = rows.iter().map(|&r| self.has_rejected_image.get(r).copied().unwrap_or(false)).collect();
        let image_of = pair_image_of(&own);
        let (out, logps) = if self.double_encoding {
            // Every sequence its own copy of its image: chosen ones the first copy, rejected
            // ones the second.
            let n_images = pixels.size()[0] as usize;
            let doubled: Vec<usize> = image_of.iter().enumerate().map(|(k, &i)| if k < rows.len() { i } else { n_images + i }).collect();
            let out = mllm.forward(&Tensor::cat(&[&pixels, &pixels], 0), &seqs, &doubled)?;
            let logps = mllm.sequence_logps(&out)?;
            (out, logps)
        } else {
            shared_logps(mllm, &pixels, &seqs, &image_of)?
        };
        profile::mark("policy forward", mllm.device());
        let (pc, pr) = (logps.narrow(0, 0, b), logps.narrow(0, b, b));
        let (rc, rr) = match &self.reference {
            Reference::Model(r) => {
                let l = tch::no_grad(|| shared_logps(r, &pixels, &seqs, &image_of).map(|(_, l)| l))?;
                (l.narrow(0, 0, b), l.narrow(0, b, b))
            }
            Reference::Cached(t) => {
                let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                let refs = t.index_select(0, &Tensor::from_slice(&idx).to_device(t.device()));
                (refs.select(1, 0), refs.select(1, 1))
            }
            Reference::None => return Err(PivotError::invalid("DPO reference was not prepared")),
        };
        profile::mark("reference", mllm.device());
        let terms = dpo_loss(&pc, &pr, &rc, &rr, self.beta, self.label_smoothing);
        let mut metrics = terms.metrics();
        let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
        metrics.push(("logps/chosen".into(), mean(&pc)));
        metrics.push(("logps/rejected".into(), mean(&pr)));
        let mut loss = terms.loss;
        if self.sft_weight != 0.0 {
            let chosen = MllmOutput {
                hidden: out.hidden.narrow(0, 0, b),
                labels: out.labels.narrow(0, 0, b),
                attention_mask: out.attention_mask.narrow(0, 0, b),
                image_tokens: out.image_tokens.shallow_clone(),
            };
            let nll = mllm.answer_loss(&chosen)?;
            metrics.push(("nll_loss".into(), nll.double_value(&[])));
            loss = loss + nll * self.sft_weight;
        }
        let tokens = out.attention_mask.sum(Kind::Int64).int64_value(&[]) as usize;
        profile::mark("loss + metrics", mllm.device());
        Ok(Micro { loss, metrics, samples: rows.len(), tokens })
    }
}

impl Recipe for DpoConfig {
    type Data = PreferenceDataset;
    fn train_config_mut(&mut self) -> &mut TrainConfig {
        &mut self.train
    }
    fn fit(&self, mllm: &mut Mllm, data: &PreferenceDataset, hooks: &mut Hooks) -> Result<TrainLog> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(PivotError::config("DpoConfig", "beta", format!("{} must be positive", self.beta)));
        }
        if !(0.0..=0.5).contains(&self.label_smoothing) {
            return Err(PivotError::config("DpoConfig", "label_smoothing", format!("{} is outside [0, 0.5]", self.label_smoothing)));
        }
        let mut obj = DpoObjective {
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            sft_weight: self.sft_weight,
            double_encoding: self.double_encoding,
            cached: self.cached_reference,
            prefetch: self.train.prefetch,
            bad_images: self.train.bad_images,
            dropped: HashMap::new(),
            reference: Reference::None,
            has_rejected_image: Vec::new(),
        };
        let log = engine::run("DPO", mllm, &data.samples, &self.train, &mut obj, hooks)?;
        let what = format!("DPO beta {} lr {:e}", self.beta, self.train.lr);
        mllm.provenance.record(Stage::Dpo, log.len(), self.train.seed, what);
        Ok(log)
    }
}
