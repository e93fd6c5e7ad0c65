//! The models of the study, one file each (candle-transformers style): a config that
//! deserialises HF `config.json` or comes from a named preset, a constructor from a checkpoint,
//! and a `forward`.

pub mod batch;
pub mod bert;
pub mod clip;
pub mod dinov2;
pub mod encoder;
pub mod layers;
pub mod mllm;
pub mod preprocess;
pub mod projector;
pub mod qwen2;
pub mod recompute;
pub mod timm;
pub mod tokenizer;
pub mod vision;
pub mod vision_config;
pub mod vit;
pub mod weights;

pub use batch::{Batch, Batcher, Encoded, IGNORE_INDEX, IMAGE_TOKEN_INDEX};
pub use encoder::{Pooling, Provenance, Stage, VisionEncoder};
pub use layers::Activation;
pub use mllm::{Mllm, MllmConfig, MllmOutput};
pub use preprocess::{ImageProcessor, ResizeMode, Resample};
pub use projector::{Projector, ProjectorConfig};
pub use qwen2::{KvCache, LanguageModel, LmOutput, Qwen2Config};
pub use tokenizer::Tokenizer;
pub use vision::{FeatureSelect, VisionOutput, VisionTower};
pub use vision_config::{TimmConfig, VisionConfig, VisionFamily};
pub use weights::Checkpoint;

use tch::nn::VarStore;

/// Gives `dst` the same requires-grad flags as `src` (a deep copy keeps what was frozen).
pub(crate) fn copy_trainable_flags(src: &VarStore, dst: &VarStore) {
    let dst_vars = dst.variables();
    for (name, t) in src.variables() {
        if let Some(d) = dst_vars.get(&name) {
            let _ = d.shallow_clone().set_requires_grad(t.requires_grad());
        }
    }
}
