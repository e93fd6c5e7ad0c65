//! The LLaVA-style MLLM: vision tower → `mlp2x_gelu` projector → Qwen2, with LLaVA splicing
//! (one `<image>` placeholder becomes N projected tokens whose labels are ignored) and the ChatML
//! template of PIVOT's `qwen_1_5` conversation mode.
//!
//! Training objectives only need log-probabilities of answer tokens, so [`Mllm::answer_token_logps`]
//! runs the vocabulary head on those positions alone instead of materialising [B, T, V] logits.

use super::encoder::{Provenance, Stage, VisionEncoder};
use super::projector::{Projector, ProjectorConfig};
use super::qwen2::{LanguageModel, Qwen2Config};
use super::batch::{Batcher, Encoded, IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use super::tokenizer::{DEFAULT_SYSTEM_PROMPT, Tokenizer};
use super::vision::{FeatureSelect, VisionConfig, VisionFamily, VisionTower};
use super::weights::{self, Checkpoint};
use crate::error::{PivotError, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MllmConfig {
    /// Hidden-state index of the tower fed to the projector (−2: PIVOT / LLaVA).
    pub select_layer: i64,
    /// Drop the class token (and registers): LLaVA's `patch` feature; no effect on SigLIP.
    pub drop_class_token: bool,
    /// Apply the tower's final norm to that layer; None: PIVOT's choice for the tower's family
    /// (DINOv2 and the ViTs feed their normed last layer, CLIP/SigLIP an inner layer as it is).
    #[serde(default)]
    pub final_norm: Option<bool>,
    /// Resample the patch tokens bilinearly to this many (PIVOT's DINOv2 `-interp576`).
    #[serde(default)]
    pub resample_tokens: Option<i64>,
    /// Keep DINOv2's register tokens when the class token is dropped.
    #[serde(default)]
    pub keep_register_tokens: bool,
    /// Sequences are truncated to this many tokens after splicing (LLaVA: 2048).
    pub max_length: usize,
    pub system_prompt: String,
}

impl Default for MllmConfig {
    fn default() -> Self {
        MllmConfig {
            select_layer: -2,
            drop_class_token: true,
            final_norm: None,
            resample_tokens: None,
            keep_register_tokens: false,
            max_length: 2048,
            system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
        }
    }
}

impl MllmConfig {
    /// PIVOT's feature choice for a tower of `cfg`'s family ([`FeatureSelect::pivot`]); the
    /// default config is CLIP/SigLIP's.
    pub fn for_tower(cfg: &VisionConfig) -> Self {
        MllmConfig::default().with_select(FeatureSelect::pivot(cfg))
    }

    /// The same config reading the tokens `select` names.
    pub fn with_select(self, select: FeatureSelect) -> Self {
        MllmConfig {
            select_layer: select.layer,
            drop_class_token: select.drop_class_token,
            final_norm: Some(select.final_norm),
            resample_tokens: select.resample_tokens,
            keep_register_tokens: select.keep_register_tokens,
            ..self
        }
    }
}

/// Result of a forward pass up to the final hidden states.
pub struct MllmOutput {
    /// Final (normed) hidden states [B, T, D].
    pub hidden: Tensor,
    /// Labels after splicing and padding [B, T] (image and prompt positions are −100).
    pub labels: Tensor,
    /// [B, T], 1 for real positions.
    pub attention_mask: Tensor,
    /// Projector output [B_images, N, D] — the tensor PIVOT's gradient maps differentiate.
    pub image_tokens: Tensor,
}

pub struct Mllm {
    pub tower: VisionTower,
    pub projector: Projector,
    pub lm: LanguageModel,
    pub config: MllmConfig,
    pub provenance: Provenance,
}

impl std::fmt::Debug for Mllm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary())
    }
}

impl Mllm {
    /// Assembles tower and LM with a freshly initialised projector on the LM's device.
    pub fn new(tower: VisionTower, lm: LanguageModel, config: MllmConfig) -> Self {
        let projector = Projector::mlp2x_gelu(tower.config().hidden_size, lm.config().hidden_size, lm.device());
        let provenance = Provenance::new(Stage::Random, tower.config().name.clone(), lm.config().name.clone());
        let tower = if tower.device() != lm.device() { tower.to_device(lm.device()) } else { tower };
        Mllm { tower, projector, lm, config, provenance }
    }

