//! DINOv2, weight-compatible with HF `Dinov2Model` and `Dinov2WithRegistersModel` (variable names
//! are the hub's state-dict keys, which transformers 5 still writes on save: fused SwiGLU
//! `mlp.weights_in`, `attention.attention.query`, `layer_scale1.lambda1`).
//!
//! A pre-LN ViT with layer scale on both residual branches, the giant variant's SwiGLU MLP, and
//! optional register tokens placed after the class token (they get no position embedding).
//! The position embeddings are interpolated to any input size exactly as HF does: bicubic by
//! output size with `align_corners = false`, in f32, skipped only for the native grid of a square
//! input; the registers model adds `antialias = true` (a different bicubic kernel, so it is
//! not the same numbers even when upsampling).

use super::layers::{Activation, ConfigReader, LayerNorm, Linear, normal_init};
use super::vision_config::{VisionConfig, VisionFamily};
use super::vit::{VitAttention, interpolate_pos_embed, needs_interpolation};
use crate::error::Result;
use tch::{Tensor, nn};

/// The SwiGLU MLP's hidden width: two thirds of `hidden * mlp_ratio`, rounded up to 8 (HF and
/// the original DINOv2).
pub fn swiglu_hidden(hidden_size: i64, mlp_ratio: f64) -> i64 {
    let h = (hidden_size as f64 * mlp_ratio) as i64;
    ((h * 2 / 3) + 7) / 8 * 8
}

#[derive(Clone)]
enum Mlp {
    Gelu { fc1: Linear, fc2: Linear, act: Activation },
    /// `weights_in` holds the gate (first half of its rows) and the up projection (second half).
    SwiGlu { weights_in: Linear, weights_out: Linear },
}

impl Mlp {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let (d, h) = (cfg.hidden_size, cfg.intermediate_size);
        if cfg.use_swiglu_ffn {
            Mlp::SwiGlu { weights_in: Linear::new(&p / "weights_in", d, 2 * h, true), weights_out: Linear::new(&p / "weights_out", h, d, true) }
        } else {
            Mlp::Gelu { fc1: Linear::new(&p / "fc1", d, h, true), fc2: Linear::new(&p / "fc2", h, d, true), act: cfg.hidden_act }
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gelu { fc1, fc2, act } => fc2.forward(&act.forward(&fc1.forward(x))),
            Mlp::SwiGlu { weights_in, weights_out } => {
                let gu = weights_in.forward(x).chunk(2, -1);
                weights_out.forward(&(gu[0].silu() * &gu[1]))
            }
        }
    }
}

struct Dinov2Layer {
    norm1: LayerNorm,
    attention: VitAttention,
    lambda1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    lambda2: Tensor,
}

/// Clones share the weights (a clone is what a recomputed layer keeps).
impl Clone for Dinov2Layer {
    fn clone(&self) -> Self {
        Dinov2Layer {
            norm1: self.norm1.clone(),
            attention: self.attention.clone(),
            lambda1: self.lambda1.shallow_clone(),
            norm2: self.norm2.clone(),
            mlp: self.mlp.clone(),
            lambda2: self.lambda2.shallow_clone(),
        }
    }
}

impl Dinov2Layer {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        let scale = nn::Init::Const(cfg.layerscale_value.unwrap_or(1.0));
        Dinov2Layer {
            norm1: LayerNorm::new(&p / "norm1", d, cfg.layer_norm_eps),
            attention: VitAttention::new(&p / "attention", cfg),
            lambda1: (&p / "layer_scale1").var("lambda1", &[d], scale),
            norm2: LayerNorm::new(&p / "norm2", d, cfg.layer_norm_eps),
            mlp: Mlp::new(&p / "mlp", cfg),
            lambda2: (&p / "layer_scale2").var("lambda1", &[d], scale),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention.forward(&self.norm1.forward(x)) * &self.lambda1;
        let h = self.mlp.forward(&self.norm2.forward(&x)) * &self.lambda2;
        x + h
    }
}

/// The DINOv2 body.
pub(crate) struct Dinov2 {
    pub(crate) patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    position_embeddings: Tensor,
    register_tokens: Option<Tensor>,
    layers: Vec<Dinov2Layer>,
    layernorm: LayerNorm,
    patch_size: i64,
    /// Activation checkpointing of the encoder layers (`VisionTower::set_recompute`).
    pub(crate) recompute: std::sync::atomic::AtomicBool,
}

