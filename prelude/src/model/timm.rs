//! timm's VisionTransformer layout, as a mapping onto the ViT body of [`super::vit`].
//!
//! A timm hub folder holds `model.safetensors` with timm's names (`patch_embed.proj`, `cls_token`,
//! `pos_embed`, `blocks.N.attn.qkv` with query, key and value stacked in its rows, `norm`, and
//! `head` when there is a classifier) and a `config.json` with `architecture`, optional
//! `model_args` (what `timm.create_model` gets) and `pretrained_cfg` (the preprocessing). PIVOT's
//! MAE-H/14 (`vit_huge_patch14_224.mae`) and SupViT-H/14 (`vit_huge_patch14_224.orig_in21k`) are
//! such folders; its MoCo v3 ViT-B/16 becomes one with `tools/convert_moco_v3.py`.
//!
//! The tower's variables keep HF ViT names; this module renames them (and splits or stacks
//! `qkv`) when reading and writing. Only the plain ViT is mapped: options that change the
//! computation (registers, layer scale, no class token, pre-norm, QK norm, average pooling,
//! dynamic image size) are refused by name rather than run wrongly.

use super::layers::ConfigReader;
use super::preprocess::ImageProcessor;
pub use super::vision_config::TimmConfig;
use super::vision_config::{VisionConfig, VisionFamily};
use super::weights::{Checkpoint, copy_into};
use crate::error::{PivotError, Result};
use serde_json::Value;
use tch::{Tensor, nn::VarStore};

/// Widths of timm's named ViT sizes: (embed_dim, depth, num_heads, mlp_ratio).
fn named_size(size: &str) -> Option<(i64, i64, i64, f64)> {
    Some(match size {
        "tiny" => (192, 12, 3, 4.0),
        "small" => (384, 12, 6, 4.0),
        "base" => (768, 12, 12, 4.0),
        "large" => (1024, 24, 16, 4.0),
        "huge" => (1280, 32, 16, 4.0),
        "giant" => (1408, 40, 16, 48.0 / 11.0),
        _ => return None,
    })
}

/// `vit_{size}_patch{p}_{img}` → the defaults timm registers under that name.
fn parse_architecture(arch: &str) -> Option<((i64, i64, i64, f64), i64, i64)> {
    let parts: Vec<&str> = arch.split('.').next()?.split('_').collect();
    match parts.as_slice() {
        ["vit", size, patch, img] => {
            let p = patch.strip_prefix("patch")?.parse().ok()?;
            Some((named_size(size)?, p, img.parse().ok()?))
        }
        _ => None,
    }
}

