//! Vision towers: CLIP ViT and SigLIP / SigLIP2 (fixed resolution), weight-compatible with HF
//! `CLIPVisionModel` and `SiglipVisionModel` (variable names are exactly HF's state-dict keys).
//!
//! Both are pre-LN ViTs; they differ in the class token, `pre_layrnorm`, patch bias, activation
//! and pooling (CLIP: post-LN class token; SigLIP: MAP head). An MLLM does not consume the pooled
//! output but the tokens of an inner layer ([`FeatureSelect`]): PIVOT feeds layer L−1 of SigLIP
//! without `post_layernorm`, all tokens; LLaVA-1.5 feeds CLIP layer −2 without the class token.

use super::layers::{Activation, ConfigReader, LayerNorm, Linear, normal_init};
use super::preprocess::ImageProcessor;
use super::weights::{self, Checkpoint};
use crate::error::{PivotError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisionFamily {
    Clip,
    Siglip,
}

/// Shape and flavour of a tower; parsed from HF `config.json` or built from a preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Preset name or checkpoint path the config came from (provenance, not semantics).
    pub name: String,
    pub family: VisionFamily,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// SigLIP attention-pooling head (`head.*`); always false for CLIP.
    pub use_head: bool,
    /// CLIP's `projection_dim` (kept only so that a saved config round-trips).
    pub projection_dim: Option<i64>,
}

impl VisionConfig {
    /// A SigLIP-style tower that trains on a CPU in minutes: 64×64 images, 8×8 patches.
    pub fn tiny() -> Self {
        VisionConfig {
            name: "tiny".into(),
            family: VisionFamily::Siglip,
            hidden_size: 96,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            image_size: 64,
            patch_size: 8,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: Activation::GeluTanh,
            use_head: false,
            projection_dim: None,
        }
    }

    /// Named presets with the shapes of the published checkpoints (weights random until loaded).
    pub fn preset(name: &str) -> Result<Self> {
        let siglip = |name: &str, hidden, inter, layers, heads, image, patch| VisionConfig {
            name: name.into(),
            family: VisionFamily::Siglip,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            image_size: image,
            patch_size: patch,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: Activation::GeluTanh,
            use_head: true,
            projection_dim: None,
        };
        Ok(match name {
            "tiny" => Self::tiny(),
            "clip-vit-large-patch14-336" => VisionConfig {
                name: name.into(),
                family: VisionFamily::Clip,
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                image_size: 336,
                patch_size: 14,
                num_channels: 3,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::QuickGelu,
                use_head: false,
                projection_dim: Some(768),
            },
            "siglip-so400m-patch14-384" => siglip(name, 1152, 4304, 27, 16, 384, 14),
            "siglip2-so400m-patch16-384" => siglip(name, 1152, 4304, 27, 16, 384, 16),
            "siglip2-base-patch16-224" => siglip(name, 768, 3072, 12, 12, 224, 16),
            other => {
                return Err(PivotError::config(
                    "VisionConfig::preset",
                    "name",
                    format!(
                        "unknown preset `{other}`; known: tiny, clip-vit-large-patch14-336, siglip-so400m-patch14-384, \
                         siglip2-so400m-patch16-384, siglip2-base-patch16-224"
                    ),
                ));
            }
        })
    }