impl Dinov2 {
    pub(crate) fn new(root: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        let emb = &root / "embeddings";
        let proj = &emb / "patch_embeddings" / "projection";
        let cls_token = emb.var("cls_token", &[1, 1, d], normal_init());
        if cfg.use_mask_token {
            // Stored so that a saved tower has every key; inference never masks.
            let _ = emb.var("mask_token", &[1, d], nn::Init::Const(0.0));
        }
        let position_embeddings = emb.var("position_embeddings", &[1, cfg.num_positions() + 1, d], normal_init());
        let register_tokens =
            (cfg.num_register_tokens > 0).then(|| emb.var("register_tokens", &[1, cfg.num_register_tokens, d], normal_init()));
        let layers_path = &root / "encoder" / "layer";
        Dinov2 {
            patch_weight: proj.var("weight", &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size], normal_init()),
            patch_bias: proj.var("bias", &[d], nn::Init::Const(0.0)),
            cls_token,
            position_embeddings,
            register_tokens,
            layers: (0..cfg.num_hidden_layers).map(|i| Dinov2Layer::new(&layers_path / i, cfg)).collect(),
            layernorm: LayerNorm::new(&root / "layernorm", d, cfg.layer_norm_eps),
            patch_size: cfg.patch_size,
            recompute: Default::default(),
        }
    }

    pub(crate) fn embed(&self, x: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().expect("[B, C, H, W]");
        let p = self.patch_size;
        let x = x.conv2d(&self.patch_weight, Some(&self.patch_bias), [p, p], [0, 0], [1, 1], 1).flatten(2, 3).transpose(1, 2);
        let d = x.size()[2];
        let x = Tensor::cat(&[self.cls_token.expand([b, 1, d], false), x], 1);
        let positions = self.position_embeddings.size()[1] - 1;
        let pos = if needs_interpolation(positions, (h / p) * (w / p), h, w) {
            let antialias = self.register_tokens.is_some();
            interpolate_pos_embed(&self.position_embeddings, 1, (h / p, w / p), antialias, true)
        } else {
            self.position_embeddings.shallow_clone()
        };
        let x = x + pos;
        match &self.register_tokens {
            Some(reg) => {
                let n = x.size()[1];
                let r = reg.size()[1];
                Tensor::cat(&[x.narrow(1, 0, 1), reg.expand([b, r, d], false), x.narrow(1, 1, n - 1)], 1)
            }
            None => x,
        }
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
    pub(crate) fn layer(&self, i: usize, x: &Tensor) -> Tensor {
        if self.recompute.load(std::sync::atomic::Ordering::Relaxed) {
            let layer = self.layers[i].clone();
            return super::recompute::recompute(x, move |x| layer.forward(x));
        }
        self.layers[i].forward(x)
    }
    pub(crate) fn final_norm(&self, x: &Tensor) -> Tensor {
        self.layernorm.forward(x)
    }
    /// `last_hidden_state` is the normed last layer; the pooled output its class token.
    pub(crate) fn outputs(&self, last: &Tensor) -> (Tensor, Option<Tensor>) {
        let normed = self.layernorm.forward(last);
        let pooled = normed.select(1, 0);
        (normed, Some(pooled))
    }
}

/// Parses HF `Dinov2Config` / `Dinov2WithRegistersConfig` with HF's defaults.
pub(crate) fn config_from_json(v: &serde_json::Value, source: &str, registers: bool) -> Result<VisionConfig> {
    let r = ConfigReader::new(source, v);
    let d = r.positive("hidden_size", Some(768))?;
    let mlp_ratio = r.float("mlp_ratio", Some(4.0))?;
    let swiglu = r.boolean("use_swiglu_ffn", false)?;
    let cfg = VisionConfig {
        name: source.to_string(),
        family: VisionFamily::Dinov2,
        hidden_size: d,
        intermediate_size: if swiglu { swiglu_hidden(d, mlp_ratio) } else { (d as f64 * mlp_ratio) as i64 },
        num_hidden_layers: r.positive("num_hidden_layers", Some(12))?,
        num_attention_heads: r.positive("num_attention_heads", Some(12))?,
        image_size: r.square("image_size", Some(224))?,
        patch_size: r.square("patch_size", Some(14))?,
        num_channels: r.positive("num_channels", Some(3))?,
        layer_norm_eps: r.float("layer_norm_eps", Some(1e-6))?,
        hidden_act: r.activation("hidden_act", "gelu")?,
        num_register_tokens: if registers { r.int("num_register_tokens", Some(4))? } else { 0 },
        layerscale_value: Some(r.float("layerscale_value", Some(1.0))?),
        use_swiglu_ffn: swiglu,
        mlp_ratio: Some(mlp_ratio),
        qkv_bias: r.boolean("qkv_bias", true)?,
        use_mask_token: r.boolean("use_mask_token", true)?,
        ..VisionConfig::base(source, VisionFamily::Dinov2)
    };
    r.divisible("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_attention_heads)?;
    Ok(cfg)
}

/// The `config.json` that transformers loads as `Dinov2Model` / `Dinov2WithRegistersModel`.
pub(crate) fn config_to_json(cfg: &VisionConfig) -> serde_json::Value {
    let ratio = cfg.mlp_ratio.unwrap_or(cfg.intermediate_size as f64 / cfg.hidden_size as f64);
    // HF's config class types mlp_ratio as an integer.
    let ratio: serde_json::Value = if ratio.fract() == 0.0 { (ratio as i64).into() } else { ratio.into() };
    let mut v = serde_json::json!({
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "mlp_ratio": ratio,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act.hf_name(),
        "qkv_bias": cfg.qkv_bias,
        "layerscale_value": cfg.layerscale_value.unwrap_or(1.0),
        "use_swiglu_ffn": cfg.use_swiglu_ffn,
        "use_mask_token": cfg.use_mask_token,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    });
    let o = v.as_object_mut().expect("object literal");
    if cfg.num_register_tokens > 0 {
        o.insert("model_type".into(), "dinov2_with_registers".into());
        o.insert("architectures".into(), serde_json::json!(["Dinov2WithRegistersModel"]));
        o.insert("num_register_tokens".into(), cfg.num_register_tokens.into());
    } else {
        o.insert("model_type".into(), "dinov2".into());
        o.insert("architectures".into(), serde_json::json!(["Dinov2Model"]));
    }
    v
}