/// Parses a timm hub `config.json` into a tower config (family [`VisionFamily::Timm`]).
pub fn config_from_json(v: &Value, source: &str) -> Result<VisionConfig> {
    let top = ConfigReader::new(source, v);
    let arch = top.string("architecture", None)?;
    let empty = Value::Object(Default::default());
    let args_value = v.get("model_args").filter(|a| !a.is_null()).unwrap_or(&empty);
    let args = ConfigReader::new(format!("{source} (model_args)"), args_value);
    let named = parse_architecture(&arch);
    let has_shape = ["embed_dim", "depth", "num_heads", "patch_size", "img_size"].iter().all(|k| args.value(k).is_some());
    if named.is_none() && !has_shape {
        return Err(PivotError::config(
            source,
            "architecture",
            format!(
                "`{arch}` is not a plain timm ViT (`vit_<tiny|small|base|large|huge|giant>_patch<P>_<size>`) and model_args \
                 does not give embed_dim, depth, num_heads, patch_size and img_size"
            ),
        ));
    }
    let ((dim, depth, heads, ratio), patch, img) = named.unwrap_or(((768, 12, 12, 4.0), 16, 224));
    // Options that change the computation: refused by name (see the module doc).
    let refuse = |field: &str, ok: bool| -> Result<()> {
        if ok { Ok(()) } else { Err(PivotError::config(source, format!("model_args.{field}"), "this timm ViT option is not supported")) }
    };
    refuse("class_token", args.boolean("class_token", true)?)?;
    refuse("reg_tokens", args.int("reg_tokens", Some(0))? == 0)?;
    refuse("no_embed_class", !args.boolean("no_embed_class", false)?)?;
    refuse("init_values", args.value("init_values").is_none())?;
    refuse("pre_norm", !args.boolean("pre_norm", false)?)?;
    refuse("qk_norm", !args.boolean("qk_norm", false)?)?;
    refuse("dynamic_img_size", !args.boolean("dynamic_img_size", false)?)?;
    refuse("fc_norm", !args.boolean("fc_norm", false)?)?;
    let pool = args.string("global_pool", Some(top.string("global_pool", Some("token"))?.as_str()))?;
    if pool != "token" && !pool.is_empty() {
        return Err(PivotError::config(source, "global_pool", format!("only `token` pooling is supported, found `{pool}`")));
    }
    let pretrained_cfg = v.get("pretrained_cfg").cloned().unwrap_or(Value::Object(Default::default()));
    let pc = ConfigReader::new(format!("{source} (pretrained_cfg)"), &pretrained_cfg);
    let num_classes = match top.value("num_classes") {
        Some(_) => top.int("num_classes", None)?,
        None => args.int("num_classes", Some(pc.int("num_classes", Some(1000))?))?,
    };
    let embed_dim = args.positive("embed_dim", Some(dim))?;
    let mlp_ratio = args.float("mlp_ratio", Some(ratio))?;
    let image_size = args.square("img_size", Some(img))?;
    let cfg = VisionConfig {
        name: source.to_string(),
        family: VisionFamily::Timm,
        hidden_size: embed_dim,
        intermediate_size: (embed_dim as f64 * mlp_ratio) as i64,
        num_hidden_layers: args.positive("depth", Some(depth))?,
        num_attention_heads: args.positive("num_heads", Some(heads))?,
        image_size,
        patch_size: args.square("patch_size", Some(patch))?,
        num_channels: args.positive("in_chans", Some(3))?,
        layer_norm_eps: 1e-6,
        hidden_act: super::layers::Activation::Gelu,
        mlp_ratio: Some(mlp_ratio),
        qkv_bias: args.boolean("qkv_bias", true)?,
        processor: Some(ImageProcessor::from_timm_json(&pretrained_cfg, image_size, &format!("{source} (pretrained_cfg)"))?),
        timm: Some(TimmConfig { architecture: arch, num_classes, model_args: args_value.clone(), pretrained_cfg: pretrained_cfg.clone() }),
        ..VisionConfig::base(source, VisionFamily::Timm)
    };
    args.divisible("embed_dim", cfg.hidden_size, "num_heads", cfg.num_attention_heads)?;
    Ok(cfg)
}

/// timm's `config.json` for a tower: the stored architecture and pretrained_cfg, with
/// model_args and num_classes describing the weights as they are now.
pub fn config_to_json(cfg: &VisionConfig) -> Value {
    let t = cfg.timm.clone().unwrap_or(TimmConfig {
        architecture: "vit_base_patch16_224".into(),
        num_classes: 0,
        model_args: Value::Object(Default::default()),
        pretrained_cfg: Value::Object(Default::default()),
    });
    let mut args = t.model_args.as_object().cloned().unwrap_or_default();
    for (k, v) in [
        ("img_size", Value::from(cfg.image_size)),
        ("patch_size", cfg.patch_size.into()),
        ("embed_dim", cfg.hidden_size.into()),
        ("depth", cfg.num_hidden_layers.into()),
        ("num_heads", cfg.num_attention_heads.into()),
        ("mlp_ratio", cfg.mlp_ratio.unwrap_or(cfg.intermediate_size as f64 / cfg.hidden_size as f64).into()),
        ("qkv_bias", cfg.qkv_bias.into()),
        ("num_classes", t.num_classes.into()),
        ("in_chans", cfg.num_channels.into()),
    ] {
        args.insert(k.into(), v);
    }
    let mut pretrained = t.pretrained_cfg.as_object().cloned().unwrap_or_default();
    if let Some(p) = &cfg.processor {
        // Rewritten only when it changed, so that a loaded crop_pct is kept to the last digit.
        let stored = ImageProcessor::from_timm_json(&t.pretrained_cfg, cfg.image_size, "").ok();
        if stored.as_ref() != Some(p) {
            pretrained.extend(p.to_timm_json(cfg.num_channels).as_object().cloned().unwrap_or_default());
        }
    }
    pretrained.insert("num_classes".into(), t.num_classes.into());
    serde_json::json!({
        "architecture": t.architecture,
        "num_classes": t.num_classes,
        "num_features": cfg.hidden_size,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": pretrained,
    })
}

