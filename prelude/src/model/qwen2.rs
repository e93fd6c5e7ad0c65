//! The Qwen2 / Qwen2.5 decoder (HF `Qwen2ForCausalLM`): RMSNorm in fp32, half-split RoPE,
//! grouped-query attention with q/k/v bias, SwiGLU MLP, tied or untied `lm_head`.
//!
//! Positions are derived from the attention mask (cumulative count of real tokens), so right
//! padding (training) and left padding (batched generation) both give every real token the
//! position it would have alone.

use super::layers::{Activation, ConfigReader, Linear, RmsNorm, normal_init};
use super::recompute::recompute;
use super::tokenizer::Tokenizer;
use super::weights::{self, Checkpoint};
use crate::error::{PivotError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub name: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub hidden_act: Activation,
}

impl Qwen2Config {
    /// A small decoder for the embedded world: trains on a CPU in minutes.
    pub fn tiny(vocab_size: i64) -> Self {
        Qwen2Config {
            name: "tiny".into(),
            vocab_size,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            max_position_embeddings: 4096,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            hidden_act: Activation::Silu,
        }
    }

    /// Shapes of the Qwen2.5 Instruct checkpoints used in the paper (weights random until loaded).
    pub fn preset(name: &str) -> Result<Self> {
        let q = |hidden, inter, layers, heads, kv, tied, vocab| Qwen2Config {
            name: name.to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            max_position_embeddings: 32768,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tied,
            hidden_act: Activation::Silu,
        };
        Ok(match name {
            "qwen2.5-0.5b" => q(896, 4864, 24, 14, 2, true, 151936),
            "qwen2.5-1.5b" => q(1536, 8960, 28, 12, 2, true, 151936),
            "qwen2.5-3b" => q(2048, 11008, 36, 16, 2, true, 151936),
            "qwen2.5-7b" => q(3584, 18944, 28, 28, 4, false, 152064),
            other => {
                return Err(PivotError::config(
                    "Qwen2Config::preset",
                    "name",
                    format!("unknown preset `{other}`; known: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b"),
                ));
            }
        })
    }

    pub fn from_json(value: &serde_json::Value, source: &str) -> Result<Self> {
        let r = ConfigReader::new(source, value);
        let model_type = r.string("model_type", Some("qwen2"))?;
        if model_type != "qwen2" {
            return Err(PivotError::config(source, "model_type", format!("expected `qwen2`, found `{model_type}`")));
        }
        if r.boolean("use_sliding_window", false)? {
            return Err(PivotError::config(source, "use_sliding_window", "sliding-window attention is not supported"));
        }
        // transformers ≥ 5 moves rope_theta into `rope_parameters`.
        let rope = value.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope {
            Some(rp) => ConfigReader::new(format!("{source} (rope_parameters)"), rp).float("rope_theta", Some(10_000.0))?,
            None => r.float("rope_theta", Some(10_000.0))?,
        };
        let scaling = rope.or(value.get("rope_scaling").filter(|v| !v.is_null()));
        if let Some(s) = scaling {
            let ty = s.get("rope_type").or(s.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if ty != "default" {
                return Err(PivotError::config(source, "rope_scaling", format!("rope type `{ty}` is not supported")));
            }
        }
        let hidden = r.positive("hidden_size", None)?;
        let heads = r.positive("num_attention_heads", None)?;
        let cfg = Qwen2Config {
            name: source.to_string(),
            vocab_size: r.positive("vocab_size", None)?,
            hidden_size: hidden,
            intermediate_size: r.positive("intermediate_size", None)?,
            num_hidden_layers: r.positive("num_hidden_layers", None)?,
            num_attention_heads: heads,
            num_key_value_heads: r.positive("num_key_value_heads", Some(heads))?,
            head_dim: r.positive("head_dim", Some(hidden / heads))?,
            max_position_embeddings: r.positive("max_position_embeddings", Some(32768))?,
            rope_theta,
            rms_norm_eps: r.float("rms_norm_eps", Some(1e-6))?,
            tie_word_embeddings: r.boolean("tie_word_embeddings", false)?,
            hidden_act: r.activation("hidden_act", "silu")?,
        };
        r.divisible("num_attention_heads", cfg.num_attention_heads, "num_key_value_heads", cfg.num_key_value_heads)?;
        Ok(cfg)
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act.hf_name(),
            "use_sliding_window": false,
            "attention_dropout": 0.0,
        })
    }
}

/// Clones share the weights.
#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    act: Activation,
}

