//! Vision towers, one family per file, behind one type: [`VisionTower`].
//!
//! - CLIP ViT and SigLIP / SigLIP2 ([`super::clip`]), as HF `CLIPVisionModel` / `SiglipVisionModel`;
//! - DINOv2, with registers or not, SwiGLU for the giant ([`super::dinov2`]), as HF `Dinov2Model`;
//! - ViT and the MAE encoder ([`super::vit`]), as HF `ViTModel` / `ViTMAEModel`;
//! - timm's ViT layout ([`super::timm`]): PIVOT's MAE-H/14, supervised ViT-H/14 and MoCo v3 ViT-B/16.
//!
//! [`VisionTower::from_pretrained`] tells the family from `config.json` (`model_type`, or timm's
//! `architecture`), reads the preprocessing beside it, and saves back in the same layout.
//!
//! The families' files depend on [`super::vision_config`] (the config and family types) and never on
//! this one; the constructors of [`VisionConfig`] that dispatch to a family's parser or preset
//! (`preset`, `from_json`, `to_hf_json`) live here, above the families.
//!
//! An MLLM does not consume the pooled output but the tokens of one layer ([`FeatureSelect`]),
//! chosen per family as PIVOT's encoder wrappers do: SigLIP's layer L−1 without `post_layernorm`,
//! all tokens; CLIP's layer −2 without the class token (LLaVA-1.5); DINOv2's and the ViTs'
//! normed last layer without the class (and register) tokens, DINOv2's optionally resampled
//! bilinearly to a fixed token count.

