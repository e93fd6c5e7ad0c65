//! Probes on a [`VisionEncoder`]: the tensor-level probes of this module wired to feature
//! extraction, with results that carry the encoder's provenance so that `Runs` rows are keyed by
//! it (base / SFT / DPO, LM, seed).
//!
//! ```no_run
//! use pivot::prelude::*;
//! # fn main() -> pivot::Result<()> {
//! let world = ShapesWorld::new(ShapesConfig::default());
//! let (train, val) = (world.classification(Split::Train, 600), world.classification(Split::Val, 120));
//! let enc = Mllm::tiny(Device::Cpu).encoder();
//! let lp = LinearProbe::default().fit(&enc, &train, &val)?;                  // layer/pooling: defaults
//! let lp2 = LinearProbe::default().on(FeatureSpec::default().layer(-1)).fit(&enc, &train, &val)?;
//! let seg = SegProbe::dense().fit(&enc, &world.segmentation(Split::Train, 64), &world.segmentation(Split::Val, 16))?;
//! let runs = Runs::from([&lp, &lp2]);
//! # Ok(()) }
//! ```

use super::features::{FeatureExtractor, mask_tensor};
use super::linear::{FeatureSet, LinearProbe, ProbeReport, SgdLinearProbe};
use super::seg::{DenseSegProbe, DenseSegReport, PatchSegProbe, PatchSegReport};
use crate::data::{ClassificationDataset, SegDataset};
use crate::error::{PivotError, Result};
use crate::model::{Pooling, Provenance, VisionEncoder};
use crate::plot::{Figure, Metrics, Runs, seg_comparison};
use crate::runtime::{MimeBundle, Rich, html_escape};
use std::fmt;
use tch::{Kind, Tensor};

/// Which layer and pooling a probe reads, and how features are extracted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeatureSpec {
    /// Hidden-state index (negative from the end); default: the layer the MLLM consumed
    /// (`encoder.select().layer`).
    pub layer: Option<i64>,
    /// Default: `ClassToken` for towers with a class token (CLIP), `MeanPatch` otherwise (SigLIP).
    pub pooling: Option<Pooling>,
    pub extractor: FeatureExtractor,
}

impl FeatureSpec {
    pub fn layer(mut self, layer: i64) -> Self {
        self.layer = Some(layer);
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
    /// (resolved hidden-state index, pooling) for this encoder.
    pub fn resolve(&self, encoder: &VisionEncoder) -> Result<(usize, Pooling)> {
        let layer = encoder.tower().resolve_layer(self.layer.unwrap_or(encoder.select().layer))?;
        Ok((layer, self.pooling.unwrap_or_else(|| default_pooling(encoder))))
    }
}

/// CLS for CLIP (the CLIP linear-probe protocol), mean of patch tokens for towers without one.
pub fn default_pooling(encoder: &VisionEncoder) -> Pooling {
    if encoder.tower().config().has_class_token() { Pooling::ClassToken } else { Pooling::MeanPatch }
}

/// A result that knows which encoder it measured: its provenance columns key `Runs` rows.
pub trait Keyed: Metrics {
    fn keys(&self) -> Vec<(String, String)>;
    fn seed(&self) -> Option<i64>;
}

fn provenance_keys(p: &Provenance) -> Vec<(String, String)> {
    vec![
        ("encoder".into(), p.label()),
        ("stage".into(), p.stage.to_string()),
        ("tower".into(), p.tower.clone()),
        ("lm".into(), p.lm.clone()),
    ]
}

impl Runs {
    /// Adds a row keyed by the result's encoder provenance (and probe settings).
    pub fn add_keyed(&mut self, result: &dyn Keyed) -> &mut Self {
        let keys = result.keys();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.add_metrics(&pairs, result.seed(), &result.metrics())
    }
}

impl<'a, T: Keyed> FromIterator<&'a T> for Runs {
    fn from_iter<I: IntoIterator<Item = &'a T>>(iter: I) -> Self {
        let mut runs = Runs::new();
        for r in iter {
            runs.add_keyed(r);
        }
        runs
    }
}