/// Where a tower variable lives in a timm state dict: the key, and for query/key/value which
/// third of the stacked `qkv` rows.
fn timm_key(name: &str) -> Option<(String, Option<i64>)> {
    let whole = |k: &str| Some((k.to_string(), None));
    match name {
        "embeddings.cls_token" => return whole("cls_token"),
        "embeddings.position_embeddings" => return whole("pos_embed"),
        "embeddings.patch_embeddings.projection.weight" => return whole("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias" => return whole("patch_embed.proj.bias"),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("layernorm.") {
        return Some((format!("norm.{rest}"), None));
    }
    if name.starts_with("head.") {
        return whole(name);
    }
    let rest = name.strip_prefix("encoder.layer.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let (target, part) = match module {
        "layernorm_before" => ("norm1", None),
        "layernorm_after" => ("norm2", None),
        "attention.attention.query" => ("attn.qkv", Some(0)),
        "attention.attention.key" => ("attn.qkv", Some(1)),
        "attention.attention.value" => ("attn.qkv", Some(2)),
        "attention.output.dense" => ("attn.proj", None),
        "intermediate.dense" => ("mlp.fc1", None),
        "output.dense" => ("mlp.fc2", None),
        _ => return None,
    };
    Some((format!("blocks.{i}.{target}.{param}"), part))
}

/// Fills `vs` (HF ViT names) from a timm state dict stored under `prefix`.
pub fn load(ckpt: &Checkpoint, vs: &VarStore, prefix: &str) -> Result<()> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let (key, part) = timm_key(name)
            .ok_or_else(|| PivotError::invalid(format!("no timm name for tower variable `{name}` (a bug in the mapping)")))?;
        let key = format!("{prefix}{key}");
        let expected = var.size();
        let Some(info) = ckpt.info(&key) else {
            return Err(PivotError::MissingTensor { path: ckpt.path().to_path_buf(), name: key, expected });
        };
        let mut stored_expected = expected.clone();
        if part.is_some() {
            stored_expected[0] *= 3;
        }
        if info.shape != stored_expected {
            return Err(PivotError::ShapeMismatch {
                path: ckpt.file_of(&key).to_path_buf(),
                name: key,
                expected: stored_expected,
                found: info.shape.clone(),
            });
        }
        let src = ckpt.tensor(&key)?;
        let src = match part {
            Some(i) => src.narrow(0, i * expected[0], expected[0]),
            None => src,
        };
        copy_into(var, &src)?;
    }
    Ok(())
}

/// The tower's weights under timm's names (`qkv` stacked), sorted by name.
pub fn state_dict(vs: &VarStore) -> Result<Vec<(String, Tensor)>> {
    let mut whole = Vec::new();
    let mut qkv: std::collections::BTreeMap<String, [Option<Tensor>; 3]> = Default::default();
    for (name, t) in vs.variables() {
        let (key, part) = timm_key(&name)
            .ok_or_else(|| PivotError::invalid(format!("no timm name for tower variable `{name}` (a bug in the mapping)")))?;
        match part {
            None => whole.push((key, t.detach())),
            Some(i) => qkv.entry(key).or_default()[i as usize] = Some(t.detach()),
        }
    }
    for (key, parts) in qkv {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|p| p.ok_or_else(|| PivotError::invalid(format!("`{key}`: query, key or value is missing"))))
            .collect::<Result<_>>()?;
        whole.push((key, Tensor::cat(&parts, 0)));
    }
    whole.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(whole)
}