/// Keys and values of past positions, per layer, for incremental decoding.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Attention mask of every position seen so far, [B, T_past].
    mask: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), mask: None }
    }
    pub fn len(&self) -> i64 {
        self.mask.as_ref().map_or(0, |m| m.size()[1])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

impl DecoderLayer {
    fn new(p: nn::Path, cfg: &Qwen2Config) -> Self {
        let d = cfg.hidden_size;
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        DecoderLayer {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", d, cfg.rms_norm_eps),
            q_proj: Linear::new(&attn / "q_proj", d, q_dim, true),
            k_proj: Linear::new(&attn / "k_proj", d, kv_dim, true),
            v_proj: Linear::new(&attn / "v_proj", d, kv_dim, true),
            o_proj: Linear::new(&attn / "o_proj", q_dim, d, false),
            post_attention_layernorm: RmsNorm::new(&p / "post_attention_layernorm", d, cfg.rms_norm_eps),
            gate_proj: Linear::new(&mlp / "gate_proj", d, cfg.intermediate_size, false),
            up_proj: Linear::new(&mlp / "up_proj", d, cfg.intermediate_size, false),
            down_proj: Linear::new(&mlp / "down_proj", cfg.intermediate_size, d, false),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            act: cfg.hidden_act,
        }
    }

    /// `mask: None` means plain causal attention (no padding, or right padding only).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let (b, t, _) = x.size3().expect("[batch, time, hidden]");
        let h = self.input_layernorm.forward(x);
        let shape = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        let q = shape(self.q_proj.forward(&h), self.heads);
        let k = shape(self.k_proj.forward(&h), self.kv_heads);
        let v = shape(self.v_proj.forward(&h), self.kv_heads);
        let q = &q * cos + rotate_half(&q) * sin;
        let mut k = &k * cos + rotate_half(&k) * sin;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let rep = self.heads / self.kv_heads;
        let y = match mask {
            // The causal kernels handle grouped KV heads natively: no repeated K/V copies.
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, rep > 1),
            Some(m) => {
                let (k, v) = if rep > 1 {
                    (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None))
                } else {
                    (k, v)
                };
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, false)
            }
        };
        let x = x + self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]));
        let h = self.post_attention_layernorm.forward(&x);
        let m = self.down_proj.forward(&(self.act.forward(&self.gate_proj.forward(&h)) * self.up_proj.forward(&h)));
        x + m
    }
}

/// Output of the decoder stack.
pub struct LmOutput {
    /// Final hidden states after the last RMSNorm, [B, T, D].
    pub last_hidden: Tensor,
    /// HF `hidden_states` when asked for: embeddings, outputs of layers 1..L−1, then the
    /// normed output of layer L (L+1 tensors).
    pub hidden_states: Vec<Tensor>,
}

pub struct LanguageModel {
    vs: nn::VarStore,
    cfg: Qwen2Config,
    tokenizer: Tokenizer,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// Activation checkpointing of the decoder layers (see [`LanguageModel::set_recompute`]).
    recompute: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LanguageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())
    }
}

impl LanguageModel {
    /// A randomly initialised decoder for `cfg` with `tokenizer`.
    pub fn new(cfg: Qwen2Config, tokenizer: Tokenizer, device: Device) -> Result<Self> {
        if tokenizer.vocab_size() as i64 > cfg.vocab_size {
            return Err(PivotError::config(
                &cfg.name,
                "vocab_size",
                format!("{} is smaller than the tokenizer's {} tokens", cfg.vocab_size, tokenizer.vocab_size()),
            ));
        }
        Ok(Self::build(nn::VarStore::new(device), cfg, tokenizer))
    }

    /// The tiny preset with the built-in word tokenizer.
    pub fn tiny(device: Device) -> Self {
        let tok = Tokenizer::tiny();
        let cfg = Qwen2Config::tiny(tok.vocab_size() as i64);
        Self::build(nn::VarStore::new(device), cfg, tok)
    }

