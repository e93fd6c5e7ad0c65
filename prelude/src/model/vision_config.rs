//! What a vision tower is: its family and its shape ([`VisionConfig`]), below every family's
//! file. `clip`, `dinov2`, `vit` and `timm` build their bodies from it; `vision` (the tower that
//! dispatches over the families) adds the constructors that need a family's parser
//! (`VisionConfig::preset`, `from_json`, `to_hf_json`), so the families never import `vision`.

use super::layers::Activation;
use super::preprocess::ImageProcessor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisionFamily {
    Clip,
    Siglip,
    /// HF `Dinov2Model` / `Dinov2WithRegistersModel`.
    Dinov2,
    /// HF `ViTModel`.
    Vit,
    /// HF `ViTMAEModel`, run as at inference (no masking).
    VitMae,
    /// timm `VisionTransformer` (stored with timm's names and config.json).
    Timm,
}

impl std::fmt::Display for VisionFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VisionFamily::Clip => "CLIP",
            VisionFamily::Siglip => "SigLIP",
            VisionFamily::Dinov2 => "DINOv2",
            VisionFamily::Vit => "ViT",
            VisionFamily::VitMae => "ViT-MAE",
            VisionFamily::Timm => "timm ViT",
        };
        write!(f, "{s}")
    }
}

fn yes() -> bool {
    true
}

/// Shape and flavour of a tower; parsed from `config.json` or built from a preset. Fields after
/// `projection_dim` concern the DINOv2 / ViT / timm families (and default for configs saved
/// before they existed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Preset name or checkpoint path the config came from (provenance, not semantics).
    pub name: String,
    pub family: VisionFamily,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// The native input size: the position embeddings cover (image_size / patch_size)² patches.
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// SigLIP attention-pooling head (`head.*`); always false for CLIP.
    pub use_head: bool,
    /// CLIP's `projection_dim` (kept only so that a saved config round-trips).
    pub projection_dim: Option<i64>,
    /// DINOv2 with registers: tokens inserted after the class token.
    #[serde(default)]
    pub num_register_tokens: i64,
    /// DINOv2's layer scale (its init value, `layerscale_value`).
    #[serde(default)]
    pub layerscale_value: Option<f64>,
    /// DINOv2-giant's SwiGLU MLP (`intermediate_size` is then its hidden width).
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// DINOv2 and timm give the MLP width as a ratio; kept so that the config writes back.
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// ViT's pooler (`pooler.dense`, tanh over the class token).
    #[serde(default)]
    pub use_pooler: bool,
    /// DINOv2's `mask_token` (stored so that the weights round-trip; inference never masks).
    #[serde(default)]
    pub use_mask_token: bool,
    /// ViT-MAE's pre-training mask ratio, for the saved config; towers never mask.
    #[serde(default)]
    pub mask_ratio: Option<f64>,
    /// timm's own config (architecture, model_args, pretrained_cfg) for timm-layout towers.
    #[serde(default)]
    pub timm: Option<TimmConfig>,
    /// Preprocessing read with the checkpoint; None: the family's default.
    #[serde(default)]
    pub processor: Option<ImageProcessor>,
}

/// What a timm `config.json` says beyond the shapes (written back unchanged on save).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimmConfig {
    pub architecture: String,
    /// Classifier outputs (`head.*`); 0 for a feature extractor.
    pub num_classes: i64,
    pub model_args: Value,
    pub pretrained_cfg: Value,
}

impl VisionConfig {
    /// A config of `family` with the new fields at their neutral values (shapes to be set).
    pub(crate) fn base(name: &str, family: VisionFamily) -> Self {
        VisionConfig {
            name: name.into(),
            family,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: Activation::Gelu,
            use_head: false,
            projection_dim: None,
            num_register_tokens: 0,
            layerscale_value: None,
            use_swiglu_ffn: false,
            mlp_ratio: None,
            qkv_bias: true,
            use_pooler: false,
            use_mask_token: false,
            mask_ratio: None,
            timm: None,
            processor: None,
        }
    }

    /// A SigLIP-style tower that trains on a CPU in minutes: 64×64 images, 8×8 patches.
    pub fn tiny() -> Self {
        VisionConfig {
            hidden_size: 96,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            image_size: 64,
            patch_size: 8,
            hidden_act: Activation::GeluTanh,
            ..Self::base("tiny", VisionFamily::Siglip)
        }
    }

    /// The side of the images the tower is fed (its processor's output).
    pub fn input_size(&self) -> i64 {
        self.processor.as_ref().map_or(self.image_size, |p| p.size as i64)
    }
    /// Patches per side of a processed image.
    pub fn grid(&self) -> i64 {
        self.input_size() / self.patch_size
    }
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    /// Patches covered by the stored position embeddings (the native grid, squared).
    pub fn num_positions(&self) -> i64 {
        let g = self.image_size / self.patch_size;
        g * g
    }
    pub fn has_class_token(&self) -> bool {
        self.family != VisionFamily::Siglip
    }
    /// Tokens in front of the patches: the class token and DINOv2's registers.
    pub fn num_prefix_tokens(&self) -> i64 {
        self.has_class_token() as i64 + self.num_register_tokens
    }
    /// Tokens per processed image in the hidden states (prefix tokens and patches).
    pub fn num_tokens(&self) -> i64 {
        self.num_patches() + self.num_prefix_tokens()
    }
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
    /// Whether inputs must be exactly `image_size` (CLIP, SigLIP and timm's fixed-size ViT do;
    /// DINOv2 and the HF ViTs interpolate their position embeddings).
    pub fn fixed_input_size(&self) -> bool {
        matches!(self.family, VisionFamily::Clip | VisionFamily::Siglip | VisionFamily::Timm)
    }
    /// The preprocessing the checkpoint came with, else the family's default.
    pub fn image_processor(&self) -> ImageProcessor {
        if let Some(p) = &self.processor {
            return p.clone();
        }
        match self.family {
            VisionFamily::Clip => ImageProcessor::clip(self.image_size),
            VisionFamily::Siglip => ImageProcessor::siglip(self.image_size),
            // HF BitImageProcessor's defaults (shortest edge 256, crop 224) at the native size.
            VisionFamily::Dinov2 => ImageProcessor::imagenet(self.image_size, self.image_size * 8 / 7),
            VisionFamily::Vit | VisionFamily::VitMae | VisionFamily::Timm => {
                ImageProcessor { mean: [0.5; 3], std: [0.5; 3], ..ImageProcessor::siglip(self.image_size) }
            }
        }
    }
}
