//! CLIP ViT and SigLIP / SigLIP2 (fixed resolution), weight-compatible with HF
//! `CLIPVisionModel` and `SiglipVisionModel` (variable names are HF 4.x state-dict keys under
//! `vision_model.`).
//!
//! Both are pre-LN ViTs; they differ in the class token, `pre_layrnorm`, patch bias, activation
//! and pooling (CLIP: post-LN class token; SigLIP: MAP head).

use super::layers::{Activation, LayerNorm, Linear, normal_init};
use super::vision_config::{VisionConfig, VisionFamily};
use tch::{Tensor, nn};

/// The CLIP / SigLIP body: embeddings, encoder layers, post-LN and (SigLIP) the MAP head.
pub(crate) struct ClipSiglip {
    pub(crate) patch_embedding_weight: Tensor,
    patch_embedding_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layrnorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    head: Option<MapHead>,
    family: VisionFamily,
    patch_size: i64,
    hidden_size: i64,
    /// Activation checkpointing of the encoder layers (`VisionTower::set_recompute`).
    pub(crate) recompute: std::sync::atomic::AtomicBool,
}

impl ClipSiglip {
    /// Variables under `root` (the store's root: names start with `vision_model.`).
    pub(crate) fn new(root: nn::Path, cfg: &VisionConfig) -> Self {
        let root = root / "vision_model";
        let emb = &root / "embeddings";
        let d = cfg.hidden_size;
        let clip = cfg.family == VisionFamily::Clip;
        let pe = &emb / "patch_embedding";
        let patch_embedding_weight =
            pe.var("weight", &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size], normal_init());
        let patch_embedding_bias = (!clip).then(|| pe.var("bias", &[d], nn::Init::Const(0.0)));
        let class_embedding = clip.then(|| emb.var("class_embedding", &[d], normal_init()));
        let position_embedding = (&emb / "position_embedding").var("weight", &[cfg.num_positions() + clip as i64, d], normal_init());
        let pre_layrnorm = clip.then(|| LayerNorm::new(&root / "pre_layrnorm", d, cfg.layer_norm_eps));
        let layers_path = &root / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::new(&layers_path / i, cfg)).collect();
        let post_layernorm = LayerNorm::new(&root / "post_layernorm", d, cfg.layer_norm_eps);
        let head = cfg.use_head.then(|| MapHead::new(&root / "head", cfg));
        ClipSiglip {
            patch_embedding_weight,
            patch_embedding_bias,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            head,
            family: cfg.family,
            patch_size: cfg.patch_size,
            hidden_size: d,
            recompute: Default::default(),
        }
    }

    /// Pixels (already checked to be the native size, on the weights' device and dtype) → tokens.
    pub(crate) fn embed(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        let p = self.patch_size;
        let x = x.conv2d(&self.patch_embedding_weight, self.patch_embedding_bias.as_ref(), [p, p], [0, 0], [1, 1], 1);
        let mut x = x.flatten(2, 3).transpose(1, 2);
        if let Some(cls) = &self.class_embedding {
            x = Tensor::cat(&[cls.view([1, 1, -1]).expand([b, 1, self.hidden_size], false), x], 1);
        }
        let x = x + self.position_embedding.unsqueeze(0);
        match &self.pre_layrnorm {
            Some(ln) => ln.forward(&x),
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
        self.post_layernorm.forward(x)
    }
    pub(crate) fn map_head(&self, post_ln_tokens: &Tensor) -> Option<Tensor> {
        self.head.as_ref().map(|h| h.forward(post_ln_tokens))
    }

    /// HF's `last_hidden_state` and `pooler_output` from the last layer's output.
    pub(crate) fn outputs(&self, last: &Tensor) -> (Tensor, Option<Tensor>) {
        match self.family {
            VisionFamily::Clip => (last.shallow_clone(), Some(self.post_layernorm.forward(&last.select(1, 0)))),
            _ => {
                let normed = self.post_layernorm.forward(last);
                let pooled = self.map_head(&normed);
                (normed, pooled)
            }
        }
    }
}

#[derive(Clone)]
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

/// Clones share the weights.
#[derive(Clone)]
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