    /// Tiny tower + tiny LM with the built-in vocabulary: the embedded default.
    pub fn tiny(device: Device) -> Self {
        Self::new(VisionTower::new(VisionConfig::tiny(), device), LanguageModel::tiny(device), MllmConfig::default())
    }

    pub fn device(&self) -> Device {
        self.lm.device()
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        self.lm.tokenizer()
    }
    pub fn feature_select(&self) -> FeatureSelect {
        let c = &self.config;
        FeatureSelect {
            layer: c.select_layer,
            drop_class_token: c.drop_class_token,
            keep_register_tokens: c.keep_register_tokens,
            final_norm: c.final_norm.unwrap_or_else(|| FeatureSelect::pivot(self.tower.config()).final_norm),
            resample_tokens: c.resample_tokens,
        }
    }
    /// Image tokens per image after the projector.
    pub fn image_token_count(&self) -> i64 {
        self.tower.feature_token_count(self.feature_select())
    }
    /// The patch grid of the image tokens (the tower's, or the resampled one).
    pub fn image_token_grid(&self) -> (i64, i64) {
        match self.config.resample_tokens {
            Some(n) => {
                let side = (n as f64).sqrt().round() as i64;
                (side, side)
            }
            None => (self.tower.config().grid(), self.tower.config().grid()),
        }
    }

