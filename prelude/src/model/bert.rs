//! BERT (`transformers`' `BertModel`): word + position + token-type embeddings, post-LN encoder,
//! optional tanh pooler, and masked mean pooling into sentence embeddings. It serves as the
//! independent text model of the alignment study (e.g. sentence-transformers' all-MiniLM-L6-v2),
//! never the MLLM's own language model.
//!
//! [`BertModel`] is the math (config, `new`, `load`, `forward`); [`TextEncoder`] adds the file
//! I/O and the tokenizer (`tokenizer.json` through the `tokenizers` crate, with the file's
//! `[CLS] … [SEP]` template) and turns texts into one vector each.

use super::layers::{Activation, ConfigReader, LayerNorm, Linear, normal_init};
use super::weights::{self, Checkpoint};
use crate::error::{PivotError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;
use tch::{Device, Kind, Tensor, nn};

/// The fields of a HF BERT `config.json` that the forward pass uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
}

impl BertConfig {
    /// Parses a HF `config.json` of `model_type` `bert`; defaults are `transformers.BertConfig`'s.
    pub fn from_json(value: &serde_json::Value, source: &str) -> Result<Self> {
        let r = ConfigReader::new(source, value);
        let model_type = r.string("model_type", Some("bert"))?;
        if model_type != "bert" {
            return Err(PivotError::config(source, "model_type", format!("expected `bert`, found `{model_type}`")));
        }
        let position = r.string("position_embedding_type", Some("absolute"))?;
        if position != "absolute" {
            return Err(PivotError::config(
                source,
                "position_embedding_type",
                format!("only `absolute` position embeddings are supported, found `{position}`"),
            ));
        }
        let cfg = BertConfig {
            vocab_size: r.positive("vocab_size", Some(30522))?,
            hidden_size: r.positive("hidden_size", Some(768))?,
            num_hidden_layers: r.positive("num_hidden_layers", Some(12))?,
            num_attention_heads: r.positive("num_attention_heads", Some(12))?,
            intermediate_size: r.positive("intermediate_size", Some(3072))?,
            hidden_act: r.activation("hidden_act", "gelu")?,
            max_position_embeddings: r.positive("max_position_embeddings", Some(512))?,
            type_vocab_size: r.positive("type_vocab_size", Some(2))?,
            layer_norm_eps: r.float("layer_norm_eps", Some(1e-12))?,
            pad_token_id: r.int("pad_token_id", Some(0))?,
        };
        r.divisible("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_attention_heads)?;
        Ok(cfg)
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        Self::from_json(&weights::read_json(path)?, &path.display().to_string())
    }

    fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Debug)]
struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(p: nn::Path, cfg: &BertConfig) -> Self {
        Embeddings {
            word: (&p / "word_embeddings").var("weight", &[cfg.vocab_size, cfg.hidden_size], normal_init()),
            position: (&p / "position_embeddings").var("weight", &[cfg.max_position_embeddings, cfg.hidden_size], normal_init()),
            token_type: (&p / "token_type_embeddings").var("weight", &[cfg.type_vocab_size, cfg.hidden_size], normal_init()),
            norm: LayerNorm::new(&p / "LayerNorm", cfg.hidden_size, cfg.layer_norm_eps),
        }
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Tensor {
        let len = input_ids.size()[1];
        let positions = Tensor::arange(len, (Kind::Int64, input_ids.device()));
        let x = Tensor::embedding(&self.word, input_ids, -1, false, false)
            + Tensor::embedding(&self.token_type, token_type_ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false).unsqueeze(0);
        self.norm.forward(&x)
    }
}

/// One post-LN encoder layer: x ← LN(x + Attn(x)); x ← LN(x + FFN(x)).
#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: i64,
    head_dim: i64,
    act: Activation,
}

impl Layer {
    fn new(p: nn::Path, cfg: &BertConfig) -> Self {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let attention = &p / "attention";
        let this = &attention / "self";
        Layer {
            query: Linear::new(&this / "query", d, d, true),
            key: Linear::new(&this / "key", d, d, true),
            value: Linear::new(&this / "value", d, d, true),
            attention_out: Linear::new(&attention / "output" / "dense", d, d, true),
            attention_norm: LayerNorm::new(&attention / "output" / "LayerNorm", d, cfg.layer_norm_eps),
            intermediate: Linear::new(&p / "intermediate" / "dense", d, f, true),
            output: Linear::new(&p / "output" / "dense", f, d, true),
            output_norm: LayerNorm::new(&p / "output" / "LayerNorm", d, cfg.layer_norm_eps),
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            act: cfg.hidden_act,
        }
    }