use super::clip::ClipSiglip;
use super::dinov2::{self, Dinov2};
use super::layers::{Activation, ConfigReader};
use super::preprocess::ImageProcessor;
use super::timm;
pub use super::vision_config::{VisionConfig, VisionFamily};
use super::vit::{self, Vit};
use super::weights::{self, Checkpoint};
use crate::error::{PivotError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

impl VisionConfig {
    /// A DINOv2-style tower of the same size as [`VisionConfig::tiny`] (registers, SwiGLU, layer
    /// scale), for the embedded world: 64-px inputs, position embeddings for 56 px (interpolated).
    pub fn tiny_dinov2() -> Self {
        VisionConfig {
            hidden_size: 96,
            intermediate_size: dinov2::swiglu_hidden(96, 4.0),
            num_hidden_layers: 4,
            num_attention_heads: 4,
            image_size: 56,
            patch_size: 8,
            num_register_tokens: 2,
            layerscale_value: Some(1.0),
            use_swiglu_ffn: true,
            mlp_ratio: Some(4.0),
            use_mask_token: true,
            processor: Some(ImageProcessor::imagenet(64, 64)),
            ..Self::base("tiny-dinov2", VisionFamily::Dinov2)
        }
    }

    /// Named presets with the shapes of the published checkpoints (weights random until loaded).
    /// PIVOT's other encoders: `dinov2-giant` (DINOv2-g/14, HF layout), `mae-vit-huge-patch14`
    /// (MAE-H/14, timm `vit_huge_patch14_224.mae`), `vit-huge-patch14-in21k` (supervised ViT-H/14,
    /// timm `vit_huge_patch14_224.orig_in21k`), `moco-vit-base-patch16` (MoCo v3 ViT-B/16, timm
    /// layout after `tools/convert_moco_v3.py`), and the HF `vit-base-patch16-224` / `vit-mae-huge`.
    pub fn preset(name: &str) -> Result<Self> {
        let siglip = |name: &str, hidden, inter, layers, heads, image, patch| VisionConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            image_size: image,
            patch_size: patch,
            hidden_act: Activation::GeluTanh,
            use_head: true,
            ..Self::base(name, VisionFamily::Siglip)
        };
        let timm_vit = |name: &str, arch: &str, dim, depth, heads, patch, processor: serde_json::Value| -> Result<Self> {
            let json = serde_json::json!({
                "architecture": arch,
                "num_classes": 0,
                "model_args": {"img_size": 224, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads},
                "pretrained_cfg": processor,
            });
            Ok(VisionConfig { name: name.into(), ..timm::config_from_json(&json, name)? })
        };
        let imagenet = serde_json::json!({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]});
        Ok(match name {
            "tiny" => Self::tiny(),
            "tiny-dinov2" => Self::tiny_dinov2(),
            "clip-vit-large-patch14-336" => VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                image_size: 336,
                patch_size: 14,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::QuickGelu,
                projection_dim: Some(768),
                ..Self::base(name, VisionFamily::Clip)
            },
            "siglip-so400m-patch14-384" => siglip(name, 1152, 4304, 27, 16, 384, 14),
            "siglip2-so400m-patch16-384" => siglip(name, 1152, 4304, 27, 16, 384, 16),
            "siglip2-base-patch16-224" => siglip(name, 768, 3072, 12, 12, 224, 16),
            "dinov2-giant" => VisionConfig {
                hidden_size: 1536,
                intermediate_size: dinov2::swiglu_hidden(1536, 4.0),
                num_hidden_layers: 40,
                num_attention_heads: 24,
                image_size: 518,
                patch_size: 14,
                layerscale_value: Some(1.0),
                use_swiglu_ffn: true,
                mlp_ratio: Some(4.0),
                use_mask_token: true,
                processor: Some(ImageProcessor::imagenet(224, 256)),
                ..Self::base(name, VisionFamily::Dinov2)
            },
            "mae-vit-huge-patch14" => {
                let mut p = imagenet.clone();
                p["crop_pct"] = 0.9.into();
                timm_vit(name, "vit_huge_patch14_224", 1280, 32, 16, 14, p)?
            }
            "vit-huge-patch14-in21k" => timm_vit(
                name,
                "vit_huge_patch14_224",
                1280,
                32,
                16,
                14,
                serde_json::json!({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9}),
            )?,
            "moco-vit-base-patch16" => {
                let mut p = imagenet.clone();
                p["crop_pct"] = (224.0 / 256.0).into();
                p["interpolation"] = "bilinear".into();
                timm_vit(name, "vit_base_patch16_224", 768, 12, 12, 16, p)?
            }
            "vit-base-patch16-224" => VisionConfig {
                layer_norm_eps: 1e-12,
                use_pooler: true,
                processor: Some(ImageProcessor { mean: [0.5; 3], std: [0.5; 3], ..ImageProcessor::siglip(224) }),
                ..Self::base(name, VisionFamily::Vit)
            },
            "vit-mae-huge" => VisionConfig {
                hidden_size: 1280,
                intermediate_size: 5120,
                num_hidden_layers: 32,
                num_attention_heads: 16,
                patch_size: 14,
                layer_norm_eps: 1e-12,
                mask_ratio: Some(0.75),
                processor: Some(ImageProcessor { mean: super::preprocess::IMAGENET_MEAN, std: super::preprocess::IMAGENET_STD, ..ImageProcessor::siglip(224) }),
                ..Self::base(name, VisionFamily::VitMae)
            },
            other => {
                return Err(PivotError::config(
                    "VisionConfig::preset",
                    "name",
                    format!(
                        "unknown preset `{other}`; known: tiny, tiny-dinov2, clip-vit-large-patch14-336, siglip-so400m-patch14-384, \
                         siglip2-so400m-patch16-384, siglip2-base-patch16-224, dinov2-giant, mae-vit-huge-patch14, \
                         vit-huge-patch14-in21k, moco-vit-base-patch16, vit-base-patch16-224, vit-mae-huge"
                    ),
                ));
            }
        })
    }

    /// The tower an MLLM's `mm_vision_tower` names, as PIVOT's builder reads it, with the tokens
    /// its wrapper feeds the projector: a preset name or hub id (`google/siglip2-so400m-patch16-384`),
    /// DINOv2 with PIVOT's suffixes (`facebook/dinov2-giant-res378-interp576`: 378-px inputs, patch
    /// tokens resampled to 576), and PIVOT's `mae-vit-h-14`, `supervised-vit-h-14-in21k`, `moco-vit-b-16`.
    pub fn from_pivot_name(name: &str) -> Result<(Self, FeatureSelect)> {
        let short = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
        let alias = match short.as_str() {
            "mae-vit-h-14" => "mae-vit-huge-patch14",
            "supervised-vit-h-14-in21k" => "vit-huge-patch14-in21k",
            "moco-vit-b-16" => "moco-vit-base-patch16",
            other => other,
        };
        if let Some(rest) = alias.strip_prefix("dinov2-giant") {
            let mut cfg = Self::preset("dinov2-giant")?;
            let mut select = FeatureSelect::pivot(&cfg);
            for part in rest.split('-').filter(|p| !p.is_empty()) {
                let bad = || PivotError::config(name, "mm_vision_tower", format!("cannot read `{part}` (expected res<N> or interp<N>)"));
                if let Some(n) = part.strip_prefix("res") {
                    let n: i64 = n.parse().map_err(|_| bad())?;
                    // PIVOT resizes the shortest edge to the resolution and crops the same.
                    cfg.processor = Some(ImageProcessor::imagenet(n, n));
                } else if let Some(n) = part.strip_prefix("interp") {
                    select = select.resampled(n.parse().map_err(|_| bad())?);
                } else {
                    return Err(bad());
                }
            }
            cfg.name = name.to_string();
            return Ok((cfg, select));
        }
        let cfg = Self::preset(alias)?;
        let select = FeatureSelect::pivot(&cfg);
        Ok((cfg, select))
    }

    /// Parses a HF config: a vision config (`clip_vision_model`, `siglip_vision_model`, `dinov2`,
    /// `dinov2_with_registers`, `vit`, `vit_mae`), a full CLIP/SigLIP config whose `vision_config`
    /// is used, or timm's hub config (`architecture`, `model_args`, `pretrained_cfg`).
    pub fn from_json(value: &serde_json::Value, source: &str) -> Result<Self> {
        let top = ConfigReader::new(source, value);
        let model_type = top.string("model_type", Some(""))?;
        if model_type.is_empty() && value.get("architecture").is_some() {
            return timm::config_from_json(value, source);
        }
        let (v, family) = match model_type.as_str() {
            "dinov2" => return dinov2::config_from_json(value, source, false),
            "dinov2_with_registers" => return dinov2::config_from_json(value, source, true),
            "vit" => return vit::config_from_json(value, source, VisionFamily::Vit),
            "vit_mae" => return vit::config_from_json(value, source, VisionFamily::VitMae),
            "clip_vision_model" => (value, VisionFamily::Clip),
            "siglip_vision_model" => (value, VisionFamily::Siglip),
            "clip" | "siglip" => {
                let vc = value
                    .get("vision_config")
                    .ok_or_else(|| PivotError::config(source, "vision_config", "required for a full CLIP/SigLIP config"))?;
                (vc, if model_type == "clip" { VisionFamily::Clip } else { VisionFamily::Siglip })
            }
            "siglip2" | "siglip2_vision_model" => {
                return Err(PivotError::config(
                    source,
                    "model_type",
                    "NaFlex SigLIP2 (`siglip2`) is not supported; use a fixed-resolution SigLIP2 checkpoint (model_type `siglip`)",
                ));
            }
            other => {
                return Err(PivotError::config(
                    source,
                    "model_type",
                    format!(
                        "expected clip_vision_model, siglip_vision_model, clip, siglip, dinov2, dinov2_with_registers, vit or vit_mae \
                         (or a timm config with `architecture`), found `{other}`"
                    ),
                ));
            }
        };
        let r = ConfigReader::new(source, v);
        let clip = family == VisionFamily::Clip;
        // Defaults are those of the HF config classes, so that sparse configs parse the same way.
        let cfg = VisionConfig {
            name: source.to_string(),
            family,
            hidden_size: r.positive("hidden_size", Some(768))?,
            intermediate_size: r.positive("intermediate_size", Some(3072))?,
            num_hidden_layers: r.positive("num_hidden_layers", Some(12))?,
            num_attention_heads: r.positive("num_attention_heads", Some(12))?,
            image_size: r.positive("image_size", Some(if clip { 224 } else { 224 }))?,
            patch_size: r.positive("patch_size", Some(if clip { 32 } else { 16 }))?,
            num_channels: r.positive("num_channels", Some(3))?,
            layer_norm_eps: r.float("layer_norm_eps", Some(if clip { 1e-5 } else { 1e-6 }))?,
            hidden_act: r.activation("hidden_act", if clip { "quick_gelu" } else { "gelu_pytorch_tanh" })?,
            use_head: !clip && r.boolean("vision_use_head", true)?,
            projection_dim: if clip { Some(r.int("projection_dim", Some(512))?) } else { None },
            ..Self::base(source, family)
        };
        r.divisible("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_attention_heads)?;
        if cfg.image_size % cfg.patch_size != 0 {
            return Err(PivotError::config(
                source,
                "image_size",
                format!("{} is not divisible by patch_size = {}", cfg.image_size, cfg.patch_size),
            ));
        }
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let v = weights::read_json(path)?;
        Self::from_json(&v, &path.display().to_string())
    }

    /// The `config.json` its family's library loads: transformers (`CLIPVisionModel`,
    /// `SiglipVisionModel`, `Dinov2Model`, `Dinov2WithRegistersModel`, `ViTModel`, `ViTMAEModel`)
    /// or timm (`timm.create_model("local-dir:…")`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self.family {
            VisionFamily::Dinov2 => return dinov2::config_to_json(self),
            VisionFamily::Vit | VisionFamily::VitMae => return vit::config_to_json(self),
            VisionFamily::Timm => return timm::config_to_json(self),
            VisionFamily::Clip | VisionFamily::Siglip => {}
        }
        let mut v = serde_json::json!({
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act.hf_name(),
            "attention_dropout": 0.0,
        });
        let o = v.as_object_mut().expect("object literal");
        if self.family == VisionFamily::Clip {
            o.insert("model_type".into(), "clip_vision_model".into());
            o.insert("architectures".into(), serde_json::json!(["CLIPVisionModel"]));
            o.insert("projection_dim".into(), self.projection_dim.unwrap_or(512).into());
        } else {
            o.insert("model_type".into(), "siglip_vision_model".into());
            o.insert("architectures".into(), serde_json::json!(["SiglipVisionModel"]));
            o.insert("vision_use_head".into(), self.use_head.into());
        }
        v
    }
}