    fn build(vs: nn::VarStore, cfg: Qwen2Config, tokenizer: Tokenizer) -> Self {
        let root = vs.root();
        let model = &root / "model";
        let embed_tokens = (&model / "embed_tokens").var("weight", &[cfg.vocab_size, cfg.hidden_size], normal_init());
        let layers_path = &model / "layers";
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::new(&layers_path / i, &cfg)).collect();
        let norm = RmsNorm::new(&model / "norm", cfg.hidden_size, cfg.rms_norm_eps);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| (&root / "lm_head").var("weight", &[cfg.vocab_size, cfg.hidden_size], normal_init()));
        let hd = cfg.head_dim;
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Float, vs.device())) / hd as f64;
        let inv_freq = Tensor::from(cfg.rope_theta as f32).to_device(vs.device()).pow(&exponents).reciprocal();
        LanguageModel { vs, cfg, tokenizer, embed_tokens, layers, norm, lm_head, inv_freq, recompute: Default::default() }
    }

    /// Loads a HF Qwen2 directory: `config.json`, `tokenizer.json` and safetensors.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let json = weights::read_json(&config_path)?;
        let cfg = match json.get("pivot_lm_config") {
            Some(c) => serde_json::from_value(c.clone())
                .map_err(|e| PivotError::config(config_path.display().to_string(), "pivot_lm_config", e))?,
            None => Qwen2Config::from_json(&json, &config_path.display().to_string())?,
        };
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, cfg, tokenizer, device)
    }

    /// `new(path, cfg)`-style constructor from an opened checkpoint (`model.*`, `lm_head.*`).
    pub fn load(ckpt: &Checkpoint, cfg: Qwen2Config, tokenizer: Tokenizer, device: Device) -> Result<Self> {
        let lm = Self::new(cfg, tokenizer, device)?;
        ckpt.load_into(&lm.vs, "")?;
        Ok(lm)
    }

    /// Writes `config.json`, `model.safetensors` and `tokenizer.json` loadable by
    /// `transformers.Qwen2ForCausalLM`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
        weights::write_safetensors(&weights::named_tensors(&self.vs, ""), &dir.join("model.safetensors"))?;
        self.tokenizer.save(dir.join("tokenizer.json"))?;
        let mut cfg = self.cfg.to_hf_json();
        cfg["eos_token_id"] = self.tokenizer.im_end.into();
        cfg["pad_token_id"] = self.tokenizer.pad.into();
        weights::write_text_atomic(&dir.join("config.json"), &serde_json::to_string_pretty(&cfg).expect("json"))?;
        Ok(())
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.cfg
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    /// Activation checkpointing: with `on`, a training forward keeps each decoder layer's input
    /// only and recomputes the layer in backward (same gradients, less memory, one more forward
    /// of the layers). Decoding with a KV cache never recomputes.
    pub fn set_recompute(&self, on: bool) {
        self.recompute.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn recomputes(&self) -> bool {
        self.recompute.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }
    pub fn set_trainable(&mut self, trainable: bool) {
        if trainable { self.vs.unfreeze() } else { self.vs.freeze() }
    }
    pub fn frozen(mut self) -> Self {
        self.vs.freeze();
        self
    }
    pub fn to_kind(mut self, kind: Kind) -> Self {
        self.vs.set_kind(kind);
        self.inv_freq = self.inv_freq.to_kind(Kind::Float);
        self
    }

    /// Token embeddings of `ids` [B, T] (negative sentinels must be replaced before calling).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, &ids.to_device(self.device()), -1, false, false)
    }

    /// Runs the decoder on input embeddings. `attention_mask` is [B, T] (1 = real token). With a
    /// cache, the new positions attend to everything cached and the cache is extended.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        output_hidden_states: bool,
        mut cache: Option<&mut KvCache>,
    ) -> Result<LmOutput> {
        let (b, t, d) = embeds
            .size3()
            .map_err(|_| PivotError::invalid(format!("embeddings must be [batch, time, hidden], got {:?}", embeds.size())))?;
        if d != self.cfg.hidden_size {
            return Err(PivotError::invalid(format!("embeddings are {d} wide, the model is {}", self.cfg.hidden_size)));
        }
        if attention_mask.size() != [b, t] {
            return Err(PivotError::invalid(format!("attention mask {:?} does not match embeddings [{b}, {t}]", attention_mask.size())));
        }
        let dev = self.device();
        let new_mask = attention_mask.to_device(dev).to_kind(Kind::Bool);
        let full_mask = match cache.as_ref().and_then(|c| c.mask.as_ref()) {
            Some(past) => Tensor::cat(&[past, &new_mask], 1),
            None => new_mask.shallow_clone(),
        };
        let t_all = full_mask.size()[1];
        let t_past = t_all - t;
        // Position = number of real tokens before this one (right or left padding alike).
        let positions = (full_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0).narrow(1, t_past, t);
        let angles = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let angles = Tensor::cat(&[&angles, &angles], -1);
        let kind = embeds.kind();
        let cos = angles.cos().to_kind(kind).unsqueeze(1);
        let sin = angles.sin().to_kind(kind).unsqueeze(1);
        // Causal and padding mask; each position may always see itself so that no softmax row is
        // empty (a fully masked row of left padding would otherwise produce NaN).
        // With right padding only (training batches), plain causal attention gives every real
        // token exactly what the padding mask would: its keys are all real. Only left padding or
        // a cache needs the explicit mask.
        let right_padded = t_past == 0
            && (t < 2 || full_mask.narrow(1, 1, t - 1).le_tensor(&full_mask.narrow(1, 0, t - 1)).all().int64_value(&[]) == 1);
        let mask = (!right_padded).then(|| {
            let q_idx = (Tensor::arange(t, (Kind::Int64, dev)) + t_past).unsqueeze(1);
            let k_idx = Tensor::arange(t_all, (Kind::Int64, dev)).unsqueeze(0);
            let causal = k_idx.le_tensor(&q_idx);
            let own = k_idx.eq_tensor(&q_idx);
            causal.unsqueeze(0).logical_and(&full_mask.unsqueeze(1)).logical_or(&own.unsqueeze(0)).unsqueeze(1)
        });

        let mut x = embeds.to_device(dev);
        let mut hidden_states = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if output_hidden_states {
                hidden_states.push(x.shallow_clone());
            }
            x = match cache.as_mut() {
                Some(c) => layer.forward(&x, &cos, &sin, mask.as_ref(), Some(&mut c.layers[i])),
                None if self.recompute.load(std::sync::atomic::Ordering::Relaxed) => {
                    let (layer, cos, sin, mask) = (layer.clone(), cos.shallow_clone(), sin.shallow_clone(), mask.as_ref().map(Tensor::shallow_clone));
                    recompute(&x, move |x| layer.forward(x, &cos, &sin, mask.as_ref(), None))
                }
                None => layer.forward(&x, &cos, &sin, mask.as_ref(), None),
            };
        }
        let last_hidden = self.norm.forward(&x);
        if output_hidden_states {
            hidden_states.push(last_hidden.shallow_clone());
        }
        if let Some(c) = cache {
            c.mask = Some(full_mask);
        }
        Ok(LmOutput { last_hidden, hidden_states })
    }

    /// Vocabulary logits of hidden states (any leading shape).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    /// Logits [B, T, V] of token ids [B, T] with an attention mask [B, T].
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let out = self.forward_embeds(&self.embed(ids), attention_mask, false, None)?;
        Ok(self.logits(&out.last_hidden))
    }

    /// Greedy decoding with a KV cache from prompt embeddings (left-padded when batched).
    /// Stops a row at any of `stop_ids`; returns the generated ids per row, without the stop id.
    pub fn generate_from_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: &Tensor,
        max_new_tokens: usize,
        stop_ids: &[i64],
    ) -> Result<Vec<Vec<i64>>> {
        tch::no_grad(|| {
            let b = embeds.size()[0];
            let mut cache = KvCache::new(self.layers.len());
            let out = self.forward_embeds(embeds, attention_mask, false, Some(&mut cache))?;
            let mut last = out.last_hidden.select(1, -1);
            let mut generated: Vec<Vec<i64>> = vec![Vec::new(); b as usize];
            let mut done = vec![false; b as usize];
            for _ in 0..max_new_tokens {
                let next = Vec::<i64>::try_from(self.logits(&last).argmax(-1, false).to_device(Device::Cpu))?;
                for (i, &tok) in next.iter().enumerate() {
                    if done[i] {
                        continue;
                    }
                    if stop_ids.contains(&tok) {
                        done[i] = true;
                    } else {
                        generated[i].push(tok);
                    }
                }
                if done.iter().all(|&d| d) {
                    break;
                }
                let ids = Tensor::from_slice(&next).view([b, 1]).to_device(self.device());
                let mask = Tensor::ones([b, 1], (Kind::Int64, self.device()));
                let out = self.forward_embeds(&self.embed(&ids), &mask, false, Some(&mut cache))?;
                last = out.last_hidden.select(1, -1);
            }
            Ok(generated)
        })
    }

    pub fn deep_clone(&self) -> Result<Self> {
        let mut copy = Self::build(nn::VarStore::new(self.device()), self.cfg.clone(), self.tokenizer.clone());
        copy.vs.set_kind(self.kind());
        copy.vs.copy(&self.vs)?;
        super::copy_trainable_flags(&self.vs, &copy.vs);
        Ok(copy)
    }

    pub fn summary(&self) -> String {
        let c = &self.cfg;
        format!(
            "LanguageModel Qwen2 `{}`: {} layers × {} wide, {} heads / {} kv heads, vocab {}, {}, {:.1}M params, {:?} on {:?}",
            c.name,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            if c.tie_word_embeddings { "tied head" } else { "untied head" },
            self.num_parameters() as f64 / 1e6,
            self.kind(),
            self.device()
        )
    }
}

impl Clone for LanguageModel {
    fn clone(&self) -> Self {
        self.deep_clone().expect("copying a language model into a fresh store of the same shape cannot fail")
    }
}