    /// `mask_bias` [B, 1, 1, L]: 0 where a key may be attended, the dtype's minimum where not.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let split = |t: Tensor| t.view([b, l, self.heads, self.head_dim]).transpose(1, 2);
        let (q, k, v) = (split(self.query.forward(x)), split(self.key.forward(x)), split(self.value.forward(x)));
        let scores = q.matmul(&k.transpose(-2, -1)) / (self.head_dim as f64).sqrt() + mask_bias;
        let probs = scores.softmax(-1, Kind::Float).to_kind(x.kind());
        let context = probs.matmul(&v).transpose(1, 2).reshape([b, l, self.heads * self.head_dim]);
        let x = self.attention_norm.forward(&(self.attention_out.forward(&context) + x));
        let ffn = self.output.forward(&self.act.forward(&self.intermediate.forward(&x)));
        self.output_norm.forward(&(ffn + x))
    }
}

/// What [`BertModel::forward`] returns.
#[derive(Debug)]
pub struct BertOutput {
    /// [B, L, D] after the last layer.
    pub last_hidden_state: Tensor,
    /// The embeddings' output and every layer's, as `transformers`' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// tanh(dense(first token)), when the checkpoint has a pooler.
    pub pooler_output: Option<Tensor>,
}

pub struct BertModel {
    vs: nn::VarStore,
    cfg: BertConfig,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
}

impl std::fmt::Debug for BertModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.cfg;
        write!(
            f,
            "BertModel {} layers × {} (heads {}, FFN {}, vocab {}{})",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.vocab_size,
            if self.pooler.is_some() { ", pooler" } else { "" }
        )
    }
}

impl BertModel {
    /// A randomly initialised model (N(0, 0.02) weights) with or without the pooler.
    pub fn new(cfg: BertConfig, with_pooler: bool, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let embeddings = Embeddings::new(&root / "embeddings", &cfg);
        let layers = (0..cfg.num_hidden_layers).map(|i| Layer::new(&root / "encoder" / "layer" / i, &cfg)).collect();
        let pooler = with_pooler.then(|| Linear::new(&root / "pooler" / "dense", cfg.hidden_size, cfg.hidden_size, true));
        BertModel { vs, cfg, embeddings, layers, pooler }
    }

    /// Fills a model for `cfg` from `ckpt`, stored as `BertModel` saves it (`embeddings.*`) or
    /// under a task head's `bert.` prefix; the pooler is loaded when the checkpoint has one.
    pub fn load(ckpt: &Checkpoint, cfg: BertConfig, device: Device) -> Result<Self> {
        let probe = "embeddings.word_embeddings.weight";
        let prefix = ckpt.find_prefix(&["", "bert."], probe).ok_or_else(|| PivotError::MissingTensor {
            path: ckpt.path().to_path_buf(),
            name: probe.into(),
            expected: vec![cfg.vocab_size, cfg.hidden_size],
        })?;
        let model = Self::new(cfg, ckpt.contains(&format!("{prefix}pooler.dense.weight")), device);
        ckpt.load_into(&model.vs, prefix)?;
        Ok(model)
    }

    /// A directory with `config.json` and safetensors (single or sharded).
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = BertConfig::from_json_file(&dir.join("config.json"))?;
        Self::load(&Checkpoint::open(dir)?, cfg, device)
    }

    /// `input_ids` and `attention_mask` [B, L] (mask 1 = token, 0 = padding); `token_type_ids`
    /// [B, L] defaults to zeros. Errors name the offending input.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, token_type_ids: Option<&Tensor>) -> Result<BertOutput> {
        let size = input_ids.size();
        if size.len() != 2 || attention_mask.size() != size || token_type_ids.is_some_and(|t| t.size() != size) {
            return Err(PivotError::invalid(format!(
                "BertModel::forward: input_ids {size:?}, attention_mask {:?} and token_type_ids {:?} must all be [batch, length]",
                attention_mask.size(),
                token_type_ids.map(|t| t.size())
            )));
        }
        if size[1] > self.cfg.max_position_embeddings {
            return Err(PivotError::invalid(format!(
                "BertModel::forward: {} tokens exceed max_position_embeddings = {}",
                size[1], self.cfg.max_position_embeddings
            )));
        }
        let out_of_range = |t: &Tensor, limit: i64| t.numel() > 0 && (t.min().int64_value(&[]) < 0 || t.max().int64_value(&[]) >= limit);
        if out_of_range(input_ids, self.cfg.vocab_size) {
            return Err(PivotError::invalid(format!("BertModel::forward: input_ids outside 0..{}", self.cfg.vocab_size)));
        }
        let device = self.vs.device();
        let ids = input_ids.to_device(device);
        let types = match token_type_ids {
            Some(t) if out_of_range(t, self.cfg.type_vocab_size) => {
                return Err(PivotError::invalid(format!(
                    "BertModel::forward: token_type_ids outside 0..{}",
                    self.cfg.type_vocab_size
                )));
            }
            Some(t) => t.to_device(device),
            None => ids.zeros_like(),
        };
        let x = self.embeddings.forward(&ids, &types);
        let kind = x.kind();
        // HF's extended mask: 0 for tokens, the dtype's minimum for padding, added to the scores.
        let keep = attention_mask.to_device(device).to_kind(kind).view([size[0], 1, 1, size[1]]);
        let minimum = if kind == Kind::Double { f64::MIN } else if kind == Kind::Float { f32::MIN as f64 } else { -65504.0 };
        let mask_bias = (1.0 - keep) * minimum;
        let mut hidden_states = vec![x];
        for layer in &self.layers {
            let next = layer.forward(hidden_states.last().unwrap(), &mask_bias);
            hidden_states.push(next);
        }
        let last_hidden_state = hidden_states.last().unwrap().shallow_clone();
        let pooler_output = self.pooler.as_ref().map(|p| p.forward(&last_hidden_state.select(1, 0)).tanh());
        Ok(BertOutput { last_hidden_state, hidden_states, pooler_output })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
}