impl<'a, T: Keyed, const N: usize> From<[&'a T; N]> for Runs {
    fn from(results: [&'a T; N]) -> Self {
        results.into_iter().collect()
    }
}

/// A classification probe's report on an encoder's features. Dereferences to [`ProbeReport`].
#[derive(Debug, Clone)]
pub struct EncoderProbeReport {
    pub provenance: Provenance,
    /// Resolved hidden-state index (`None` for the MAP head).
    pub layer: Option<usize>,
    pub pooling: Pooling,
    pub report: ProbeReport,
}

impl EncoderProbeReport {
    pub fn encoder(&self) -> String {
        self.provenance.label()
    }
    fn header(&self) -> String {
        let layer = self.layer.map_or("MAP head".to_string(), |l| format!("layer {l}"));
        format!("{} · {layer} · {:?}", self.provenance.label(), self.pooling)
    }
}

impl std::ops::Deref for EncoderProbeReport {
    type Target = ProbeReport;
    fn deref(&self) -> &ProbeReport {
        &self.report
    }
}

impl fmt::Display for EncoderProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:>14}: {}", "encoder", self.header())?;
        write!(f, "{}", self.report)
    }
}

impl Rich for EncoderProbeReport {
    fn mime_bundle(&self) -> MimeBundle {
        let html = format!("<div><b>{}</b>{}</div>", html_escape(&self.header()), self.report.to_html());
        MimeBundle::text(self.to_string()).with_html(html)
    }
}

impl Metrics for EncoderProbeReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        self.report.metrics()
    }
}

impl Keyed for EncoderProbeReport {
    fn keys(&self) -> Vec<(String, String)> {
        let mut k = provenance_keys(&self.provenance);
        k.push(("probe".into(), self.report.method.clone()));
        k.push(("layer".into(), self.layer.map_or("head".into(), |l| l.to_string())));
        k.push(("pooling".into(), format!("{:?}", self.pooling)));
        k
    }
    fn seed(&self) -> Option<i64> {
        self.provenance.seed.map(|s| s as i64)
    }
}

fn labels(data: &ClassificationDataset) -> Tensor {
    let v: Vec<i64> = data.samples.iter().map(|s| s.label as i64).collect();
    Tensor::from_slice(&v)
}

fn class_features(
    spec: &FeatureSpec,
    encoder: &VisionEncoder,
    train: &ClassificationDataset,
    val: &ClassificationDataset,
) -> Result<(FeatureSet, FeatureSet, Option<usize>, Pooling)> {
    if train.is_empty() || val.is_empty() {
        return Err(PivotError::invalid(format!(
            "linear probe: train has {} and val {} samples; both must be non-empty",
            train.len(),
            val.len()
        )));
    }
    let (layer, pooling) = spec.resolve(encoder)?;
    if matches!(pooling, Pooling::Tokens | Pooling::PatchTokens) {
        return Err(PivotError::invalid("a linear probe needs one vector per image: use ClassToken, MeanPatch or MapHead"));
    }
    let ftr = spec.extractor.extract(encoder, train, layer as i64, pooling)?;
    let fva = spec.extractor.extract(encoder, val, layer as i64, pooling)?;
    let names = if train.class_names.is_empty() { val.class_names.clone() } else { train.class_names.clone() };
    let dev = ftr.x.device();
    Ok((
        FeatureSet::new(ftr.x, labels(train).to_device(dev)).with_class_names(names),
        FeatureSet::new(fva.x, labels(val).to_device(dev)),
        ftr.layer,
        ftr.pooling,
    ))
}

/// A probe with explicit feature settings: `LinearProbe::default().on(spec)`.
#[derive(Debug, Clone)]
pub struct OnFeatures<P> {
    pub probe: P,
    pub spec: FeatureSpec,
}

impl LinearProbe {
    /// The CLIP protocol on `encoder`'s features of `train` / `val` (default layer and pooling,
    /// see [`FeatureSpec`]).
    pub fn fit(&self, encoder: &VisionEncoder, train: &ClassificationDataset, val: &ClassificationDataset) -> Result<EncoderProbeReport> {
        self.clone().on(FeatureSpec::default()).fit(encoder, train, val)
    }
    pub fn on(self, spec: FeatureSpec) -> OnFeatures<LinearProbe> {
        OnFeatures { probe: self, spec }
    }
}