/// Which tokens of which layer an MLLM consumes. `layer` indexes HF `hidden_states`
/// (0 = embeddings, L = last layer; negative counts from the end, −1 = last layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSelect {
    pub layer: i64,
    /// Drop the class token (and DINOv2's registers unless `keep_register_tokens`): LLaVA's
    /// `patch` feature. Ignored by towers without one.
    pub drop_class_token: bool,
    /// Keep the register tokens when the class token is dropped.
    #[serde(default)]
    pub keep_register_tokens: bool,
    /// Apply the tower's final norm (DINOv2's `layernorm`, timm's `norm`, CLIP/SigLIP's
    /// `post_layernorm`), as `last_hidden_state` / timm's `forward_features` do.
    #[serde(default)]
    pub final_norm: bool,
    /// Resample the patch tokens bilinearly to this many (a square number), as PIVOT's DINOv2
    /// wrapper does (`interp576`: 24×24); prefix tokens kept stay in front.
    #[serde(default)]
    pub resample_tokens: Option<i64>,
}

impl FeatureSelect {
    /// PIVOT / LLaVA default for CLIP / SigLIP: layer −2, patch tokens only.
    pub fn penultimate() -> Self {
        FeatureSelect { layer: -2, drop_class_token: true, keep_register_tokens: false, final_norm: false, resample_tokens: None }
    }