/// Mean of `hidden` [B, L, D] over the positions where `attention_mask` [B, L] is 1
/// (sentence-transformers' `pooling_mode_mean_tokens`, including its 1e-9 floor on the count).
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let mask = attention_mask.to_device(hidden.device()).to_kind(hidden.kind()).unsqueeze(-1);
    let sum = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
    sum / mask.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1e-9)
}

/// A BERT sentence encoder: tokenizer + model + masked mean pooling (+ L2 normalisation), i.e.
/// sentence-transformers' Transformer → Pooling(mean) → Normalize pipeline.
pub struct TextEncoder {
    pub model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    pad_id: i64,
    /// Longest tokenised text kept (the rest is cut before `[SEP]`): the model's position limit.
    pub max_length: usize,
    /// Unit-length outputs (all-MiniLM-L6-v2 ends with a Normalize module).
    pub normalize: bool,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextEncoder ({:?}, max {} tokens, normalize {})", self.model, self.max_length, self.normalize)
    }
}

impl TextEncoder {
    /// A model directory: `config.json`, safetensors and `tokenizer.json`. The file's fixed
    /// padding is replaced by padding to the longest text of each batch.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let model = BertModel::from_pretrained(dir, device)?;
        let file = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&file).map_err(|e| PivotError::file(&file, e))?;
        let mut tokenizer = tokenizers::Tokenizer::from_str(&text)
            .map_err(|e| PivotError::file(&file, format!("not a valid tokenizer.json: {e}")))?;
        let max_length = model.config().max_position_embeddings as usize;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| PivotError::file(&file, format!("truncation to {max_length} tokens: {e}")))?;
        let pad_id = model.config().pad_token_id;
        Ok(TextEncoder { model, tokenizer, pad_id, max_length, normalize: true })
    }

    pub fn normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    /// Token ids, attention mask and token types [N, L] of `texts`, right-padded to the longest.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor, Tensor)> {
        if texts.is_empty() {
            return Err(PivotError::invalid("TextEncoder::tokenize: no texts"));
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| PivotError::invalid(format!("tokenizing {} texts: {e}", texts.len())))?;
        let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let (mut ids, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
        for e in &encodings {
            let pad = len - e.get_ids().len();
            ids.extend(e.get_ids().iter().map(|&i| i as i64).chain(std::iter::repeat_n(self.pad_id, pad)));
            mask.extend(std::iter::repeat_n(1i64, e.get_ids().len()).chain(std::iter::repeat_n(0, pad)));
            types.extend(e.get_type_ids().iter().map(|&i| i as i64).chain(std::iter::repeat_n(0, pad)));
        }
        let shape = [texts.len() as i64, len as i64];
        Ok((Tensor::from_slice(&ids).view(shape), Tensor::from_slice(&mask).view(shape), Tensor::from_slice(&types).view(shape)))
    }

    /// One embedding per text, [N, D] on the model's device.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, mask, types) = self.tokenize(texts)?;
        let out = tch::no_grad(|| self.model.forward(&ids, &mask, Some(&types)))?;
        let pooled = mean_pool(&out.last_hidden_state, &mask);
        Ok(if self.normalize {
            let norm = pooled.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
            pooled / norm
        } else {
            pooled
        })
    }
}
