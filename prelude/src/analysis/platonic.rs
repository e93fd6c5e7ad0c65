//! Platonic alignment of an encoder (minyoungg/platonic-rep): every tower hidden state pooled per
//! image against every hidden state of a language model averaged over each caption's valid
//! tokens, prepared as platonic-rep does (clamp at the 0.95 quantile, L2-normalise), scored by
//! mutual k-NN / CKA / CKNNA on every layer pair; the report is the maximum and where it is.
//!
//! ```no_run
//! use pivot::prelude::*;
//! # fn main() -> pivot::Result<()> {
//! let world = ShapesWorld::new(ShapesConfig::default());
//! let pairs = world.image_text_pairs(Split::Val, 256);
//! let mllm = Mllm::tiny(Device::Cpu);
//! let grid = Alignment::mutual_knn(10).score(&mllm.encoder(), &mllm.lm, &pairs)?;
//! grid.heatmap()?;
//! # Ok(()) }
//! ```

use super::align::{AlignmentGrid, AlignmentMetric, OutlierClamp};
use crate::data::CaptionDataset;
use crate::error::{PivotError, Result};
use crate::model::{LanguageModel, Pooling, VisionEncoder};
use crate::probe::{FeatureExtractor, ImageSet, default_pooling};
use crate::runtime::{Progress, check_interrupt};
use tch::{Device, Kind, Tensor};

/// An alignment measurement: metric, preparation and how features are taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Alignment {
    pub metric: AlignmentMetric,
    pub clamp: OutlierClamp,
    /// Vision pooling per layer; default: `ClassToken` for CLIP (platonic-rep), `MeanPatch` for SigLIP.
    pub pooling: Option<Pooling>,
    /// Captions per LM forward (padding only changes precision, as platonic-rep notes).
    pub text_batch_size: usize,
    pub extractor: FeatureExtractor,
}

impl Alignment {
    pub fn new(metric: AlignmentMetric) -> Self {
        Alignment {
            metric,
            clamp: OutlierClamp::default(),
            pooling: None,
            text_batch_size: 16,
            extractor: FeatureExtractor::default(),
        }
    }
    /// platonic-rep's default metric (k = 10).
    pub fn mutual_knn(k: i64) -> Self {
        Self::new(AlignmentMetric::MutualKnn { k })
    }
    pub fn cka() -> Self {
        Self::new(AlignmentMetric::Cka)
    }
    pub fn unbiased_cka() -> Self {
        Self::new(AlignmentMetric::UnbiasedCka)
    }
    pub fn cknna(k: i64) -> Self {
        Self::new(AlignmentMetric::Cknna { k })
    }
    pub fn clamp(mut self, clamp: OutlierClamp) -> Self {
        self.clamp = clamp;
        self
    }
    pub fn pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = Some(pooling);
        self
    }
    pub fn extractor(mut self, extractor: FeatureExtractor) -> Self {
        self.extractor = extractor;
        self
    }

    /// Every-layer vision features [N, L+1, D] of `images` (cached like probe features).
    pub fn vision_features<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, images: &D) -> Result<Tensor> {
        let pooling = self.pooling.unwrap_or_else(|| default_pooling(encoder));
        Ok(self.extractor.extract_all_layers(encoder, images, pooling)?.x)
    }

    /// Tower layers × LM hidden states on image–caption pairs.
    pub fn score(&self, encoder: &VisionEncoder, lm: &LanguageModel, pairs: &CaptionDataset) -> Result<AlignmentGrid> {
        self.check_n(pairs.len())?;
        let v = self.vision_features(encoder, pairs)?;
        let captions: Vec<&str> = pairs.samples.iter().map(|s| s.caption.as_str()).collect();
        let t = language_features(lm, &captions, self.text_batch_size)?;
        Ok(AlignmentGrid::compute(&v, &t, self.metric, self.clamp)?
            .with_labels(format!("{} vision layer", encoder.label()), format!("{} hidden state", lm.config().name)))
    }

    /// Tower layers of `a` × tower layers of `b` on the same images (e.g. DPO tower vs a reference
    /// vision model).
    pub fn score_encoders<D: ImageSet + ?Sized>(&self, a: &VisionEncoder, b: &VisionEncoder, images: &D) -> Result<AlignmentGrid> {
        self.check_n(images.num_images())?;
        let (fa, fb) = (self.vision_features(a, images)?, self.vision_features(b, images)?);
        Ok(AlignmentGrid::compute(&fa, &fb, self.metric, self.clamp)?
            .with_labels(format!("{} layer", a.label()), format!("{} layer", b.label())))
    }

    /// Any two per-layer feature tensors [N, La, Da] × [N, Lb, Db] of the same samples.
    pub fn score_features(&self, a: &Tensor, b: &Tensor) -> Result<AlignmentGrid> {
        AlignmentGrid::compute(a, b, self.metric, self.clamp)
    }

    fn check_n(&self, n: usize) -> Result<()> {
        let k = match self.metric {
            AlignmentMetric::MutualKnn { k } | AlignmentMetric::Cknna { k } => k,
            AlignmentMetric::Cka | AlignmentMetric::UnbiasedCka => 3,
        };
        if (n as i64) <= k {
            return Err(PivotError::invalid(format!("alignment: {n} pairs are too few for {} (need more than {k})", self.metric.name())));
        }
        Ok(())
    }
}

