//! Supervised fine-tuning: token-mean cross-entropy on answer tokens only (HF causal-LM loss on
//! the labels `Mllm::encode_chat` sets). Stage 1 reuses the objective with captions.

use super::engine::{self, Hooks, Micro, Objective, TrainConfig};
use super::log::TrainLog;
use super::profile;
use super::trainer::Recipe;
use crate::data::{CaptionSample, ImageSource, VqaDataset, VqaSample};
use crate::error::Result;
use crate::model::{Batch, Batcher, Encoded, Mllm, Stage};
use tch::Kind;

/// A sample that is an image and one labelled sequence.
pub(crate) trait LmSample: Sync {
    fn image(&self) -> &ImageSource;
    fn encode(&self, b: &Batcher) -> Result<Encoded>;
}

/// SFT and stage-1 full training: ChatML (question, answer).
impl LmSample for VqaSample {
    fn image(&self) -> &ImageSource {
        &self.image
    }
    fn encode(&self, b: &Batcher) -> Result<Encoded> {
        b.encode_chat(&self.question, Some(&self.answer))
    }
}

/// Stage-1 projector alignment: the `plain` caption template.
impl LmSample for CaptionSample {
    fn image(&self) -> &ImageSource {
        &self.image
    }
    fn encode(&self, b: &Batcher) -> Result<Encoded> {
        b.encode_caption(&self.caption)
    }
}

/// Next-token CE over labelled tokens.
pub(crate) struct LmObjective {
    pub name: &'static str,
}

impl<S: LmSample> Objective<S> for LmObjective {
    fn name(&self) -> &str {
        self.name
    }
    fn collate(b: &Batcher, samples: &[&S]) -> Result<Batch> {
        let mut images = Vec::with_capacity(samples.len());
        let mut seqs = Vec::with_capacity(samples.len());
        for s in samples {
            seqs.push(s.encode(b)?);
            images.push(s.image().load()?);
        }
        b.batch(&images, seqs)
    }
    fn micro_step(&mut self, mllm: &Mllm, _rows: &[usize], batch: Batch) -> Result<Micro> {
        let image_of: Vec<usize> = (0..batch.seqs.len()).collect();
        let out = mllm.forward(&batch.pixels, &batch.seqs, &image_of)?;
        let loss = mllm.answer_loss(&out)?;
        profile::mark("forward + loss", mllm.device());
        let tokens = out.attention_mask.sum(Kind::Int64).int64_value(&[]) as usize;
        Ok(Micro { loss, metrics: Vec::new(), samples: batch.seqs.len(), tokens })
    }
}

/// SFT uses the shared settings as they are.
pub type SftConfig = TrainConfig;

impl Recipe for TrainConfig {
    type Data = VqaDataset;
    fn train_config_mut(&mut self) -> &mut TrainConfig {
        self
    }
    fn fit(&self, mllm: &mut Mllm, data: &VqaDataset, hooks: &mut Hooks) -> Result<TrainLog> {
        let mut obj = LmObjective { name: "sft" };
        let log = engine::run("SFT", mllm, &data.samples, self, &mut obj, hooks)?;
        mllm.provenance.record(Stage::Sft, log.len(), self.seed, format!("SFT lr {:e}", self.lr));
        Ok(log)
    }
}
