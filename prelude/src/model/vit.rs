//! ViT, weight-compatible with HF `ViTModel` and `ViTMAEModel` (variable names are the hub's
//! state-dict keys, which transformers 5 still writes: `encoder.layer.N.attention.attention.query`),
//! and the body of timm-layout towers (see [`super::timm`] for the key mapping).
//!
//! ViT-MAE's encoder is a ViT without a pooler. MAE masks 75 % of the patches in pre-training;
//! used as a tower (PIVOT's MAE-H/14) nothing is masked and every patch stays in order, which is
//! HF's `ViTMAEModel` with `mask_ratio = 0` and a monotone `noise`: the class token and position
//! embeddings then add up exactly as in ViT, so both run the same code here.
//!
//! Inputs of another size than `image_size` interpolate the position embeddings as HF does with
//! `interpolate_pos_encoding=True` (bicubic to the new grid, no antialias, in the weights' dtype).

use super::layers::{Activation, ConfigReader, LayerNorm, Linear, normal_init};
use super::vision_config::{VisionConfig, VisionFamily};
use crate::error::{PivotError, Result};
use tch::{Kind, Tensor, nn};

/// HF's ViT self-attention (`attention.attention.{query,key,value}`, `attention.output.dense`);
/// DINOv2 uses the same layout. Clones share the weights.
#[derive(Clone)]
pub(crate) struct VitAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    heads: i64,
}