    /// What PIVOT's wrapper for `cfg`'s family feeds the projector: CLIP/SigLIP layer −2 (PIVOT
    /// stores SigLIP without its last layer and reads the last stored one), DINOv2
    /// `last_hidden_state` patch tokens (`dino_encoder.py`), MAE / supervised / MoCo timm
    /// `forward_features` patch tokens (normed last layer, class token dropped).
    pub fn pivot(cfg: &VisionConfig) -> Self {
        match cfg.family {
            VisionFamily::Clip | VisionFamily::Siglip => Self::penultimate(),
            VisionFamily::Dinov2 | VisionFamily::Vit | VisionFamily::VitMae | VisionFamily::Timm => {
                FeatureSelect { layer: -1, final_norm: true, ..Self::penultimate() }
            }
        }
    }

    /// The same with the patch tokens resampled to `tokens` (PIVOT's `-interp<N>`).
    pub fn resampled(self, tokens: i64) -> Self {
        FeatureSelect { resample_tokens: Some(tokens), ..self }
    }
}

impl Default for FeatureSelect {
    fn default() -> Self {
        Self::penultimate()
    }
}

/// What a full forward pass returns (HF `BaseModelOutputWithPooling`).
pub struct VisionOutput {
    /// SigLIP, DINOv2, ViT, timm: the normed last layer. CLIP: last layer without post-LN (as in HF).
    pub last_hidden_state: Tensor,
    /// CLIP: post-LN class token. SigLIP: MAP head output (None without a head). DINOv2: the
    /// normed class token. ViT: tanh pooler. timm: pre-logits (normed class token). ViT-MAE: None.
    pub pooler_output: Option<Tensor>,
    /// Embeddings, then the output of every layer: L+1 tensors of [B, tokens, D].
    pub hidden_states: Vec<Tensor>,
}

/// The family-specific network inside a tower.
enum Body {
    ClipSiglip(ClipSiglip),
    Dinov2(Dinov2),
    Vit(Vit),
}

/// A vision transformer of any supported family, with its own variable store.
pub struct VisionTower {
    vs: nn::VarStore,
    cfg: VisionConfig,
    body: Body,
}

impl std::fmt::Debug for VisionTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())
    }
}

/// Key prefixes a tower may be stored under: bare (transformers 5, timm), inside a full model,
/// in a PIVOT / LLaVA MLLM, or in MoCo's training wrapper.
const HF_PREFIXES: [&str; 6] = [
    "",
    "vision_model.",
    "model.vision_tower.vision_tower.",
    "vision_tower.vision_tower.",
    "model.vision_tower.",
    "vision_tower.",
];

