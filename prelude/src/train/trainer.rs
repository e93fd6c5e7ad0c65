//! The one trainer shell behind `SftTrainer` and `DpoTrainer`: settings, step callbacks,
//! `run`/`resume` and the last log. What differs between them (data, objective, provenance)
//! lives in the settings type, a [`Recipe`].

use super::engine::{Hooks, TrainConfig};
use super::log::{StepMetrics, TrainLog};
use crate::error::Result;
use crate::model::Mllm;
use std::path::PathBuf;

/// Settings that know how to train: SFT's [`TrainConfig`] and [`DpoConfig`](super::DpoConfig).
pub trait Recipe {
    /// The data set a run takes.
    type Data;
    /// The optimisation settings inside (resume sets `resume_from` there).
    fn train_config_mut(&mut self) -> &mut TrainConfig;
    /// Trains `mllm` in place and records the stage in its provenance.
    #[doc(hidden)]
    fn fit(&self, mllm: &mut Mllm, data: &Self::Data, hooks: &mut Hooks) -> Result<TrainLog>;
}

/// Trains an MLLM with the recipe `R`; see [`SftTrainer`] and [`DpoTrainer`](super::DpoTrainer).
pub struct Trainer<R: Recipe> {
    pub config: R,
    hooks: Hooks,
}

/// Stage-2 SFT on (question, answer). PIVOT: lr 5e-6 for every part, 3 epochs, global batch 256.
pub type SftTrainer = Trainer<TrainConfig>;

impl<R: Recipe> Trainer<R> {
    pub fn new(config: R) -> Self {
        Trainer { config, hooks: Hooks::default() }
    }

    /// Calls `f` after every optimizer step (live plots, custom logging, early stopping via the
    /// interrupt flag).
    pub fn on_step(mut self, f: impl FnMut(&StepMetrics) + 'static) -> Self {
        self.hooks.on_step.push(Box::new(f));
        self
    }

    /// Trains `mllm` in place and records the stage in its provenance. On error (interrupt,
    /// non-finite loss) the model keeps its last good weights and `last_log` holds the steps
    /// done so far.
    pub fn run(&mut self, mllm: &mut Mllm, data: &R::Data) -> Result<TrainLog> {
        self.config.fit(mllm, data, &mut self.hooks)
    }

    /// Continues the run saved in `checkpoint` (a `step-*` directory, or the directory holding them).
    pub fn resume(&mut self, mllm: &mut Mllm, data: &R::Data, checkpoint: impl Into<PathBuf>) -> Result<TrainLog> {
        self.config.train_config_mut().resume_from = Some(checkpoint.into());
        let r = self.run(mllm, data);
        self.config.train_config_mut().resume_from = None;
        r
    }

    /// The log of the last run, complete or cut short.
    pub fn last_log(&self) -> Option<&TrainLog> {
        self.hooks.last_log.as_ref()
    }
}