    /// Parses a HF config: a vision config (`clip_vision_model`, `siglip_vision_model`) or a full
    /// CLIP/SigLIP config whose `vision_config` is used.
    pub fn from_json(value: &serde_json::Value, source: &str) -> Result<Self> {
        let top = ConfigReader::new(source, value);
        let model_type = top.string("model_type", Some(""))?;
        let (v, family) = match model_type.as_str() {
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
                    format!("expected clip_vision_model, siglip_vision_model, clip or siglip, found `{other}`"),
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

    /// The HF `config.json` that `transformers` loads as `CLIPVisionModel` / `SiglipVisionModel`.
    pub fn to_hf_json(&self) -> serde_json::Value {
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
        match self.family {
            VisionFamily::Clip => {
                o.insert("model_type".into(), "clip_vision_model".into());
                o.insert("architectures".into(), serde_json::json!(["CLIPVisionModel"]));
                o.insert("projection_dim".into(), self.projection_dim.unwrap_or(512).into());
            }
            VisionFamily::Siglip => {
                o.insert("model_type".into(), "siglip_vision_model".into());
                o.insert("architectures".into(), serde_json::json!(["SiglipVisionModel"]));
                o.insert("vision_use_head".into(), self.use_head.into());
            }
        }
        v
    }

    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    pub fn has_class_token(&self) -> bool {
        self.family == VisionFamily::Clip
    }
    /// Tokens per image in the hidden states (patches, plus the class token for CLIP).
    pub fn num_tokens(&self) -> i64 {
        self.num_patches() + self.has_class_token() as i64
    }
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
    /// The preprocessing this family was trained with.
    pub fn image_processor(&self) -> ImageProcessor {
        match self.family {
            VisionFamily::Clip => ImageProcessor::clip(self.image_size),
            VisionFamily::Siglip => ImageProcessor::siglip(self.image_size),
        }
    }
}

/// Which tokens of which layer an MLLM consumes. `layer` indexes HF `hidden_states`
/// (0 = embeddings, L = last layer; negative counts from the end, −1 = last layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSelect {
    pub layer: i64,
    /// Drop the class token (CLIP); ignored by towers without one.
    pub drop_class_token: bool,
}

impl FeatureSelect {
    /// PIVOT / LLaVA default: layer −2, patch tokens only.
    pub fn penultimate() -> Self {
        FeatureSelect { layer: -2, drop_class_token: true }
    }
}

impl Default for FeatureSelect {
    fn default() -> Self {
        Self::penultimate()
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        Attention {
            q_proj: Linear::new(&p / "q_proj", d, d, true),
            k_proj: Linear::new(&p / "k_proj", d, d, true),
            v_proj: Linear::new(&p / "v_proj", d, d, true),
            out_proj: Linear::new(&p / "out_proj", d, d, true),
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("tower activations are [batch, tokens, hidden]");
        let split = |t: Tensor| t.view([b, n, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.out_proj.forward(&y.transpose(1, 2).reshape([b, n, d]))
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        EncoderLayer {
            layer_norm1: LayerNorm::new(&p / "layer_norm1", d, cfg.layer_norm_eps),
            self_attn: Attention::new(&p / "self_attn", cfg),
            layer_norm2: LayerNorm::new(&p / "layer_norm2", d, cfg.layer_norm_eps),
            fc1: Linear::new(&p / "mlp" / "fc1", d, cfg.intermediate_size, true),
            fc2: Linear::new(&p / "mlp" / "fc2", cfg.intermediate_size, d, true),
            act: cfg.hidden_act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x))));
        x + h
    }
}

/// SigLIP's multihead attention pooling head (packed `in_proj_*` like `nn.MultiheadAttention`).
struct MapHead {
    probe: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    act: Activation,
}

impl MapHead {
    fn new(p: nn::Path, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size;
        let attn = &p / "attention";
        MapHead {
            probe: p.var("probe", &[1, 1, d], normal_init()),
            in_proj_weight: attn.var("in_proj_weight", &[3 * d, d], normal_init()),
            in_proj_bias: attn.var("in_proj_bias", &[3 * d], nn::Init::Const(0.0)),
            out_proj: Linear::new(&attn / "out_proj", d, d, true),
            layernorm: LayerNorm::new(&p / "layernorm", d, cfg.layer_norm_eps),
            fc1: Linear::new(&p / "mlp" / "fc1", d, cfg.intermediate_size, true),
            fc2: Linear::new(&p / "mlp" / "fc2", cfg.intermediate_size, d, true),
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("[batch, tokens, hidden]");
        let hd = d / self.heads;
        let w = self.in_proj_weight.chunk(3, 0);
        let bias = self.in_proj_bias.chunk(3, 0);
        let probe = self.probe.expand([b, 1, d], false);
        let q = probe.linear(&w[0], Some(&bias[0])).view([b, 1, self.heads, hd]).transpose(1, 2);
        let k = x.linear(&w[1], Some(&bias[1])).view([b, n, self.heads, hd]).transpose(1, 2);
        let v = x.linear(&w[2], Some(&bias[2])).view([b, n, self.heads, hd]).transpose(1, 2);
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let h = self.out_proj.forward(&y.transpose(1, 2).reshape([b, 1, d]));
        let h = &h + self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layernorm.forward(&h))));
        h.select(1, 0)
    }
}