/// Mean over valid tokens of every LM hidden state (embeddings, every layer, the last one after
/// the final norm), per text: [N, L+1, D] f32 on the LM's device. Texts are tokenised with the
/// LM's tokenizer and batched with right padding and an attention mask.
pub fn language_features(lm: &LanguageModel, texts: &[&str], batch_size: usize) -> Result<Tensor> {
    if texts.is_empty() {
        return Err(PivotError::invalid("language features: no texts"));
    }
    let dev = lm.device();
    let pad = lm.tokenizer().pad;
    let bs = batch_size.max(1);
    let mut progress = Progress::new(format!("LM features · {}", lm.config().name), texts.len() as u64);
    let mut parts = Vec::with_capacity(texts.len().div_ceil(bs));
    for (b, chunk) in texts.chunks(bs).enumerate() {
        check_interrupt("language features")?;
        let ids: Vec<Vec<i64>> = chunk.iter().map(|t| lm.tokenizer().encode(t)).collect::<Result<_>>()?;
        if let Some(i) = ids.iter().position(|v| v.is_empty()) {
            return Err(PivotError::invalid(format!("language features: text {} tokenises to nothing", b * bs + i)));
        }
        let t = ids.iter().map(Vec::len).max().unwrap_or(1);
        let mut flat = Vec::with_capacity(chunk.len() * t);
        let mut mask = Vec::with_capacity(chunk.len() * t);
        for v in &ids {
            flat.extend(v.iter().copied().chain(std::iter::repeat_n(pad, t - v.len())));
            mask.extend((0..t).map(|i| (i < v.len()) as i64));
        }
        let shape = [chunk.len() as i64, t as i64];
        let ids = Tensor::from_slice(&flat).view(shape).to_device(dev);
        let mask = Tensor::from_slice(&mask).view(shape).to_device(dev);
        let pooled = tch::no_grad(|| -> Result<Tensor> {
            let out = lm.forward_embeds(&lm.embed(&ids), &mask, true, None)?;
            let m = mask.to_kind(Kind::Float).unsqueeze(-1);
            let denom = m.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
            let layers: Vec<Tensor> = out
                .hidden_states
                .iter()
                .map(|h| (h.to_kind(Kind::Float) * &m).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / &denom)
                .collect();
            Ok(Tensor::stack(&layers, 1))
        })?;
        parts.push(pooled.to_device(Device::Cpu));
        progress.set(((b + 1) * bs).min(texts.len()) as u64, "");
    }
    progress.finish();
    Ok(Tensor::cat(&parts, 0).to_device(dev))
}
