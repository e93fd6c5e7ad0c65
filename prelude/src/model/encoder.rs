//! A vision tower taken out of an MLLM, carrying where it came from. The paper's analyses all
//! compare encoders by provenance (base vs SFT vs DPO, which LM, how many steps, which seed).

use super::vision::{FeatureSelect, VisionFamily, VisionTower};
use super::weights;
use crate::error::{PivotError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Which training produced a tower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Random initialisation (a preset never trained).
    Random,
    /// Loaded from a checkpoint on disk, as it was.
    Pretrained,
    /// After stage 1 (projector alignment, then full training).
    Base,
    /// After stage-2 SFT.
    Sft,
    /// After stage-2 DPO (the PIVOT tower).
    Dpo,
    /// Anything else a researcher names.
    Custom(String),
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Random => write!(f, "random"),
            Stage::Pretrained => write!(f, "pretrained"),
            Stage::Base => write!(f, "base"),
            Stage::Sft => write!(f, "SFT"),
            Stage::Dpo => write!(f, "DPO"),
            Stage::Custom(s) => write!(f, "{s}"),
        }
    }
}

/// Where a tower (or a whole MLLM) came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub stage: Stage,
    /// Tower preset or checkpoint it started from.
    pub tower: String,
    /// Language model it was trained with (empty for a bare tower).
    pub lm: String,
    /// Optimiser steps of the last training stage.
    pub steps: usize,
    pub seed: Option<u64>,
    /// Every stage so far, oldest first, e.g. ["stage1 projector 200 steps", "DPO 300 steps"].
    pub history: Vec<String>,
}

impl Provenance {
    pub fn new(stage: Stage, tower: impl Into<String>, lm: impl Into<String>) -> Self {
        Provenance { stage, tower: tower.into(), lm: lm.into(), steps: 0, seed: None, history: Vec::new() }
    }

    /// Records a finished training stage.
    pub fn record(&mut self, stage: Stage, steps: usize, seed: u64, what: impl Into<String>) {
        self.history.push(format!("{}: {steps} steps, seed {seed}", what.into()));
        self.stage = stage;
        self.steps = steps;
        self.seed = Some(seed);
    }

    /// Short label for tables and legends: "DPO · seed 0".
    pub fn label(&self) -> String {
        match self.seed {
            Some(s) => format!("{} · seed {s}", self.stage),
            None => self.stage.to_string(),
        }
    }
}

/// How to reduce a layer's tokens to one vector per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pooling {
    /// The class token (every family but SigLIP).
    ClassToken,
    /// Mean of the patch tokens (class and register tokens excluded).
    MeanPatch,
    /// SigLIP's attention-pooling head over the post-LN last layer (towers with a head only).
    MapHead,
    /// No pooling: every token, [B, tokens, D].
    Tokens,
    /// Patch tokens only (class and register tokens dropped), [B, patches, D].
    PatchTokens,
}

/// A detached vision encoder: a tower plus its provenance and the layer its MLLM consumed.
#[derive(Clone, Debug)]
pub struct VisionEncoder {
    tower: VisionTower,
    provenance: Provenance,
    select: FeatureSelect,
}

impl VisionEncoder {
    pub fn new(tower: VisionTower, provenance: Provenance, select: FeatureSelect) -> Self {
        VisionEncoder { tower, provenance, select }
    }

    /// A pretrained tower from disk as an encoder (provenance from `provenance.json` if present).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let tower = VisionTower::from_pretrained(dir, device)?;
        let prov_path = dir.join("provenance.json");
        let (provenance, select) = if prov_path.is_file() {
            let v = weights::read_json(&prov_path)?;
            let p = serde_json::from_value(v["provenance"].clone())
                .map_err(|e| PivotError::config(prov_path.display().to_string(), "provenance", e))?;
            let s = serde_json::from_value(v["select"].clone())
                .map_err(|e| PivotError::config(prov_path.display().to_string(), "select", e))?;
            (p, s)
        } else {
            (Provenance::new(Stage::Pretrained, dir.display().to_string(), ""), FeatureSelect::pivot(tower.config()))
        };
        Ok(VisionEncoder { tower, provenance, select })
    }

    pub fn tower(&self) -> &VisionTower {
        &self.tower
    }
    pub fn into_tower(self) -> VisionTower {
        self.tower
    }
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }
    pub fn select(&self) -> FeatureSelect {
        self.select
    }
    pub fn label(&self) -> String {
        self.provenance.label()
    }

    /// Saves the tower in HF format plus `provenance.json` beside it.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.tower.save_pretrained(dir)?;
        let v = serde_json::json!({"provenance": self.provenance, "select": self.select});
        weights::write_text_atomic(&dir.join("provenance.json"), &serde_json::to_string_pretty(&v).expect("json"))
    }

    /// The tokens the MLLM consumed ([B, N, D]), without gradient.
    pub fn mllm_features(&self, pixels: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.tower.features(pixels, self.select))
    }

    /// Features of hidden-state `layer` (negative from the end) pooled as asked, in f32,
    /// without gradient. `MapHead` ignores `layer` and uses the post-LN last layer.
    pub fn features(&self, pixels: &Tensor, layer: i64, pooling: Pooling) -> Result<Tensor> {
        tch::no_grad(|| {
            let c = self.tower.config();
            if pooling == Pooling::MapHead {
                let out = self.tower.forward(pixels)?;
                return out
                    .pooler_output
                    .filter(|_| c.family == VisionFamily::Siglip)
                    .map(|t| t.to_kind(Kind::Float))
                    .ok_or_else(|| PivotError::invalid(format!("tower `{}` has no MAP head", c.name)));
            }
            let idx = self.tower.resolve_layer(layer)?;
            let x = self.tower.hidden_states(pixels, idx)?.pop().expect("non-empty").to_kind(Kind::Float);
            pool_prefixed(&x, pooling, c.has_class_token(), c.num_prefix_tokens())
        })
    }

    /// Pooled features of every hidden state (embeddings included): L+1 tensors [B, D].
    pub fn all_layer_features(&self, pixels: &Tensor, pooling: Pooling) -> Result<Vec<Tensor>> {
        tch::no_grad(|| {
            let c = self.tower.config();
            let states = self.tower.hidden_states(pixels, self.tower.num_layers())?;
            states.iter().map(|x| pool_prefixed(&x.to_kind(Kind::Float), pooling, c.has_class_token(), c.num_prefix_tokens())).collect()
        })
    }
}

/// Pools [B, tokens, D] according to `pooling`; `has_cls` says whether token 0 is a class token.
pub fn pool(x: &Tensor, pooling: Pooling, has_cls: bool) -> Result<Tensor> {
    pool_prefixed(x, pooling, has_cls, has_cls as i64)
}

/// [`pool`] for towers with `prefix` tokens before the patches (class token, then DINOv2's
/// registers): patch poolings leave all of them out.
pub fn pool_prefixed(x: &Tensor, pooling: Pooling, has_cls: bool, prefix: i64) -> Result<Tensor> {
    let n = x.size()[1];
    let patches = x.narrow(1, prefix, n - prefix);
    Ok(match pooling {
        Pooling::ClassToken if has_cls => x.select(1, 0),
        Pooling::ClassToken => return Err(PivotError::invalid("this tower has no class token; use MeanPatch or MapHead")),
        Pooling::MeanPatch => patches.mean_dim(1, false, Kind::Float),
        Pooling::Tokens => x.shallow_clone(),
        Pooling::PatchTokens => patches,
        Pooling::MapHead => return Err(PivotError::invalid("MapHead pooling needs the tower (use VisionEncoder::features)")),
    })
}