    /// What turns samples into model inputs (tokenizer, chat template, image processor), apart
    /// from the model so that it can run on another thread.
    pub fn batcher(&self) -> Batcher<'_> {
        Batcher {
            tokenizer: self.tokenizer(),
            system_prompt: &self.config.system_prompt,
            processor: self.tower.processor(),
            device: self.device(),
        }
    }

    /// The tower's preprocessing on a batch of images → [B, 3, S, S] on the model's device.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor> {
        Ok(self.batcher().pixels(images)?.to_device(self.device()))
    }

    /// Tower features → projector: [B, N, D_lm].
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let feats = self.tower.features(pixels, self.feature_select())?;
        Ok(self.projector.forward(&feats.to_kind(self.projector.kind())).to_kind(self.lm.kind()))
    }

    /// ChatML prompt (system, user turn with the image first, assistant header) and, with an
    /// answer, the answer followed by `<|im_end|>`. Only the answer and its `<|im_end|>` carry
    /// labels: the end token is what teaches the model to stop.
    pub fn encode_chat(&self, question: &str, answer: Option<&str>) -> Result<Encoded> {
        self.batcher().encode_chat(question, answer)
    }

    /// LLaVA's `plain` template for stage-1 captions: `<image>` caption "\n", loss on the caption.
    pub fn encode_caption(&self, caption: &str) -> Result<Encoded> {
        self.batcher().encode_caption(caption)
    }

    /// Splices projected image tokens into token embeddings. `image_of[b]` names the row of
    /// `image_tokens` that sequence b shows, so several sequences can share one encoding.
    /// Returns (embeddings [B,T,D], attention mask [B,T], labels [B,T]), right-padded.
    pub fn splice(&self, seqs: &[Encoded], image_tokens: &Tensor, image_of: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        if seqs.is_empty() || seqs.len() != image_of.len() {
            return Err(PivotError::invalid(format!("{} sequences but {} image indices", seqs.len(), image_of.len())));
        }
        let n_images = image_tokens.size()[0];
        let n_tok = image_tokens.size()[1];
        let dev = self.device();
        let pad = self.tokenizer().pad;
        let max_text = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0) as i64;
        let mut flat_ids = Vec::with_capacity(seqs.len() * max_text as usize);
        for s in seqs {
            flat_ids.extend(s.ids.iter().map(|&i| if i < 0 { pad } else { i }));
            flat_ids.extend(std::iter::repeat_n(pad, max_text as usize - s.ids.len()));
        }
        let text = self.lm.embed(&Tensor::from_slice(&flat_ids).view([seqs.len() as i64, max_text]).to_device(dev));
        let max_len = self.config.max_length as i64;
        let mut rows = Vec::with_capacity(seqs.len());
        let mut label_rows: Vec<Vec<i64>> = Vec::with_capacity(seqs.len());
        for (b, (s, &img)) in seqs.iter().zip(image_of).enumerate() {
            let places: Vec<usize> = s.ids.iter().enumerate().filter(|(_, i)| **i == IMAGE_TOKEN_INDEX).map(|(k, _)| k).collect();
            if places.len() != 1 {
                return Err(PivotError::invalid(format!(
                    "sequence {b} has {} image placeholders; exactly one is supported",
                    places.len()
                )));
            }
            if img as i64 >= n_images {
                return Err(PivotError::invalid(format!("sequence {b} shows image {img}, but only {n_images} were encoded")));
            }
            let k = places[0] as i64;
            let len = s.ids.len() as i64;
            let row = text.get(b as i64);
            let emb = Tensor::cat(&[row.narrow(0, 0, k), image_tokens.get(img as i64), row.narrow(0, k + 1, len - k - 1)], 0);
            let mut labels = s.labels[..k as usize].to_vec();
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, n_tok as usize));
            labels.extend(&s.labels[k as usize + 1..]);
            let keep = (emb.size()[0]).min(max_len);
            labels.truncate(keep as usize);
            rows.push(emb.narrow(0, 0, keep));
            label_rows.push(labels);
        }
        let t = rows.iter().map(|r| r.size()[0]).max().unwrap_or(0);
        let d = text.size()[2];
        let mut padded = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len() * t as usize);
        let mut labels = Vec::with_capacity(rows.len() * t as usize);
        for (r, l) in rows.iter().zip(&label_rows) {
            let len = r.size()[0];
            padded.push(if len < t { Tensor::cat(&[r, &r.new_zeros([t - len, d], (r.kind(), dev))], 0) } else { r.shallow_clone() });
            mask.extend((0..t).map(|i| (i < len) as i64));
            labels.extend(l.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, (t - len) as usize)));
        }
        let b = rows.len() as i64;
        Ok((
            Tensor::stack(&padded, 0),
            Tensor::from_slice(&mask).view([b, t]).to_device(dev),
            Tensor::from_slice(&labels).view([b, t]).to_device(dev),
        ))
    }

    /// Forward from already projected image tokens (lets a trainer encode an image once and
    /// share it, and lets gradient maps differentiate with respect to `image_tokens`).
    pub fn forward_image_tokens(&self, image_tokens: Tensor, seqs: &[Encoded], image_of: &[usize]) -> Result<MllmOutput> {
        let (embeds, attention_mask, labels) = self.splice(seqs, &image_tokens, image_of)?;
        let out = self.lm.forward_embeds(&embeds, &attention_mask, false, None)?;
        Ok(MllmOutput { hidden: out.last_hidden, labels, attention_mask, image_tokens })
    }

    /// Full forward: encode `pixels` [B_images, 3, S, S], splice, run the LM.
    pub fn forward(&self, pixels: &Tensor, seqs: &[Encoded], image_of: &[usize]) -> Result<MllmOutput> {
        let image_tokens = self.encode_images(pixels)?;
        self.forward_image_tokens(image_tokens, seqs, image_of)
    }

    /// Full vocabulary logits [B, T, V] (for inspection; training uses the answer positions only).
    pub fn logits(&self, out: &MllmOutput) -> Tensor {
        self.lm.logits(&out.hidden)
    }

    /// Log-probabilities (fp32) of every labelled token, with the row each belongs to: position t
    /// predicts label t+1. Only labelled positions go through the vocabulary head.
    pub fn answer_token_logps(&self, out: &MllmOutput) -> Result<(Tensor, Tensor)> {
        let (b, t, d) = out.hidden.size3()?;
        if t < 2 {
            return Err(PivotError::invalid("sequences must have at least two positions"));
        }
        let hidden = out.hidden.narrow(1, 0, t - 1).reshape([b * (t - 1), d]);
        let targets = out.labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
        let idx = targets.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
        let logits = self.lm.logits(&hidden.index_select(0, &idx)).to_kind(Kind::Float);
        let logp = logits.log_softmax(-1, Kind::Float).gather(1, &targets.index_select(0, &idx).unsqueeze(1), false).squeeze_dim(1);
        Ok((logp, idx.divide_scalar_mode(t - 1, "floor")))
    }

    /// Summed answer log-probability per sequence [B] in fp32 (DPO's `logp(y|x)`).
    pub fn sequence_logps(&self, out: &MllmOutput) -> Result<Tensor> {
        let (logp, rows) = self.answer_token_logps(out)?;
        let b = out.hidden.size()[0];
        Ok(Tensor::zeros([b], (Kind::Float, logp.device())).index_add(0, &rows, &logp))
    }

    /// Token-mean cross-entropy over all labelled tokens of the batch (HF causal-LM loss).
    pub fn answer_loss(&self, out: &MllmOutput) -> Result<Tensor> {
        let (logp, _) = self.answer_token_logps(out)?;
        if logp.numel() == 0 {
            return Err(PivotError::invalid("the batch has no labelled tokens"));
        }
        Ok(-logp.mean(Kind::Float))
    }

    /// Greedy answers to one question per image, batched with left padding and a KV cache.
    pub fn answer_batch(&self, images: &[RgbImage], questions: &[&str], max_new_tokens: usize) -> Result<Vec<String>> {
        if images.len() != questions.len() {
            return Err(PivotError::invalid(format!("{} images but {} questions", images.len(), questions.len())));
        }
        tch::no_grad(|| {
            let pixels = self.preprocess(images)?;
            let seqs: Vec<Encoded> = questions.iter().map(|q| self.encode_chat(q, None)).collect::<Result<_>>()?;
            let image_of: Vec<usize> = (0..seqs.len()).collect();
            let (embeds, mask, _) = self.splice(&seqs, &self.encode_images(&pixels)?, &image_of)?;
            let (embeds, mask) = left_align(&embeds, &mask);
            let stop = [self.tokenizer().im_end, self.tokenizer().pad];
            let ids = self.lm.generate_from_embeds(&embeds, &mask, max_new_tokens, &stop)?;
            ids.iter().map(|i| Ok(self.tokenizer().decode(i)?.trim().to_string())).collect()
        })
    }

    /// Greedy answer to one question about one image.
    pub fn answer(&self, image: &RgbImage, question: &str, max_new_tokens: usize) -> Result<String> {
        Ok(self.answer_batch(std::slice::from_ref(image), &[question], max_new_tokens)?.remove(0))
    }

    /// The tower, copied out with its provenance (training this MLLM further leaves it as is).
    pub fn encoder(&self) -> VisionEncoder {
        let mut tower = self.tower.clone();
        tower.set_trainable(false);
        VisionEncoder::new(tower, self.provenance.clone(), self.feature_select())
    }

    /// Casts every part's weights (e.g. `Kind::BFloat16` on CUDA). Norms, softmax and the
    /// answer log-probabilities stay in fp32 whatever the weights are.
    pub fn to_kind(self, kind: Kind) -> Self {
        Mllm { tower: self.tower.to_kind(kind), projector: self.projector.to_kind(kind), lm: self.lm.to_kind(kind), ..self }
    }

    /// Freezes or unfreezes each part.
    pub fn set_trainable(&mut self, tower: bool, projector: bool, lm: bool) {
        self.tower.set_trainable(tower);
        self.projector.set_trainable(projector);
        self.lm.set_trainable(lm);
    }

    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Mllm {
            tower: self.tower.deep_clone()?,
            projector: self.projector.deep_clone()?,
            lm: self.lm.deep_clone()?,
            config: self.config.clone(),
            provenance: self.provenance.clone(),
        })
    }

    /// Writes the MLLM in the PIVOT / LLaVA-OneVision layout: Qwen2 keys at the top level, the
    /// tower under `model.vision_tower.vision_tower.` (only the layers the projector reads, as
    /// PIVOT stores it), the projector under `model.mm_projector.`, plus `tokenizer.json` and a
    /// `config.json` with the LLaVA fields and our exact configs.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
        let used = self.tower.resolve_layer(self.config.select_layer)?;
        let mut tensors = weights::named_tensors(self.lm.var_store(), "");
        tensors.extend(
            self.tower.mllm_state_dict(used)?.into_iter().map(|(n, t)| (format!("model.vision_tower.vision_tower.{n}"), t)),
        );
        tensors.extend(weights::named_tensors(self.projector.var_store(), "model.mm_projector."));
        weights::write_safetensors(&tensors, &dir.join("model.safetensors"))?;
        self.tokenizer().save(dir.join("tokenizer.json"))?;

        let mut vcfg = self.tower.config().clone();
        vcfg.num_hidden_layers = used as i64;
        vcfg.use_head = false;
        vcfg.use_pooler = false;
        if let Some(t) = vcfg.timm.as_mut() {
            t.num_classes = 0;
        }
        let mut mcfg = self.config.clone();
        mcfg.select_layer = used as i64;
        let mut cfg = self.lm.config().to_hf_json();
        let o = cfg.as_object_mut().expect("object");
        o.insert("architectures".into(), serde_json::json!(["LlavaQwenForCausalLM"]));
        o.insert("model_type".into(), "llava_qwen".into());
        o.insert("mm_vision_tower".into(), self.tower.config().name.clone().into());
        o.insert("mm_hidden_size".into(), self.tower.config().hidden_size.into());
        o.insert("mm_projector_type".into(), "mlp2x_gelu".into());
        o.insert("mm_vision_select_layer".into(), self.config.select_layer.into());
        o.insert("mm_vision_select_feature".into(), (if self.config.drop_class_token { "patch" } else { "cls_patch" }).into());
        o.insert("image_aspect_ratio".into(), "square".into());
        o.insert("tokenizer_model_max_length".into(), self.config.max_length.into());
        o.insert("eos_token_id".into(), self.tokenizer().im_end.into());
        o.insert("pad_token_id".into(), self.tokenizer().pad.into());
        o.insert("pivot_vision_config".into(), serde_json::to_value(&vcfg).expect("json"));
        o.insert("pivot_lm_config".into(), serde_json::to_value(self.lm.config()).expect("json"));
        o.insert("pivot_mllm_config".into(), serde_json::to_value(&mcfg).expect("json"));
        o.insert("pivot_provenance".into(), serde_json::to_value(&self.provenance).expect("json"));
        weights::write_text_atomic(&dir.join("config.json"), &serde_json::to_string_pretty(&cfg).expect("json"))
    }

    /// Loads an MLLM saved by [`Mllm::save_pretrained`] or by PIVOT / LLaVA-OneVision (Qwen). For
    /// foreign checkpoints the tower shape comes from `mm_vision_tower` (a preset name such as
    /// `google/siglip2-so400m-patch16-384`, or a local tower directory); a tower stored without
    /// its last layer feeds the projector from its last stored layer, as PIVOT does.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let source = config_path.display().to_string();
        let json = weights::read_json(&config_path)?;
        let ckpt = Checkpoint::open(dir)?;
        let field = |name: &str| json.get(name).filter(|v| !v.is_null());
        let parse = |name: &str| -> Result<Option<serde_json::Value>> { Ok(field(name).cloned()) };

        let lm_cfg: Qwen2Config = match parse("pivot_lm_config")? {
            Some(v) => serde_json::from_value(v).map_err(|e| PivotError::config(&source, "pivot_lm_config", e))?,
            None => {
                let mut j = json.clone();
                j["model_type"] = "qwen2".into();
                Qwen2Config::from_json(&j, &source)?
            }
        };
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
        let lm = LanguageModel::load(&ckpt, lm_cfg, tokenizer, device)?;

        let mut foreign_select = None;
        let vcfg: VisionConfig = match parse("pivot_vision_config")? {
            Some(v) => serde_json::from_value(v).map_err(|e| PivotError::config(&source, "pivot_vision_config", e))?,
            None => {
                let name = field("mm_vision_tower")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| PivotError::config(&source, "mm_vision_tower", "missing: cannot tell which tower this is"))?;
                let local = Path::new(name).join("config.json");
                if local.is_file() {
                    VisionConfig::from_json_file(&local)?
                } else {
                    let (vcfg, select) = VisionConfig::from_pivot_name(name).map_err(|_| {
                        PivotError::config(
                            &source,
                            "mm_vision_tower",
                            format!("`{name}` is neither a known preset nor a local directory with config.json"),
                        )
                    })?;
                    foreign_select = Some(select);
                    vcfg
                }
            }
        };
        let declared_layers = vcfg.num_hidden_layers;
        let tower = VisionTower::load(&ckpt, vcfg, device)?;
        let truncated = (tower.num_layers() as i64) < declared_layers;

        let config: MllmConfig = match parse("pivot_mllm_config")? {
            Some(v) => serde_json::from_value(v).map_err(|e| PivotError::config(&source, "pivot_mllm_config", e))?,
            None => {
                let r = super::layers::ConfigReader::new(&source, &json);
                let feature = r.string("mm_vision_select_feature", Some("patch"))?;
                let base = MllmConfig {
                    select_layer: if truncated { -1 } else { r.int("mm_vision_select_layer", Some(-2))? },
                    drop_class_token: feature == "patch",
                    max_length: r.positive("tokenizer_model_max_length", Some(2048))? as usize,
                    system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
                    ..MllmConfig::default()
                };
                // PIVOT's DINOv2 / MAE / MoCo / supervised wrappers ignore mm_vision_select_layer.
                let family = tower.config().family;
                match foreign_select {
                    Some(s) if !matches!(family, VisionFamily::Clip | VisionFamily::Siglip) => {
                        base.with_select(FeatureSelect { drop_class_token: feature == "patch", ..s })
                    }
                    _ => base,
                }
            }
        };
        if let Some(t) = field("mm_projector_type").and_then(|v| v.as_str()) {
            if t != "mlp2x_gelu" {
                return Err(PivotError::config(&source, "mm_projector_type", format!("`{t}` is not supported (only mlp2x_gelu)")));
            }
        }
        let pcfg = ProjectorConfig { vision_hidden_size: tower.config().hidden_size, lm_hidden_size: lm.config().hidden_size };
        let projector = Projector::load(&ckpt, pcfg, "model.mm_projector.", device)?;
        let provenance = match parse("pivot_provenance")? {
            Some(v) => serde_json::from_value(v).map_err(|e| PivotError::config(&source, "pivot_provenance", e))?,
            None => Provenance::new(Stage::Pretrained, tower.config().name.clone(), dir.display().to_string()),
        };
        Ok(Mllm { tower, projector, lm, config, provenance })
    }

    pub fn summary(&self) -> String {
        format!(
            "Mllm [{}]\n  {}\n  {:?}\n  {}\n  features: hidden state {} ({} tokens per image), max length {}",
            self.provenance.label(),
            self.tower.summary(),
            self.projector,
            self.lm.summary(),
            self.config.select_layer,
            self.image_token_count(),
            self.config.max_length
        )
    }
}

impl Clone for Mllm {
    fn clone(&self) -> Self {
        self.deep_clone().expect("copying an MLLM into fresh stores of the same shape cannot fail")
    }
}

/// Moves right padding to the left (for generation: every row then ends at its last real token).
fn left_align(embeds: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let (b, t, _) = embeds.size3().expect("[B, T, D]");
    let lens = Vec::<i64>::try_from(mask.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu)).unwrap_or_default();
    let mut rows = Vec::with_capacity(b as usize);
    let mut masks = Vec::with_capacity(b as usize);
    for (i, &len) in lens.iter().enumerate() {
        let shift = t - len;
        rows.push(embeds.get(i as i64).roll([shift], [0]));
        masks.push(mask.get(i as i64).roll([shift], [0]));
    }
    (Tensor::stack(&rows, 0), Tensor::stack(&masks, 0))
}
