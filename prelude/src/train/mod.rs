//! Training: stage 1 and the stage-2 comparison (SFT vs DPO with the vision tower trainable).
//!
//! One loop ([`engine`]) serves every trainer: AdamW with a parameter group per module (tower,
//! projector, LM) and per-module learning rates, cosine schedule with warmup, gradient
//! accumulation, global norm clipping, seeded deterministic shuffling, a `TrainLog` of TRL-named
//! metrics, a live view, cooperative interruption, a non-finite guard and atomic checkpoints.
//!
//! ```no_run
//! use pivot::prelude::*;
//! # fn main() -> pivot::Result<()> {
//! let world = ShapesWorld::new(ShapesConfig::default());
//! let mut base = Mllm::tiny(Device::Cpu);
//! Stage1::default().run(&mut base, &world.captions(Split::Train, 512), &world.vqa(Split::Train, 512))?;
//! let mut dpo = base.clone();
//! let cfg = DpoConfig { train: TrainConfig::default().lr(1e-5).epochs(3), ..Default::default() };
//! let log = DpoTrainer::new(cfg).run(&mut dpo, &world.preferences(Split::Train, 512))?;
//! # Ok(()) }
//! ```
//!
//! Interruption (`check_interrupt` before every micro-batch) and a NaN/Inf loss or gradient end
//! `run` with `PivotError::Interrupted` / `PivotError::NonFinite`. The model then holds the
//! weights of the last completed step (a bad or cut-short step is never applied) and
//! `trainer.last_log()` the steps so far.
//!
//! Data parallel: under `torchrun` (or any launcher that sets its variables) call
//! [`dist::init_from_env`] once; every trainer then trains its rank's shard (see [`dist`]);
//! `TrainConfig::zero_stage = 1` shards the optimizer state over the ranks (ZeRO-1). What a
//! model pair needs per rank: [`memory::estimate`].

pub mod checkpoint;
pub mod dist;
mod dpo;
mod engine;
mod eval;
#[doc(hidden)]
pub mod fault;
pub mod launch;
mod log;
pub mod memory;
mod optim;
mod prefetch;
mod pretrain;
mod profile;
mod sft;
mod stage1;
mod trainer;

pub use checkpoint::{TrainerState, latest_checkpoint, verify as verify_checkpoint};
pub use dpo::{DpoConfig, DpoTerms, DpoTrainer, dpo_loss, reference_logps};
#[doc(hidden)]
pub use engine::Hooks;
pub use engine::TrainConfig;
pub use eval::{VqaEval, VqaReport, normalize_answer};
pub use log::{StepMetrics, TrainLog};
pub use optim::{ParamGroup, cosine_schedule};
pub use pretrain::{ONE_HOT_GROUPS, PATCH_CLASSES, PretrainedTower, TowerPretrain, patch_targets, pretrain_tag_names, pretrain_tags};
pub use profile::take_step_profile;
pub use sft::SftConfig;
pub use stage1::{Stage1, Stage1Log, transplant};
pub use trainer::{Recipe, SftTrainer, Trainer};