impl VisionTower {
    /// A randomly initialised tower with the given shape (f32 on `device`).
    pub fn new(cfg: VisionConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        Self::build(vs, cfg)
    }

    fn build(vs: nn::VarStore, cfg: VisionConfig) -> Self {
        let root = vs.root();
        let body = match cfg.family {
            VisionFamily::Clip | VisionFamily::Siglip => Body::ClipSiglip(ClipSiglip::new(root, &cfg)),
            VisionFamily::Dinov2 => Body::Dinov2(Dinov2::new(root, &cfg)),
            VisionFamily::Vit | VisionFamily::VitMae | VisionFamily::Timm => Body::Vit(Vit::new(root, &cfg)),
        };
        VisionTower { vs, cfg, body }
    }

    /// Loads a tower from the folder a researcher downloads: `config.json` (HF, timm, or ours)
    /// and safetensors (single or sharded), plus `preprocessor_config.json` when present. The
    /// family comes from `config.json`. Also reads a tower out of a full CLIP/SigLIP model or a
    /// PIVOT / LLaVA-OneVision MLLM (under `model.vision_tower.vision_tower.`; a tower stored
    /// with fewer layers than its config — PIVOT drops the last — is built with the layers present).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let folder = if dir.is_dir() { dir.to_path_buf() } else { dir.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let config_path = folder.join("config.json");
        let json = weights::read_json(&config_path)?;
        let source = config_path.display().to_string();
        let mut cfg = if let Some(vc) = json.get("pivot_vision_config") {
            serde_json::from_value(vc.clone()).map_err(|e| PivotError::config(&source, "pivot_vision_config", e))?
        } else {
            VisionConfig::from_json(&json, &source)?
        };
        let proc_path = folder.join("preprocessor_config.json");
        // CLIP and SigLIP keep their built-in preprocessing; timm's is in its config.json.
        let reads_processor = matches!(cfg.family, VisionFamily::Dinov2 | VisionFamily::Vit | VisionFamily::VitMae);
        if reads_processor && proc_path.is_file() && json.get("pivot_vision_config").is_none() {
            let v = weights::read_json(&proc_path)?;
            cfg.processor = Some(ImageProcessor::from_hf_json(&v, &proc_path.display().to_string())?);
        }
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, cfg, device)
    }

    /// `new(path, cfg)`-style constructor: builds the tower for `cfg` and fills it from `ckpt`.
    pub fn load(ckpt: &Checkpoint, mut cfg: VisionConfig, device: Device) -> Result<Self> {
        let (probe, layers) = Self::layout_keys(cfg.family);
        let prefixes: Vec<&str> = match cfg.family {
            VisionFamily::Clip | VisionFamily::Siglip => vec![
                "vision_model.",
                "",
                "model.vision_tower.vision_tower.vision_model.",
                "vision_tower.vision_tower.vision_model.",
                "model.vision_tower.vision_model.",
                "vision_tower.vision_model.",
            ],
            VisionFamily::Dinov2 => HF_PREFIXES.iter().copied().chain(["dinov2."]).collect(),
            VisionFamily::Vit | VisionFamily::VitMae => HF_PREFIXES.iter().copied().chain(["vit."]).collect(),
            VisionFamily::Timm => HF_PREFIXES.iter().copied().chain(["module.base_encoder."]).collect(),
        };
        let prefix = ckpt.find_prefix(&prefixes, probe).ok_or_else(|| PivotError::MissingTensor {
            path: ckpt.path().to_path_buf(),
            name: format!("{}{probe}", prefixes[0]),
            expected: vec![cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size],
        })?;
        let stored = ckpt.count_layers(&format!("{prefix}{layers}")) as i64;
        if stored > 0 && stored < cfg.num_hidden_layers {
            cfg.num_hidden_layers = stored;
        }
        // MLLM checkpoints drop the heads the features never use.
        if cfg.use_head && !ckpt.contains(&format!("{prefix}head.probe")) {
            cfg.use_head = false;
        }
        if cfg.use_pooler && !ckpt.contains(&format!("{prefix}pooler.dense.weight")) {
            cfg.use_pooler = false;
        }
        if cfg.use_mask_token && !ckpt.contains(&format!("{prefix}embeddings.mask_token")) {
            cfg.use_mask_token = false;
        }
        if let Some(t) = cfg.timm.as_mut() {
            if t.num_classes > 0 && !ckpt.contains(&format!("{prefix}head.weight")) {
                t.num_classes = 0;
            }
        }
        let tower = Self::new(cfg, device);
        match tower.cfg.family {
            VisionFamily::Clip | VisionFamily::Siglip => ckpt
                .load_mapped(&tower.vs, |name| format!("{prefix}{}", name.strip_prefix("vision_model.").unwrap_or(name)))?,
            VisionFamily::Timm => timm::load(ckpt, &tower.vs, prefix)?,
            _ => ckpt.load_into(&tower.vs, prefix)?,
        }
        Ok(tower)
    }

    /// The key that tells where a family's weights start, and its layers' key prefix.
    fn layout_keys(family: VisionFamily) -> (&'static str, &'static str) {
        match family {
            VisionFamily::Clip | VisionFamily::Siglip => ("embeddings.patch_embedding.weight", "encoder.layers."),
            VisionFamily::Dinov2 | VisionFamily::Vit | VisionFamily::VitMae => {
                ("embeddings.patch_embeddings.projection.weight", "encoder.layer.")
            }
            VisionFamily::Timm => ("patch_embed.proj.weight", "blocks."),
        }
    }

    /// The key prefix under which a CLIP/SigLIP tower's `embeddings.*`, `encoder.*`... live:
    /// `vision_model.` (HF 4.x, full CLIP/SigLIP), nothing (transformers 5 vision models), or the
    /// PIVOT / LLaVA MLLM prefixes.
    pub fn checkpoint_prefix(ckpt: &Checkpoint) -> Option<&'static str> {
        ckpt.find_prefix(
            &[
                "vision_model.",
                "",
                "model.vision_tower.vision_tower.vision_model.",
                "vision_tower.vision_tower.vision_model.",
                "model.vision_tower.vision_model.",
                "vision_tower.vision_model.",
            ],
            "embeddings.patch_embedding.weight",
        )
    }

    /// The weights under the names of the family's own layout (timm's for timm towers).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        match self.cfg.family {
            VisionFamily::Timm => timm::state_dict(&self.vs),
            _ => Ok(weights::named_tensors(&self.vs, "")),
        }
    }

    /// What an MLLM checkpoint stores of the tower when the projector reads hidden state `used`:
    /// the layers below it, in the family's layout, without the heads that features never use
    /// (SigLIP's MAP head, ViT's pooler, timm's classifier), as PIVOT stores SigLIP.
    pub fn mllm_state_dict(&self, used: usize) -> Result<Vec<(String, Tensor)>> {
        let (_, layers) = Self::layout_keys(self.cfg.family);
        let layers = match self.cfg.family {
            VisionFamily::Clip | VisionFamily::Siglip => format!("vision_model.{layers}"),
            _ => layers.to_string(),
        };
        let keep = |name: &str| match name.strip_prefix(layers.as_str()) {
            Some(rest) => rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i < used),
            None => !(name.starts_with("vision_model.head.") || name.starts_with("pooler.") || name.starts_with("head.")),
        };
        Ok(self.state_dict()?.into_iter().filter(|(n, _)| keep(n)).collect())
    }

    /// Writes `config.json`, `model.safetensors` and (HF families) `preprocessor_config.json` in
    /// the family's own layout, so that `transformers` (`AutoModel`, the family's class) or timm
    /// (`timm.create_model("local-dir:DIR", pretrained=True)`) loads the tower with no missing
    /// keys. Each file is written atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
        weights::write_safetensors(&self.state_dict()?, &dir.join("model.safetensors"))?;
        if self.cfg.family != VisionFamily::Timm {
            let proc = serde_json::to_string_pretty(&self.cfg.image_processor().to_hf_json()).expect("json");
            weights::write_text_atomic(&dir.join("preprocessor_config.json"), &proc)?;
        }
        let cfg = serde_json::to_string_pretty(&self.cfg.to_hf_json()).expect("json");
        weights::write_text_atomic(&dir.join("config.json"), &cfg)?;
        Ok(())
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
    pub fn family(&self) -> VisionFamily {
        self.cfg.family
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn kind(&self) -> Kind {
        match &self.body {
            Body::ClipSiglip(m) => m.patch_embedding_weight.kind(),
            Body::Dinov2(m) => m.patch_weight.kind(),
            Body::Vit(m) => m.patch_weight.kind(),
        }
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    /// Activation checkpointing: with `on`, a training forward keeps each encoder layer's input
    /// only and recomputes the layer in backward (same gradients, less memory). Every family.
    pub fn set_recompute(&self, on: bool) {
        self.recompute_flag().store(on, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn recomputes(&self) -> bool {
        self.recompute_flag().load(std::sync::atomic::Ordering::Relaxed)
    }
    fn recompute_flag(&self) -> &std::sync::atomic::AtomicBool {
        match &self.body {
            Body::ClipSiglip(m) => &m.recompute,
            Body::Dinov2(m) => &m.recompute,
            Body::Vit(m) => &m.recompute,
        }
    }

    pub fn num_layers(&self) -> usize {
        match &self.body {
            Body::ClipSiglip(m) => m.num_layers(),
            Body::Dinov2(m) => m.num_layers(),
            Body::Vit(m) => m.num_layers(),
        }
    }
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }
    pub fn processor(&self) -> ImageProcessor {
        self.cfg.image_processor()
    }

    /// Freezes every weight (no gradients); returns self for chaining.
    pub fn frozen(mut self) -> Self {
        self.vs.freeze();
        self
    }
    pub fn set_trainable(&mut self, trainable: bool) {
        if trainable { self.vs.unfreeze() } else { self.vs.freeze() }
    }
    /// Casts weights (e.g. `Kind::BFloat16` on CUDA); norms still run in fp32.
    pub fn to_kind(mut self, kind: Kind) -> Self {
        self.vs.set_kind(kind);
        self
    }
    pub fn to_device(mut self, device: Device) -> Self {
        self.vs.set_device(device);
        self
    }

    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.size4().map_err(|_| {
            PivotError::invalid(format!("pixel values must be [batch, channels, height, width], got {:?}", pixels.size()))
        })?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels {
            return Err(PivotError::invalid(format!(
                "tower `{}` expects {} channels, got pixels {:?}",
                self.cfg.name,
                self.cfg.num_channels,
                pixels.size()
            )));
        }
        if self.cfg.fixed_input_size() && (h != s || w != s) {
            return Err(PivotError::invalid(format!(
                "{} tower `{}` expects pixels [B, {}, {s}, {s}], got {:?} (use tower.processor() to resize)",
                self.cfg.family,
                self.cfg.name,
                self.cfg.num_channels,
                pixels.size()
            )));
        }
        if h < p || w < p {
            return Err(PivotError::invalid(format!(
                "tower `{}` needs images of at least one {p}×{p} patch, got {:?}",
                self.cfg.name,
                pixels.size()
            )));
        }
        let x = pixels.f_to_device(self.device())?.f_to_kind(self.kind())?;
        Ok(match &self.body {
            Body::ClipSiglip(m) => m.embed(&x),
            Body::Dinov2(m) => m.embed(&x),
            Body::Vit(m) => m.embed(&x),
        })
    }

    fn layer(&self, i: usize, x: &Tensor) -> Tensor {
        match &self.body {
            Body::ClipSiglip(m) => m.layer(i, x),
            Body::Dinov2(m) => m.layer(i, x),
            Body::Vit(m) => m.layer(i, x),
        }
    }

    /// Resolves a (possibly negative) `hidden_states` index.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        let n = self.num_layers() as i64;
        let idx = if layer < 0 { n + 1 + layer } else { layer };
        if !(0..=n).contains(&idx) {
            return Err(PivotError::invalid(format!(
                "layer {layer} is out of range for a tower with {n} layers (valid: -{} ..= {n})",
                n + 1
            )));
        }
        Ok(idx as usize)
    }

    /// Hidden states 0..=upto (embeddings, then layer outputs); layers above `upto` are not run.
    pub fn hidden_states(&self, pixels: &Tensor, upto: usize) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(upto + 1);
        let mut x = self.embed(pixels)?;
        for i in 0..upto.min(self.num_layers()) {
            let next = self.layer(i, &x);
            states.push(x);
            x = next;
        }
        states.push(x);
        Ok(states)
    }

    /// The full HF / timm forward: every hidden state, the last hidden state and the pooled output.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let hidden_states = self.hidden_states(pixels, self.num_layers())?;
        let last = hidden_states.last().expect("at least the embeddings");
        let (last_hidden_state, pooler_output) = match &self.body {
            Body::ClipSiglip(m) => m.outputs(last),
            Body::Dinov2(m) => m.outputs(last),
            Body::Vit(m) => m.outputs(last, self.cfg.family),
        };
        Ok(VisionOutput { last_hidden_state, pooler_output, hidden_states })
    }

    /// The tokens an MLLM consumes: hidden state `select.layer`, through the final norm if asked,
    /// with the prefix tokens kept or dropped and the patches resampled as asked. Runs only the
    /// layers needed.
    pub fn features(&self, pixels: &Tensor, select: FeatureSelect) -> Result<Tensor> {
        let idx = self.resolve_layer(select.layer)?;
        let x = self.hidden_states(pixels, idx)?.pop().expect("non-empty");
        let p = self.cfg.patch_size;
        let size = pixels.size();
        self.select_tokens(&x, select, (size[2] / p, size[3] / p))
    }

    /// Applies `select`'s norm, token choice and resampling to one layer's output `x`
    /// ([B, prefix + gh·gw, D], `grid` = (gh, gw)).
    pub fn select_tokens(&self, x: &Tensor, select: FeatureSelect, grid: (i64, i64)) -> Result<Tensor> {
        let x = if select.final_norm { self.final_norm(x) } else { x.shallow_clone() };
        let n = x.size()[1];
        let cls = self.cfg.has_class_token() as i64;
        let regs = self.cfg.num_register_tokens;
        let prefix = cls + regs;
        if n != prefix + grid.0 * grid.1 {
            return Err(PivotError::invalid(format!(
                "{n} tokens do not make {prefix} prefix tokens and a {}×{} patch grid",
                grid.0, grid.1
            )));
        }
        let mut patches = x.narrow(1, prefix, n - prefix);
        if let Some(target) = select.resample_tokens {
            let side = (target as f64).sqrt().round() as i64;
            if side * side != target || target <= 0 {
                return Err(PivotError::invalid(format!("resample_tokens must be a positive square number, got {target}")));
            }
            if (side, side) != grid {
                // PIVOT's DINOv2 `interpolate`: bilinear, align_corners = false, in f32.
                let (b, _, d) = patches.size3()?;
                let kind = patches.kind();
                patches = patches
                    .reshape([b, grid.0, grid.1, d])
                    .permute([0, 3, 1, 2])
                    .to_kind(Kind::Float)
                    .upsample_bilinear2d([side, side], false, None, None)
                    .to_kind(kind)
                    .permute([0, 2, 3, 1])
                    .reshape([b, side * side, d]);
            }
        }
        let kept = match (select.drop_class_token, select.keep_register_tokens) {
            (false, _) => prefix,
            (true, true) => regs,
            (true, false) => 0,
        };
        if kept == 0 {
            return Ok(patches);
        }
        Ok(Tensor::cat(&[x.narrow(1, prefix - kept, kept), patches], 1))
    }

    /// How many tokens [`VisionTower::features`] returns per processed image.
    pub fn feature_token_count(&self, select: FeatureSelect) -> i64 {
        let c = &self.cfg;
        let patches = select.resample_tokens.unwrap_or(c.num_patches());
        let kept = match (select.drop_class_token, select.keep_register_tokens) {
            (false, _) => c.num_prefix_tokens(),
            (true, true) => c.num_register_tokens,
            (true, false) => 0,
        };
        patches + kept
    }

    /// The tower's final norm: `post_layernorm` (CLIP, SigLIP), `layernorm` (DINOv2, ViT), `norm` (timm).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        match &self.body {
            Body::ClipSiglip(m) => m.final_norm(x),
            Body::Dinov2(m) => m.final_norm(x),
            Body::Vit(m) => m.final_norm(x),
        }
    }

    /// Applies the final norm (kept under its CLIP/SigLIP name).
    pub fn post_layernorm(&self, x: &Tensor) -> Tensor {
        self.final_norm(x)
    }

    /// The MAP head over post-LN tokens (SigLIP with a head only).
    pub fn map_head(&self, post_ln_tokens: &Tensor) -> Option<Tensor> {
        match &self.body {
            Body::ClipSiglip(m) => m.map_head(post_ln_tokens),
            _ => None,
        }
    }

    /// A deep copy with its own storage (training one copy never changes the other).
    pub fn deep_clone(&self) -> Result<Self> {
        let mut copy = Self::build(nn::VarStore::new(self.device()), self.cfg.clone());
        copy.vs.set_kind(self.kind());
        copy.vs.copy(&self.vs)?;
        super::copy_trainable_flags(&self.vs, &copy.vs);
        Ok(copy)
    }

    pub fn summary(&self) -> String {
        let c = &self.cfg;
        let regs = if c.num_register_tokens > 0 { format!(" + {} registers", c.num_register_tokens) } else { String::new() };
        format!(
            "VisionTower {:?} `{}`: {} layers × {} wide, {} heads, {}px / patch {} → {} tokens{regs}, {:.1}M params, {:?} on {:?}",
            c.family,
            c.name,
            self.num_layers(),
            c.hidden_size,
            c.num_attention_heads,
            c.input_size(),
            c.patch_size,
            c.num_tokens(),
            self.num_parameters() as f64 / 1e6,
            self.kind(),
            self.device()
        )
    }
}

impl Clone for VisionTower {
    fn clone(&self) -> Self {
        self.deep_clone().expect("copying a tower into a fresh store of the same shape cannot fail")
    }
}