impl OnFeatures<LinearProbe> {
    pub fn fit(&self, encoder: &VisionEncoder, train: &ClassificationDataset, val: &ClassificationDataset) -> Result<EncoderProbeReport> {
        let (tr, va, layer, pooling) = class_features(&self.spec, encoder, train, val)?;
        let report = self.probe.fit_features(&tr, &va)?;
        Ok(EncoderProbeReport { provenance: encoder.provenance().clone(), layer, pooling, report })
    }
}

impl SgdLinearProbe {
    /// DINOv2's SGD linear head on `encoder`'s features (default layer and pooling).
    pub fn fit(&self, encoder: &VisionEncoder, train: &ClassificationDataset, val: &ClassificationDataset) -> Result<EncoderProbeReport> {
        self.clone().on(FeatureSpec::default()).fit(encoder, train, val)
    }
    pub fn on(self, spec: FeatureSpec) -> OnFeatures<SgdLinearProbe> {
        OnFeatures { probe: self, spec }
    }
}

impl OnFeatures<SgdLinearProbe> {
    pub fn fit(&self, encoder: &VisionEncoder, train: &ClassificationDataset, val: &ClassificationDataset) -> Result<EncoderProbeReport> {
        let (tr, va, layer, pooling) = class_features(&self.spec, encoder, train, val)?;
        let report = self.probe.fit_features(&tr, &va)?;
        Ok(EncoderProbeReport { provenance: encoder.provenance().clone(), layer, pooling, report })
    }
}

/// Which segmentation probe.
#[derive(Debug, Clone)]
pub enum SegMethod {
    /// patch-seg (what PIVOT used); `num_classes` is taken from the data set.
    PatchSeg(PatchSegProbe),
    /// Dense linear probe with mIoU; `num_classes` and `ignore_index` from the data set.
    Dense(DenseSegProbe),
}

/// A segmentation probe on an encoder's patch tokens.
#[derive(Debug, Clone)]
pub struct SegProbe {
    pub method: SegMethod,
    /// Hidden-state index; default: the layer the MLLM consumed.
    pub layer: Option<i64>,
    pub extractor: FeatureExtractor,
    /// patch-seg's "unlabeled" class for the union rule, from the data set: class 0 when it is
    /// named `unlabeled` (COCO-Stuff), none otherwise (ADE20K reduced, the world's `background`
    /// is a real class). When false, `PatchSegProbe::unlabeled` is used as set.
    pub auto_unlabeled: bool,
    /// Val images shown in the prediction-vs-truth picture (dense probe).
    pub show: usize,
}

impl SegProbe {
    pub fn patch_seg() -> Self {
        Self::new(SegMethod::PatchSeg(PatchSegProbe::new(0)))
    }
    pub fn dense() -> Self {
        Self::new(SegMethod::Dense(DenseSegProbe::new(0)))
    }
    pub fn new(method: SegMethod) -> Self {
        SegProbe { method, layer: None, extractor: FeatureExtractor::default(), auto_unlabeled: true, show: 4 }
    }
    pub fn layer(mut self, layer: i64) -> Self {
        self.layer = Some(layer);
        self
    }
    pub fn extractor(mut self, extractor: FeatureExtractor) -> Self {
        self.extractor = extractor;
        self
    }
    pub fn show(mut self, n: usize) -> Self {
        self.show = n;
        self
    }

