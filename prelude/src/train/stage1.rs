//! Stage 1, the LLaVA recipe that makes the common starting point of SFT and DPO: projector-only
//! alignment on captions (`plain` template), then full training on instruction data. The same
//! two steps, with the tower frozen, finish a transplant (`Stage1::transplant()`).

use super::engine::{self, Hooks, TrainConfig};
use super::log::{StepMetrics, TrainLog};
use super::sft::LmObjective;
use crate::data::{CaptionDataset, VqaDataset};
use crate::error::Result;
use crate::model::{LanguageModel, Mllm, MllmConfig, Stage, VisionEncoder};
use crate::plot::{Figure, curves};
use crate::runtime::{MimeBundle, Rich};
use serde::{Deserialize, Serialize};

/// Settings of the two steps. Defaults: projector-only at lr 1e-3 (stage1-proj), then tower +
/// projector + LM at lr 1e-5 with the tower at 2e-6 (stage1-full), one epoch each.
/// `pivot-train` reads it from TOML (`[stage1.projector]`, `[stage1.full]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage1 {
    pub projector: TrainConfig,
    pub full: TrainConfig,
}

impl Default for Stage1 {
    fn default() -> Self {
        Stage1 {
            projector: TrainConfig { lr: 1e-3, ..TrainConfig::default() }.trainable(false, true, false),
            full: TrainConfig { lr: 1e-5, tower_lr: Some(2e-6), ..TrainConfig::default() }.trainable(true, true, true),
        }
    }
}

/// The logs of both steps.
#[derive(Clone, Debug, Default)]
pub struct Stage1Log {
    pub projector: TrainLog,
    pub full: TrainLog,
}

impl Stage1 {
    /// PIVOT's transplant recipe (pivot-proj, pivot-full): the same steps with the tower frozen.
    pub fn transplant() -> Self {
        let mut s = Stage1::default();
        s.full = s.full.trainable(false, true, true);
        s.full.tower_lr = None;
        s
    }

    /// Sets the seed of both steps.
    pub fn seed(mut self, seed: u64) -> Self {
        self.projector.seed = seed;
        self.full.seed = seed;
        self
    }

    /// Projector alignment on `captions`, then full training on `vqa`; records `Stage::Base` (with
    /// the tower frozen, as after `transplant`, the model keeps its stage).
    pub fn run(&self, mllm: &mut Mllm, captions: &CaptionDataset, vqa: &VqaDataset) -> Result<Stage1Log> {
        self.run_both(mllm, captions, vqa, &mut Hooks::default())
    }

    /// Only the alignment step (captions, `plain` template).
    pub fn run_projector(&self, mllm: &mut Mllm, captions: &CaptionDataset) -> Result<TrainLog> {
        let mut obj = LmObjective { name: "stage1-projector" };
        engine::run("stage1 projector", mllm, &captions.samples, &self.projector, &mut obj, &mut Hooks::default())
    }

    /// Only the full-training step (ChatML VQA).
    pub fn run_full(&self, mllm: &mut Mllm, vqa: &VqaDataset) -> Result<TrainLog> {
        let mut obj = LmObjective { name: "stage1-full" };
        engine::run("stage1 full", mllm, &vqa.samples, &self.full, &mut obj, &mut Hooks::default())
    }

    /// Like [`Stage1::run`], reporting every step of both parts to `f`.
    pub fn run_with(
        &self,
        mllm: &mut Mllm,
        captions: &CaptionDataset,
        vqa: &VqaDataset,
        f: impl FnMut(&StepMetrics) + 'static,
    ) -> Result<Stage1Log> {
        let mut hooks = Hooks::default();
        hooks.on_step.push(Box::new(f));
        self.run_both(mllm, captions, vqa, &mut hooks)
    }

    fn run_both(&self, mllm: &mut Mllm, captions: &CaptionDataset, vqa: &VqaDataset, hooks: &mut Hooks) -> Result<Stage1Log> {
        let mut obj = LmObjective { name: "stage1-projector" };
        let projector = engine::run("stage1 projector", mllm, &captions.samples, &self.projector, &mut obj, hooks)?;
        let mut obj = LmObjective { name: "stage1-full" };
        let full = engine::run("stage1 full", mllm, &vqa.samples, &self.full, &mut obj, hooks)?;
        self.record(mllm, &projector, &full);
        Ok(Stage1Log { projector, full })
    }

    /// Records the finished run: `Stage::Base` for stage 1 proper (tower trained). The transplant
    /// recipe (tower frozen in the full step) keeps the stage `transplant` gave the model, so a
    /// transplanted DPO tower is not relabelled "base".
    fn record(&self, mllm: &mut Mllm, projector: &TrainLog, full: &TrainLog) {
        let steps = projector.len() + full.len();
        let (stage, what) = if self.full.train_tower {
            (Stage::Base, "stage1")
        } else {
            (mllm.provenance.stage.clone(), "transplant stage1, tower frozen")
        };
        mllm.provenance.record(stage, steps, self.full.seed, format!("{what} ({} + {} steps)", projector.len(), full.len()));
    }
}

impl Stage1Log {
    pub fn plot(&self) -> Result<Figure> {
        let mut full = self.full.series("loss");
        let offset = self.projector.len() as f64;
        full.points.iter_mut().for_each(|p| p.0 += offset);
        curves("stage 1 loss", "step", "loss", &[self.projector.series("loss"), full])
    }
}

impl Rich for Stage1Log {
    fn mime_bundle(&self) -> MimeBundle {
        let text = format!("{}\n{}", self.projector.to_text(3), self.full.to_text(3));
        let mut html = format!("{}{}", self.projector.to_html(3), self.full.to_html(3));
        let mut b = MimeBundle::text(text);
        if let Ok(fig) = self.plot() {
            html.push_str(&fig.to_html());
            b = b.with_png(&fig.png);
        }
        b.with_html(html)
    }
}

/// The PIVOT recipe's first half: a fresh MLLM around a trained tower, the tower frozen, a new
/// projector, features read from the layer the encoder's MLLM read. Follow with
/// `Stage1::transplant().run(..)`.
pub fn transplant(encoder: VisionEncoder, lm: LanguageModel, config: MllmConfig) -> Mllm {
    let select = encoder.select();
    let source = encoder.provenance().clone();
    // Every choice of tokens the donor MLLM read (layer, norm, class/register tokens, resampled
    // count): the fresh projector must see the same features.
    let config = config.with_select(select);
    let mut mllm = Mllm::new(encoder.into_tower().frozen(), lm, config);
    mllm.provenance.history = source.history.clone();
    mllm.provenance.history.push(format!("transplanted tower ({}) into {}", source.label(), mllm.provenance.lm));
    mllm.provenance.stage = Stage::Custom(format!("transplant of {}", source.label()));
    mllm.provenance.seed = source.seed;
    mllm
}