/// What a full forward pass returns (HF `BaseModelOutputWithPooling`).
pub struct VisionOutput {
    /// SigLIP: post-LN last layer. CLIP: last layer without post-LN (as in HF).
    pub last_hidden_state: Tensor,
    /// CLIP: post-LN class token. SigLIP: MAP head output (None without a head).
    pub pooler_output: Option<Tensor>,
    /// Embeddings, then the output of every layer: L+1 tensors of [B, tokens, D].
    pub hidden_states: Vec<Tensor>,
}

/// A CLIP or SigLIP vision transformer with its own variable store.
pub struct VisionTower {
    vs: nn::VarStore,
    cfg: VisionConfig,
    patch_embedding_weight: Tensor,
    patch_embedding_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layrnorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    head: Option<MapHead>,
}

impl std::fmt::Debug for VisionTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())
    }
}

impl VisionTower {
    /// A randomly initialised tower with the given shape (f32 on `device`).
    pub fn new(cfg: VisionConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        Self::build(vs, cfg)
    }

    fn build(vs: nn::VarStore, cfg: VisionConfig) -> Self {
        let root = vs.root() / "vision_model";
        let emb = &root / "embeddings";
        let d = cfg.hidden_size;
        let clip = cfg.family == VisionFamily::Clip;
        let pe = &emb / "patch_embedding";
        let patch_embedding_weight =
            pe.var("weight", &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size], normal_init());
        let patch_embedding_bias = (!clip).then(|| pe.var("bias", &[d], nn::Init::Const(0.0)));
        let class_embedding = clip.then(|| emb.var("class_embedding", &[d], normal_init()));
        let position_embedding = (&emb / "position_embedding").var("weight", &[cfg.num_tokens(), d], normal_init());
        let pre_layrnorm = clip.then(|| LayerNorm::new(&root / "pre_layrnorm", d, cfg.layer_norm_eps));
        let layers_path = &root / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&layers_path / i, &cfg)).collect();
        let post_layernorm = LayerNorm::new(&root / "post_layernorm", d, cfg.layer_norm_eps);
        let head = cfg.use_head.then(|| MapHead::new(&root / "head", &cfg));
        VisionTower {
            vs,
            cfg,
            patch_embedding_weight,
            patch_embedding_bias,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            head,
        }
    }

    /// Loads a HF checkpoint: a directory with `config.json` and safetensors (single or sharded),
    /// as saved by `CLIPVisionModel`, `SiglipVisionModel`, a full CLIP/SigLIP model, or a
    /// PIVOT / LLaVA-OneVision MLLM (the tower is found under `model.vision_tower.vision_tower.`;
    /// a tower stored with fewer layers than its config — PIVOT drops the last — is built with
    /// the layers present).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = if dir.is_dir() { dir.join("config.json") } else { dir.with_file_name("config.json") };
        let json = weights::read_json(&config_path)?;
        let source = config_path.display().to_string();
        let cfg = if let Some(vc) = json.get("pivot_vision_config") {
            serde_json::from_value(vc.clone())
                .map_err(|e| PivotError::config(&source, "pivot_vision_config", e))?
        } else {
            VisionConfig::from_json(&json, &source)?
        };
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, cfg, device)
    }

    /// `new(path, cfg)`-style constructor: builds the tower for `cfg` and fills it from `ckpt`.
    pub fn load(ckpt: &Checkpoint, mut cfg: VisionConfig, device: Device) -> Result<Self> {
        let prefix = Self::checkpoint_prefix(ckpt).ok_or_else(|| PivotError::MissingTensor {
            path: ckpt.path().to_path_buf(),
            name: "vision_model.embeddings.patch_embedding.weight".into(),
            expected: vec![cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size],
        })?;
        let stored = ckpt.count_layers(&format!("{prefix}encoder.layers.")) as i64;
        if stored > 0 && stored < cfg.num_hidden_layers {
            cfg.num_hidden_layers = stored;
        }
        if cfg.use_head && !ckpt.contains(&format!("{prefix}head.probe")) {
            // MLLM checkpoints replace the MAP head by identity and do not store it.
            cfg.use_head = false;
        }
        let tower = Self::new(cfg, device);
        ckpt.load_mapped(&tower.vs, |name| format!("{prefix}{}", name.strip_prefix("vision_model.").unwrap_or(name)))?;
        Ok(tower)
    }

    /// The key prefix under which a tower's `embeddings.*`, `encoder.*`... live in a checkpoint:
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

    /// Writes `config.json`, `model.safetensors` and `preprocessor_config.json` so that
    /// `transformers` loads the tower (`AutoModel`, `SiglipVisionModel`/`CLIPVisionModel`) with no
    /// missing keys. Each file is written atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
        weights::write_safetensors(&weights::named_tensors(&self.vs, ""), &dir.join("model.safetensors"))?;
        let proc = serde_json::to_string_pretty(&self.cfg.image_processor().to_hf_json()).expect("json");
        weights::write_text_atomic(&dir.join("preprocessor_config.json"), &proc)?;
        let cfg = serde_json::to_string_pretty(&self.cfg.to_hf_json()).expect("json");
        weights::write_text_atomic(&dir.join("config.json"), &cfg)?;
        Ok(())
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn kind(&self) -> Kind {
        self.patch_embedding_weight.kind()
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
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
        let (b, c, h, w) = pixels.size4().map_err(|_| {
            PivotError::invalid(format!("pixel values must be [batch, channels, height, width], got {:?}", pixels.size()))
        })?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || h != s || w != s {
            return Err(PivotError::invalid(format!(
                "tower `{}` expects pixels [B, {}, {s}, {s}], got {:?} (use tower.processor() to resize)",
                self.cfg.name,
                self.cfg.num_channels,
                pixels.size()
            )));
        }
        let x = pixels.f_to_device(self.device())?.f_to_kind(self.kind())?;
        let p = self.cfg.patch_size;
        let x = x.f_conv2d(&self.patch_embedding_weight, self.patch_embedding_bias.as_ref(), [p, p], [0, 0], [1, 1], 1)?;
        let mut x = x.flatten(2, 3).transpose(1, 2);
        if let Some(cls) = &self.class_embedding {
            x = Tensor::cat(&[cls.view([1, 1, -1]).expand([b, 1, self.cfg.hidden_size], false), x], 1);
        }
        let x = x + self.position_embedding.unsqueeze(0);
        Ok(match &self.pre_layrnorm {
            Some(ln) => ln.forward(&x),
            None => x,
        })
    }

    /// Resolves a (possibly negative) `hidden_states` index.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        let n = self.layers.len() as i64;
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
        for layer in &self.layers[..upto.min(self.layers.len())] {
            let next = layer.forward(&x);
            states.push(x);
            x = next;
        }
        states.push(x);
        Ok(states)
    }

    /// The full HF forward: every hidden state, the last hidden state and the pooled output.
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let hidden_states = self.hidden_states(pixels, self.layers.len())?;
        let last = hidden_states.last().expect("at least the embeddings");
        let (last_hidden_state, pooler_output) = match self.cfg.family {
            VisionFamily::Clip => (last.shallow_clone(), Some(self.post_layernorm.forward(&last.select(1, 0)))),
            VisionFamily::Siglip => {
                let normed = self.post_layernorm.forward(last);
                let pooled = self.head.as_ref().map(|h| h.forward(&normed));
                (normed, pooled)
            }
        };
        Ok(VisionOutput { last_hidden_state, pooler_output, hidden_states })
    }

    /// The tokens an MLLM consumes: the output of `select.layer`, without `post_layernorm`,
    /// optionally without the class token. Runs only the layers needed.
    pub fn features(&self, pixels: &Tensor, select: FeatureSelect) -> Result<Tensor> {
        let idx = self.resolve_layer(select.layer)?;
        let x = self.hidden_states(pixels, idx)?.pop().expect("non-empty");
        Ok(if select.drop_class_token && self.cfg.has_class_token() { x.narrow(1, 1, x.size()[1] - 1) } else { x })
    }

    /// Applies `post_layernorm` (for probing the final representation of the last layer).
    pub fn post_layernorm(&self, x: &Tensor) -> Tensor {
        self.post_layernorm.forward(x)
    }

    /// The MAP head over post-LN tokens (SigLIP with a head only).
    pub fn map_head(&self, post_ln_tokens: &Tensor) -> Option<Tensor> {
        self.head.as_ref().map(|h| h.forward(post_ln_tokens))
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
        format!(
            "VisionTower {:?} `{}`: {} layers × {} wide, {} heads, {}px / patch {} → {} tokens, {:.1}M params, {:?} on {:?}",
            c.family,
            c.name,
            self.layers.len(),
            c.hidden_size,
            c.num_attention_heads,
            c.image_size,
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