    /// Trains on `train`'s patch tokens (masks resized nearest to the tower's resolution, the data
    /// set's ignore index honoured) and evaluates on `val`.
    pub fn fit(&self, encoder: &VisionEncoder, train: &SegDataset, val: &SegDataset) -> Result<SegProbeReport> {
        if train.is_empty() || val.is_empty() {
            return Err(PivotError::invalid(format!(
                "segmentation probe: train has {} and val {} samples; both must be non-empty",
                train.len(),
                val.len()
            )));
        }
        let c = train.num_classes().max(val.num_classes()) as i64;
        if c == 0 {
            return Err(PivotError::invalid("segmentation probe: the data set names no classes"));
        }
        let layer = encoder.tower().resolve_layer(self.layer.unwrap_or(encoder.select().layer))?;
        let proc = encoder.tower().processor();
        let ttr = self.extractor.extract(encoder, train, layer as i64, Pooling::PatchTokens)?.x;
        let tva = self.extractor.extract(encoder, val, layer as i64, Pooling::PatchTokens)?.x;
        let (mtr, mva) = (mask_tensor(train, &proc)?, mask_tensor(val, &proc)?);
        let class_names = if train.class_names.is_empty() { val.class_names.clone() } else { train.class_names.clone() };
        let (result, figure) = match &self.method {
            SegMethod::PatchSeg(p) => {
                let mut p = p.clone();
                p.num_classes = c;
                if self.auto_unlabeled {
                    p.unlabeled = class_names.first().filter(|n| n.eq_ignore_ascii_case("unlabeled")).map(|_| 0);
                }
                // The probe counts only ids < C as labels, so the ignore index drops out of the targets.
                (SegResult::PatchSeg(p.fit_tokens(&ttr, &mtr, &tva, &mva)?), None)
            }
            SegMethod::Dense(d) => {
                let mut d = d.clone();
                d.num_classes = c;
                d.ignore_index = val.ignore_index as i64;
                let r = d.fit_tokens(&ttr, &mtr, &tva, &mva)?;
                let fig = self.picture(encoder, val, &tva, &mva, &r, c)?;
                (SegResult::Dense(r), fig)
            }
        };
        Ok(SegProbeReport { provenance: encoder.provenance().clone(), layer, class_names, result, figure })
    }

    fn picture(
        &self,
        encoder: &VisionEncoder,
        val: &SegDataset,
        tokens: &Tensor,
        masks: &Tensor,
        r: &DenseSegReport,
        c: i64,
    ) -> Result<Option<Figure>> {
        let k = self.show.min(val.len());
        if k == 0 {
            return Ok(None);
        }
        let proc = encoder.tower().processor();
        let s = proc.size as i64;
        let images: Vec<_> = (0..k).map(|i| val.samples[i].image.load().map(|im| proc.resize(&im))).collect::<Result<_>>()?;
        let pred = r.head.predict(&tokens.narrow(0, 0, k as i64), (s, s));
        let truth: Vec<Tensor> = (0..k as i64).map(|i| masks.get(i).to_kind(Kind::Int64)).collect();
        let pred: Vec<Tensor> = (0..k as i64).map(|i| pred.get(i)).collect();
        Ok(Some(seg_comparison(&images, &truth, &pred, c as usize)?))
    }
}

/// The report of either segmentation probe.
#[derive(Debug)]
pub enum SegResult {
    PatchSeg(PatchSegReport),
    Dense(DenseSegReport),
}

/// A segmentation probe's result on an encoder, with the prediction-vs-truth picture (dense
/// probe; patch-seg's report carries no head to predict with).
#[derive(Debug)]
pub struct SegProbeReport {
    pub provenance: Provenance,
    pub layer: usize,
    pub class_names: Vec<String>,
    pub result: SegResult,
    pub figure: Option<Figure>,
}

impl SegProbeReport {
    pub fn encoder(&self) -> String {
        self.provenance.label()
    }
    fn method(&self) -> &'static str {
        match self.result {
            SegResult::PatchSeg(_) => "patch-seg",
            SegResult::Dense(_) => "dense-linear",
        }
    }
    fn header(&self) -> String {
        format!("{} · layer {} · {}", self.provenance.label(), self.layer, self.method())
    }
}

impl fmt::Display for SegProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:>16}: {}", "encoder", self.header())?;
        match &self.result {
            SegResult::PatchSeg(r) => write!(f, "{r}"),
            SegResult::Dense(r) => write!(f, "{r}"),
        }
    }
}