impl VitAttention {
    /// `p` is the layer's `attention` path.
    pub(crate) fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        let a = &p / "attention";
        VitAttention {
            query: Linear::new(&a / "query", d, d, cfg.qkv_bias),
            key: Linear::new(&a / "key", d, d, cfg.qkv_bias),
            value: Linear::new(&a / "value", d, d, cfg.qkv_bias),
            dense: Linear::new(&p / "output" / "dense", d, d, true),
            heads: cfg.num_attention_heads,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("tower activations are [batch, tokens, hidden]");
        let split = |t: Tensor| t.view([b, n, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.dense.forward(&y.transpose(1, 2).reshape([b, n, d]))
    }
}

/// Resamples `[1, prefix + g*g, D]` position embeddings to a `grid` of patches (the first
/// `prefix` rows, the class token's, are kept). Bicubic with `align_corners = false` by output
/// size, as HF's `interpolate_pos_encoding`; `antialias` and `in_f32` follow the family
/// (DINOv2 with registers: antialias; both DINOv2s: computed in f32).
pub(crate) fn interpolate_pos_embed(pos: &Tensor, prefix: i64, grid: (i64, i64), antialias: bool, in_f32: bool) -> Tensor {
    let (_, n, d) = pos.size3().expect("[1, positions, hidden]");
    let old = ((n - prefix) as f64).sqrt().round() as i64;
    let head = pos.narrow(1, 0, prefix);
    let kind = pos.kind();
    let mut patch = pos.narrow(1, prefix, n - prefix).reshape([1, old, old, d]).permute([0, 3, 1, 2]);
    if in_f32 {
        patch = patch.to_kind(Kind::Float);
    }
    let resized = if antialias {
        Tensor::internal_upsample_bicubic2d_aa(&patch, [grid.0, grid.1], false, None, None)
    } else {
        patch.upsample_bicubic2d([grid.0, grid.1], false, None, None)
    };
    let resized = resized.to_kind(kind).permute([0, 2, 3, 1]).reshape([1, grid.0 * grid.1, d]);
    Tensor::cat(&[head, resized], 1)
}

/// Whether HF would interpolate: any grid but the native one, and any non-square input.
pub(crate) fn needs_interpolation(positions: i64, patches: i64, height: i64, width: i64) -> bool {
    !(positions == patches && height == width)
}

/// Clones share the weights (a clone is what a recomputed layer keeps).
#[derive(Clone)]
struct VitLayer {
    layernorm_before: LayerNorm,
    attention: VitAttention,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    act: Activation,
}

impl VitLayer {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        VitLayer {
            layernorm_before: LayerNorm::new(&p / "layernorm_before", d, cfg.layer_norm_eps),
            attention: VitAttention::new(&p / "attention", cfg),
            layernorm_after: LayerNorm::new(&p / "layernorm_after", d, cfg.layer_norm_eps),
            intermediate: Linear::new(&p / "intermediate" / "dense", d, cfg.intermediate_size, true),
            output: Linear::new(&p / "output" / "dense", cfg.intermediate_size, d, true),
            act: cfg.hidden_act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention.forward(&self.layernorm_before.forward(x));
        let h = self.output.forward(&self.act.forward(&self.intermediate.forward(&self.layernorm_after.forward(&x))));
        x + h
    }
}

/// The ViT body (HF `ViTModel` / `ViTMAEModel` names; timm towers are stored under these too).
pub(crate) struct Vit {
    pub(crate) patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    pooler: Option<Linear>,
    patch_size: i64,
    /// Activation checkpointing of the encoder layers (`VisionTower::set_recompute`).
    pub(crate) recompute: std::sync::atomic::AtomicBool,
}

impl Vit {
    pub(crate) fn new(root: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        let emb = &root / "embeddings";
        let proj = &emb / "patch_embeddings" / "projection";
        let cls_token = emb.var("cls_token", &[1, 1, d], normal_init());
        if cfg.use_mask_token {
            // Stored so that a saved tower has every key; inference never masks.
            let _ = emb.var("mask_token", &[1, 1, d], nn::Init::Const(0.0));
        }
        let position_embeddings = emb.var("position_embeddings", &[1, cfg.num_positions() + 1, d], normal_init());
        if let Some(t) = &cfg.timm {
            if t.num_classes > 0 {
                // timm's classifier (`head.*`): kept for the round trip, not used by the features.
                let _ = Linear::new(&root / "head", d, t.num_classes, true);
            }
        }
        let layers_path = &root / "encoder" / "layer";
        Vit {
            patch_weight: proj.var("weight", &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size], normal_init()),
            patch_bias: proj.var("bias", &[d], nn::Init::Const(0.0)),
            cls_token,
            position_embeddings,
            layers: (0..cfg.num_hidden_layers).map(|i| VitLayer::new(&layers_path / i, cfg)).collect(),
            layernorm: LayerNorm::new(&root / "layernorm", d, cfg.layer_norm_eps),
            pooler: cfg.use_pooler.then(|| Linear::new(&root / "pooler" / "dense", d, d, true)),
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
            interpolate_pos_embed(&self.position_embeddings, 1, (h / p, w / p), false, false)
        } else {
            self.position_embeddings.shallow_clone()
        };
        x + pos
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
    /// `last_hidden_state` (final norm) and the pooled output: ViT's tanh pooler over the class
    /// token; timm's pre-logits (the normed class token, global_pool `token`); none for ViT-MAE.
    pub(crate) fn outputs(&self, last: &Tensor, family: VisionFamily) -> (Tensor, Option<Tensor>) {
        let normed = self.layernorm.forward(last);
        let pooled = match (&self.pooler, family) {
            (Some(dense), _) => Some(dense.forward(&normed.select(1, 0)).tanh()),
            (None, VisionFamily::Timm) => Some(normed.select(1, 0)),
            _ => None,
        };
        (normed, pooled)
    }
}

/// Parses HF `ViTConfig` / `ViTMAEConfig` (`model_type` `vit` / `vit_mae`) with HF's defaults.
pub(crate) fn config_from_json(v: &serde_json::Value, source: &str, family: VisionFamily) -> Result<VisionConfig> {
    let r = ConfigReader::new(source, v);
    let d = r.positive("hidden_size", Some(768))?;
    if family == VisionFamily::Vit {
        let act = r.string("pooler_act", Some("tanh"))?;
        if act != "tanh" {
            return Err(PivotError::config(source, "pooler_act", format!("only `tanh` is supported, found `{act}`")));
        }
        let size = r.int("pooler_output_size", Some(d))?;
        if size != d {
            return Err(PivotError::config(source, "pooler_output_size", format!("only hidden_size ({d}) is supported, found {size}")));
        }
    }
    let cfg = VisionConfig {
        name: source.to_string(),
        family,
        hidden_size: d,
        intermediate_size: r.positive("intermediate_size", Some(3072))?,
        num_hidden_layers: r.positive("num_hidden_layers", Some(12))?,
        num_attention_heads: r.positive("num_attention_heads", Some(12))?,
        image_size: r.square("image_size", Some(224))?,
        patch_size: r.square("patch_size", Some(16))?,
        num_channels: r.positive("num_channels", Some(3))?,
        layer_norm_eps: r.float("layer_norm_eps", Some(1e-12))?,
        hidden_act: r.activation("hidden_act", "gelu")?,
        qkv_bias: r.boolean("qkv_bias", true)?,
        // ViTModel builds its pooler by default; a checkpoint without one turns it off at load.
        use_pooler: family == VisionFamily::Vit,
        use_mask_token: false,
        mask_ratio: (family == VisionFamily::VitMae).then(|| r.float("mask_ratio", Some(0.75))).transpose()?,
        ..VisionConfig::base(source, family)
    };
    r.divisible("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_attention_heads)?;
    Ok(cfg)
}

/// The `config.json` that transformers loads as `ViTModel` / `ViTMAEModel`.
pub(crate) fn config_to_json(cfg: &VisionConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act.hf_name(),
        "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    });
    let o = v.as_object_mut().expect("object literal");
    if cfg.family == VisionFamily::VitMae {
        o.insert("model_type".into(), "vit_mae".into());
        o.insert("architectures".into(), serde_json::json!(["ViTMAEModel"]));
        o.insert("mask_ratio".into(), cfg.mask_ratio.unwrap_or(0.75).into());
    } else {
        o.insert("model_type".into(), "vit".into());
        o.insert("architectures".into(), serde_json::json!(["ViTModel"]));
        o.insert("pooler_act".into(), "tanh".into());
        o.insert("pooler_output_size".into(), cfg.hidden_size.into());
    }
    v
}
