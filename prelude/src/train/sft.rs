//! Supervised fine-tuning: token-mean cross-entropy on answer tokens only (HF causal-LM loss on
//! the labels `Mllm::encode_chat` sets). Stage 1 reuses the objective with captions.

use super::profile;
use super::engine::{self, Hooks, Micro, Objective, TrainConfig};
use super::log::{StepMetrics, TrainLog};
use crate::data::{CaptionSample, ImageSource, VqaDataset, VqaSample};
use crate::error::Result;
use crate::model::{Encoded, Mllm, Stage};
use tch::Kind;

/// Next-token CE over labelled tokens, for any sample that is an image and one labelled sequence.
pub(crate) struct LmObjective<S> {
    pub name: &'static str,
    pub encode: fn(&Mllm, &S) -> Result<(ImageSource, Encoded)>,
}

pub(crate) fn chat_sample(mllm: &Mllm, s: &VqaSample) -> Result<(ImageSource, Encoded)> {
    Ok((s.image.clone(), mllm.encode_chat(&s.question, Some(&s.answer))?))
}

pub(crate) fn caption_sample(mllm: &Mllm, s: &CaptionSample) -> Result<(ImageSource, Encoded)> {
    Ok((s.image.clone(), mllm.encode_caption(&s.caption)?))
}

impl<S> Objective<S> for LmObjective<S> {
    fn name(&self) -> &str {
        self.name
    }
    fn micro_step(&mut self, mllm: &Mllm, batch: &[(usize, &S)]) -> Result<Micro> {
        let mut images = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        for (_, s) in batch {
            let (img, enc) = (self.encode)(mllm, s)?;
            images.push(img.load()?);
            seqs.push(enc);
        }
        let pixels = mllm.preprocess(&images)?;
        profile::mark("data", mllm.device());
        let image_of: Vec<usize> = (0..seqs.len()).collect();
        let out = mllm.forward(&pixels, &seqs, &image_of)?;
        let loss = mllm.answer_loss(&out)?;
        profile::mark("forward + loss", mllm.device());
        let tokens = out.attention_mask.sum(Kind::Int64).int64_value(&[]) as usize;
        Ok(Micro { loss, metrics: Vec::new(), samples: batch.len(), tokens })
    }
}

/// Stage-2 SFT on (question, answer). PIVOT: lr 5e-6 for every part, 3 epochs, global batch 256.
pub struct SftTrainer {
    pub config: TrainConfig,
    hooks: Hooks,
}

/// SFT uses the shared settings as they are.
pub type SftConfig = TrainConfig;

impl SftTrainer {
    pub fn new(config: TrainConfig) -> Self {
        SftTrainer { config, hooks: Hooks::default() }
    }

    /// Calls `f` after every optimizer step (live plots, custom logging, early stopping via the
    /// interrupt flag).
    pub fn on_step(mut self, f: impl FnMut(&StepMetrics) + 'static) -> Self {
        self.hooks.on_step.push(Box::new(f));
        self
    }

    /// Trains `mllm` in place and records `Stage::Sft` in its provenance. On error (interrupt,
    /// non-finite loss) the model keeps its last good weights and [`SftTrainer::last_log`] holds
    /// the steps done so far.
    pub fn run(&mut self, mllm: &mut Mllm, data: &VqaDataset) -> Result<TrainLog> {
        let mut obj = LmObjective { name: "sft", encode: chat_sample };
        let log = engine::run("SFT", mllm, &data.samples, &self.config, &mut obj, &mut self.hooks)?;
        mllm.provenance.record(Stage::Sft, log.len(), self.config.seed, format!("SFT lr {:e}", self.config.lr));
        Ok(log)
    }

    /// Continues the run saved in `checkpoint` (a `step-*` directory, or the directory holding them).
    pub fn resume(&mut self, mllm: &mut Mllm, data: &VqaDataset, checkpoint: impl Into<std::path::PathBuf>) -> Result<TrainLog> {
        self.config.resume_from = Some(checkpoint.into());
        let r = self.run(mllm, data);
        self.config.resume_from = None;
        r
    }

    /// The log of the last run, complete or cut short.
    pub fn last_log(&self) -> Option<&TrainLog> {
        self.hooks.last_log.as_ref()
    }
}