impl Rich for SegProbeReport {
    fn mime_bundle(&self) -> MimeBundle {
        let table = match &self.result {
            SegResult::PatchSeg(r) => r.to_html(),
            SegResult::Dense(r) => r.to_html(),
        };
        let fig = self.figure.as_ref().map(|f| f.to_html()).unwrap_or_default();
        let b = MimeBundle::text(self.to_string())
            .with_html(format!("<div><b>{}</b>{table}{fig}</div>", html_escape(&self.header())));
        match &self.figure {
            Some(f) => b.with_png(&f.png),
            None => b,
        }
    }
}

impl Metrics for SegProbeReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        match &self.result {
            SegResult::PatchSeg(r) => r.metrics(),
            SegResult::Dense(r) => r.metrics(),
        }
    }
}

impl Keyed for SegProbeReport {
    fn keys(&self) -> Vec<(String, String)> {
        let mut k = provenance_keys(&self.provenance);
        k.push(("probe".into(), self.method().into()));
        k.push(("layer".into(), self.layer.to_string()));
        k
    }
    fn seed(&self) -> Option<i64> {
        self.provenance.seed.map(|s| s as i64)
    }
}

impl SegProbeReport {
    /// Class maps [N, S, S] (S = the tower's input size) that this report's dense probe predicts
    /// for the images of `data`, read from `encoder` (the encoder the probe was fitted on) at the
    /// probe's layer. Masks of `data` are not used. Patch-seg reports keep no head: an error.
    pub fn predict(&self, encoder: &VisionEncoder, data: &SegDataset) -> Result<Tensor> {
        let SegResult::Dense(r) = &self.result else {
            return Err(PivotError::invalid("predict: only the dense probe (SegProbe::dense) keeps a head to predict with"));
        };
        if data.is_empty() {
            return Err(PivotError::invalid("predict: no images"));
        }
        let s = encoder.tower().processor().size as i64;
        let tokens = FeatureExtractor::default()
            .quiet()
            .extract(encoder, data, self.layer as i64, Pooling::PatchTokens)?
            .x;
        if tokens.size()[1] != r.head.grid.0 * r.head.grid.1 {
            return Err(PivotError::invalid(format!(
                "predict: the encoder gives {} patch tokens, the probe was fitted on a {:?} grid",
                tokens.size()[1],
                r.head.grid
            )));
        }
        Ok(r.head.predict(&tokens, (s, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ShapesConfig, ShapesWorld, Split};
    use crate::model::Mllm;
    use tch::Device;

    #[test]
    fn seg_probe_report_predicts_class_maps_of_the_probe() {
        tch::manual_seed(0);
        let world = ShapesWorld::new(ShapesConfig::default());
        let enc = Mllm::tiny(Device::Cpu).encoder();
        let (train, val) = (world.segmentation(Split::Train, 16), world.segmentation(Split::Val, 6));
        let ex = FeatureExtractor::default().no_cache().quiet();
        let mut dense = DenseSegProbe::new(0);
        dense.epochs = 2;
        let rep = SegProbe::new(SegMethod::Dense(dense)).extractor(ex.clone()).show(0).fit(&enc, &train, &val).unwrap();
        let pred = rep.predict(&enc, &val.take(4)).unwrap();
        assert_eq!(pred.size(), vec![4, 64, 64]);
        assert_eq!(pred.kind(), Kind::Int64);
        let (lo, hi) = (pred.min().int64_value(&[]), pred.max().int64_value(&[]));
        assert!(lo >= 0 && hi < world.seg_class_names().len() as i64);
        // The same maps as the head on the probe's own tokens.
        let SegResult::Dense(r) = &rep.result else { panic!("dense") };
        let tok = ex.extract(&enc, &val.take(4), rep.layer as i64, Pooling::PatchTokens).unwrap().x;
        assert!(r.head.predict(&tok, (64, 64)).equal(&pred));
        // Patch-seg keeps no head.
        let mut ps = PatchSegProbe::new(0);
        ps.epochs = 1;
        let rep = SegProbe::new(SegMethod::PatchSeg(ps)).extractor(ex).fit(&enc, &train, &val).unwrap();
        assert!(rep.predict(&enc, &val).is_err());
    }
}
