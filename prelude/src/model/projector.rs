//! The LLaVA `mlp2x_gelu` projector: Linear(d_vis→d_llm) → exact GELU → Linear(d_llm→d_llm),
//! stored as `nn.Sequential` indices 0 and 2 (`model.mm_projector.{0,2}.*` in MLLM checkpoints).

use super::layers::{Activation, Linear};
use super::weights::Checkpoint;
use crate::error::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub vision_hidden_size: i64,
    pub lm_hidden_size: i64,
}

pub struct Projector {
    vs: nn::VarStore,
    cfg: ProjectorConfig,
    l0: Linear,
    l2: Linear,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Projector mlp2x_gelu {} → {} → {}", self.cfg.vision_hidden_size, self.cfg.lm_hidden_size, self.cfg.lm_hidden_size)
    }
}

impl Projector {
    /// A freshly initialised `mlp2x_gelu` projector.
    pub fn mlp2x_gelu(vision_hidden_size: i64, lm_hidden_size: i64, device: Device) -> Self {
        Self::new(ProjectorConfig { vision_hidden_size, lm_hidden_size }, device)
    }

    pub fn new(cfg: ProjectorConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l0 = Linear::new(&root / "0", cfg.vision_hidden_size, cfg.lm_hidden_size, true);
        let l2 = Linear::new(&root / "2", cfg.lm_hidden_size, cfg.lm_hidden_size, true);
        Projector { vs, cfg, l0, l2 }
    }

    /// Loads `prefix + {0,2}.{weight,bias}` (e.g. prefix `model.mm_projector.`).
    pub fn load(ckpt: &Checkpoint, cfg: ProjectorConfig, prefix: &str, device: Device) -> Result<Self> {
        let p = Self::new(cfg, device);
        ckpt.load_into(&p.vs, prefix)?;
        Ok(p)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&Activation::Gelu.forward(&self.l0.forward(x)))
    }

    pub fn config(&self) -> &ProjectorConfig {
        &self.cfg
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn kind(&self) -> Kind {
        self.l0.weight.kind()
    }
    pub fn to_kind(mut self, kind: Kind) -> Self {
        self.vs.set_kind(kind);
        self
    }
    pub fn set_trainable(&mut self, trainable: bool) {
        if trainable { self.vs.unfreeze() } else { self.vs.freeze() }
    }

    pub fn deep_clone(&self) -> Result<Self> {
        let mut copy = Self::new(self.cfg.clone(), self.vs.device());
        copy.vs.set_kind(self.kind());
        copy.vs.copy(&self.vs)?;
        super::copy_trainable_flags(&self.vs, &copy.vs);
        Ok(copy)
    }
}

impl Clone for Projector {
    fn clone(&self) -> Self {
        self.deep_clone().expect("copying a projector into a fresh store of the same shape cannot fail")
    }
}
