//! Feature extraction from a [`VisionEncoder`] over any image data set, batched on the encoder's
//! device, with a live progress bar, cooperative interruption and an on-disk cache.
//!
//! The cache key hashes everything the features depend on: the encoder's provenance, the bytes
//! of every tower weight (two towers trained differently but labelled the same must never share
//! an entry), the tower config, the resolved layer, the pooling and the data set's identity
//! (image sources, labels, count). A sweep over probes, C values or seeds then encodes each
//! (encoder, layer, pooling, data) once.

use crate::data::{
    CaptionDataset, ClassificationDataset, ImageFolder, ImageSource, PreferenceDataset, SegDataset, VqaDataset,
};
use crate::error::{PivotError, Result};
use crate::model::{Checkpoint, ImageProcessor, Pooling, ResizeMode, VisionEncoder, VisionTower, weights};
use crate::runtime::{Progress, check_interrupt};
use image::{GrayImage, RgbImage, imageops::FilterType};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A 128-bit non-cryptographic hash (two multiply–rotate lanes over 8-byte words, splitmix
/// finaliser). Stable across Rust releases, unlike `DefaultHasher`, so cache keys survive a
/// toolchain update; fast enough to hash a 400M-parameter tower in well under a second.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    a: u64,
    b: u64,
    len: u64,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

fn fmix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Fingerprint {
    pub fn new() -> Self {
        Fingerprint { a: 0x243f_6a88_85a3_08d3, b: 0x1319_8a2e_0370_7344, len: 0 }
    }

    fn word(&mut self, w: u64) {
        // The added constants break the 0 → 0 fixed point, so runs of zero words still move the state.
        self.a = (self.a ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29).wrapping_add(0x2545_f491_4f6c_dd1d);
        self.b = (self.b ^ w.rotate_left(17)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(31).wrapping_add(0x1656_67b1_9e37_79f9);
    }

    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(buf));
        }
        // Length-framing: ("ab", "c") and ("a", "bc") must differ.
        self.len = self.len.wrapping_add(data.len() as u64);
        self.word(data.len() as u64 ^ 0xa5a5_a5a5_a5a5_a5a5);
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Shape, dtype and raw bytes of a tensor (copied to the CPU).
    pub fn tensor(&mut self, t: &Tensor) -> Result<&mut Self> {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        self.str(&format!("{:?}{:?}", t.kind(), t.size()));
        let numel = t.numel();
        let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut buf, numel)?;
        Ok(self.bytes(&buf))
    }

    pub fn image_source(&mut self, src: &ImageSource) -> &mut Self {
        match src {
            ImageSource::Memory(img) => self.str("mem").u64(img.width() as u64).u64(img.height() as u64).bytes(img.as_raw()),
            ImageSource::File(path) => {
                // Path plus size and mtime: re-encoding a file in place invalidates its features.
                self.str("file").str(&path.to_string_lossy());
                if let Ok(meta) = std::fs::metadata(path) {
                    self.u64(meta.len());
                    if let Ok(m) = meta.modified().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).map_err(std::io::Error::other)) {
                        self.u64(m.as_nanos() as u64);
                    }
                }
                self
            }
        }
    }

    pub fn finish(&self) -> u128 {
        let a = fmix(self.a ^ self.len);
        let b = fmix(self.b ^ a);
        ((a as u128) << 64) | b as u128
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.finish())
    }
}

/// Hash of a tower's weights (every variable's name, dtype, shape and bytes) and config.
/// Costs one pass over the weights (and a device → host copy on CUDA).
pub fn tower_fingerprint(tower: &VisionTower) -> Result<String> {
    let mut h = Fingerprint::new();
    h.str(&serde_json::to_string(tower.config()).unwrap_or_default());
    let mut vars: Vec<(String, Tensor)> = tower.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in &vars {
        h.str(name);
        h.tensor(&t.detach())?;
    }
    Ok(h.hex())
}

/// Any collection of images features can be extracted from. Implemented for every data set of
/// the prelude, `ImageFolder`, and slices of images or image sources.
pub trait ImageSet: Sync {
    fn num_images(&self) -> usize;
    /// Image `i`, decoded.
    fn load_image(&self, i: usize) -> Result<RgbImage>;
    /// Feeds the data set's identity (image sources, labels, count) into `h`.
    fn fingerprint(&self, h: &mut Fingerprint);
    /// Short description for progress bars.
    fn describe(&self) -> String {
        format!("{} images", self.num_images())
    }
}

macro_rules! image_set_for_dataset {
    ($ty:ty, $tag:literal, |$s:ident, $h:ident| $extra:expr) => {
        impl ImageSet for $ty {
            fn num_images(&self) -> usize {
                self.samples.len()
            }
            fn load_image(&self, i: usize) -> Result<RgbImage> {
                self.samples[i].image.load()
            }
            fn fingerprint(&self, $h: &mut Fingerprint) {
                $h.str($tag).u64(self.samples.len() as u64);
                for $s in &self.samples {
                    $h.image_source(&$s.image);
                    $extra;
                }
            }
        }
    };
}

image_set_for_dataset!(ClassificationDataset, "classification", |s, h| h.u64(s.label as u64));
image_set_for_dataset!(SegDataset, "segmentation", |s, h| h.bytes(s.mask.as_raw()));
image_set_for_dataset!(CaptionDataset, "captions", |s, h| h.str(&s.caption));
image_set_for_dataset!(VqaDataset, "vqa", |s, h| h.str(&s.question));
image_set_for_dataset!(PreferenceDataset, "preferences", |s, h| h.str(&s.question));

impl ImageSet for ImageFolder {
    fn num_images(&self) -> usize {
        self.dataset.num_images()
    }
    fn load_image(&self, i: usize) -> Result<RgbImage> {
        self.dataset.load_image(i)
    }
    fn fingerprint(&self, h: &mut Fingerprint) {
        self.dataset.fingerprint(h)
    }
}

impl ImageSet for [RgbImage] {
    fn num_images(&self) -> usize {
        self.len()
    }
    fn load_image(&self, i: usize) -> Result<RgbImage> {
        Ok(self[i].clone())
    }
    fn fingerprint(&self, h: &mut Fingerprint) {
        h.str("images").u64(self.len() as u64);
        for img in self {
            h.u64(img.width() as u64).u64(img.height() as u64).bytes(img.as_raw());
        }
    }
}

impl ImageSet for [ImageSource] {
    fn num_images(&self) -> usize {
        self.len()
    }
    fn load_image(&self, i: usize) -> Result<RgbImage> {
        self[i].load()
    }
    fn fingerprint(&self, h: &mut Fingerprint) {
        h.str("sources").u64(self.len() as u64);
        for s in self {
            h.image_source(s);
        }
    }
}

impl<T: ImageSet + ?Sized> ImageSet for &T {
    fn num_images(&self) -> usize {
        (**self).num_images()
    }
    fn load_image(&self, i: usize) -> Result<RgbImage> {
        (**self).load_image(i)
    }
    fn fingerprint(&self, h: &mut Fingerprint) {
        (**self).fingerprint(h)
    }
}

impl<T: Sync> ImageSet for Vec<T>
where
    [T]: ImageSet,
{
    fn num_images(&self) -> usize {
        self.as_slice().num_images()
    }
    fn load_image(&self, i: usize) -> Result<RgbImage> {
        self.as_slice().load_image(i)
    }
    fn fingerprint(&self, h: &mut Fingerprint) {
        self.as_slice().fingerprint(h)
    }
}

/// Where extracted features are cached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FeatureCache {
    /// `$PIVOT_CACHE_DIR/features`, else `~/.cache/pivot-lab/features`.
    #[default]
    Default,
    Dir(PathBuf),
    /// Always encode, never write.
    Off,
}

impl FeatureCache {
    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            FeatureCache::Off => None,
            FeatureCache::Dir(d) => Some(d.clone()),
            FeatureCache::Default => Some(default_cache_dir()),
        }
    }
}

/// The default cache folder (see [`FeatureCache::Default`]).
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PIVOT_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("features");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/pivot-lab/features"),
        None => std::env::temp_dir().join("pivot-lab/features"),
    }
}

/// Which features to extract: one layer with a pooling, or every hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Layer(usize, Pooling),
    AllLayers(Pooling),
}

/// Extracted features and where they came from.
#[derive(Debug)]
pub struct Features {
    /// [N, D] pooled, [N, T, D] for `Tokens`/`PatchTokens`, [N, L+1, D] for all layers; f32.
    pub x: Tensor,
    /// Resolved hidden-state index (`None` for all layers and the MAP head).
    pub layer: Option<usize>,
    pub pooling: Pooling,
    /// True when read from the cache instead of encoded.
    pub from_cache: bool,
    /// The cache file (read or written); `None` with the cache off.
    pub cache_path: Option<PathBuf>,
}

/// Batched, cached feature extraction. `FeatureExtractor::default()` encodes 64 images per batch on
/// the tower's device and returns features there.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureExtractor {
    pub batch_size: usize,
    pub cache: FeatureCache,
    /// Where the returned features live; default: the tower's device (so a GPU probe runs on GPU).
    pub output_device: Option<Device>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for FeatureExtractor {
    fn default() -> Self {
        FeatureExtractor { batch_size: 64, cache: FeatureCache::Default, output_device: None, progress: true }
    }
}

impl FeatureExtractor {
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
    pub fn cache(mut self, cache: FeatureCache) -> Self {
        self.cache = cache;
        self
    }
    pub fn cache_dir(self, dir: impl Into<PathBuf>) -> Self {
        self.cache(FeatureCache::Dir(dir.into()))
    }
    pub fn no_cache(self) -> Self {
        self.cache(FeatureCache::Off)
    }
    pub fn output_device(mut self, d: Device) -> Self {
        self.output_device = Some(d);
        self
    }
    pub fn quiet(mut self) -> Self {
        self.progress = false;
        self
    }

    /// Features of hidden state `layer` (negative from the end; ignored by `MapHead`) pooled as
    /// asked, for every image of `data`, in data-set order.
    pub fn extract<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, data: &D, layer: i64, pooling: Pooling) -> Result<Features> {
        let idx = encoder.tower().resolve_layer(layer)?;
        self.run(encoder, data, What::Layer(idx, pooling))
    }

    /// Pooled features of every hidden state (embeddings included): [N, L+1, D].
    pub fn extract_all_layers<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, data: &D, pooling: Pooling) -> Result<Features> {
        if matches!(pooling, Pooling::Tokens | Pooling::PatchTokens | Pooling::MapHead) {
            return Err(PivotError::invalid(format!(
                "all-layer features need one vector per layer: use ClassToken or MeanPatch, not {pooling:?}"
            )));
        }
        self.run(encoder, data, What::AllLayers(pooling))
    }

    /// The cache file for these features (whether or not it exists yet).
    fn key<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, data: &D, what: What) -> Result<(String, String)> {
        let mut h = Fingerprint::new();
        h.str("pivot-features-v1");
        h.str(&serde_json::to_string(encoder.provenance()).unwrap_or_default());
        h.str(&tower_fingerprint(encoder.tower())?);
        h.str(&serde_json::to_string(&encoder.tower().processor()).unwrap_or_default());
        let (layer_tag, pool) = match what {
            What::Layer(_, Pooling::MapHead) => ("head".to_string(), Pooling::MapHead),
            What::Layer(i, p) => (format!("l{i}"), p),
            What::AllLayers(p) => ("all".to_string(), p),
        };
        h.str(&layer_tag).str(&format!("{pool:?}"));
        let mut dh = Fingerprint::new();
        data.fingerprint(&mut dh);
        h.str(&dh.hex());
        let slug: String = encoder
            .label()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let desc = format!("{} · {layer_tag} · {pool:?} · {}", encoder.label(), data.describe());
        Ok((format!("{slug}_{layer_tag}_{pool:?}_{}.safetensors", h.hex()), desc))
    }

    fn run<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, data: &D, what: What) -> Result<Features> {
        let n = data.num_images();
        if n == 0 {
            return Err(PivotError::invalid("feature extraction: the data set has no images"));
        }
        let out_dev = self.output_device.unwrap_or(encoder.tower().device());
        let (layer, pooling) = match what {
            What::Layer(_, Pooling::MapHead) => (None, Pooling::MapHead),
            What::Layer(i, p) => (Some(i), p),
            What::AllLayers(p) => (None, p),
        };
        let (file, desc) = self.key(encoder, data, what)?;
        let path = self.cache.dir().map(|d| d.join(&file));
        if let Some(p) = path.as_ref().filter(|p| p.is_file()) {
            match read_cached(p, n) {
                Ok(x) => return Ok(Features { x: x.to_device(out_dev), layer, pooling, from_cache: true, cache_path: path }),
                // A corrupt or foreign file is re-encoded and overwritten rather than failing the probe.
                Err(e) => eprintln!("feature cache: ignoring {}: {e}", p.display()),
            }
        }
        let x = self.encode(encoder, data, what, &desc)?;
        match path.as_ref().map(|p| (p, write_cached(p, &x, &desc))) {
            // The user asked to stop: stop, even though only the cache write was left.
            Some((_, Err(e @ PivotError::Interrupted { .. }))) => return Err(e),
            Some((p, Err(e))) => eprintln!("feature cache: could not write {}: {e}", p.display()),
            _ => {}
        }
        Ok(Features { x: x.to_device(out_dev), layer, pooling, from_cache: false, cache_path: path })
    }

    fn encode<D: ImageSet + ?Sized>(&self, encoder: &VisionEncoder, data: &D, what: What, desc: &str) -> Result<Tensor> {
        let n = data.num_images();
        let proc = encoder.tower().processor();
        let dev = encoder.tower().device();
        let mut progress = self.progress.then(|| Progress::new(format!("features {desc}"), n as u64));
        let mut parts = Vec::with_capacity(n.div_ceil(self.batch_size));
        let mut start = 0;
        while start < n {
            check_interrupt(&format!("feature extraction of {desc}, image {} of {n}", start + 1))?;
            let end = (start + self.batch_size).min(n);
            let pixels = load_batch(data, start..end, &proc)?.to_device(dev);
            let f = match what {
                What::Layer(i, p) => encoder.features(&pixels, i as i64, p)?,
                What::AllLayers(p) => Tensor::stack(&encoder.all_layer_features(&pixels, p)?, 1),
            };
            // Accumulate on the host: a large data set's features need not fit next to the tower.
            parts.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
            if let Some(p) = progress.as_mut() {
                p.set(end as u64, "");
            }
            start = end;
        }
        if let Some(p) = progress.as_mut() {
            p.finish();
        }
        Ok(Tensor::cat(&parts, 0))
    }
}

fn read_cached(path: &Path, n: usize) -> Result<Tensor> {
    let x = Checkpoint::open(path)?.tensor("features")?;
    if x.size().first().copied() != Some(n as i64) {
        return Err(PivotError::file(path, format!("holds {:?} features for {n} images", x.size())));
    }
    Ok(x)
}

/// Atomic: written under a unique temporary name, then renamed, so concurrent extractions of the
/// same key and a crash mid-write never leave a truncated file under the real name.
fn write_cached(path: &Path, x: &Tensor, desc: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = path.with_extension(format!("tmp-{}-{nonce}", std::process::id()));
    let meta = Tensor::from_slice(desc.as_bytes());
    let res = weights::write_safetensors(&[("features".into(), x.shallow_clone()), ("description".into(), meta)], &tmp)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| PivotError::file(path, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Decodes and resizes a batch on all cores (the Rust side is the bottleneck for JPEG data sets),
/// then normalises into [B, 3, S, S].
fn load_batch<D: ImageSet + ?Sized>(data: &D, range: std::ops::Range<usize>, proc: &ImageProcessor) -> Result<Tensor> {
    let idx: Vec<usize> = range.collect();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(idx.len().div_ceil(4)).max(1);
    let resized: Vec<RgbImage> = if threads == 1 {
        idx.iter().map(|&i| data.load_image(i).map(|im| proc.resize(&im))).collect::<Result<_>>()?
    } else {
        let chunk = idx.len().div_ceil(threads);
        std::thread::scope(|s| {
            let workers: Vec<_> = idx
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().map(|&i| data.load_image(i).map(|im| proc.resize(&im))).collect::<Result<Vec<_>>>()))
                .collect();
            let mut all = Vec::with_capacity(idx.len());
            for w in workers {
                all.extend(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?);
            }
            Ok::<_, PivotError>(all)
        })?
    };
    proc.preprocess(&resized)
}

/// [`FeatureExtractor::extract`] with explicit options.
pub fn extract_features<D: ImageSet + ?Sized>(
    encoder: &VisionEncoder,
    data: &D,
    layer: i64,
    pooling: Pooling,
    opts: &FeatureExtractor,
) -> Result<Features> {
    opts.extract(encoder, data, layer, pooling)
}

/// A mask through the same geometry as the processor's images (square resize, or shortest-edge
/// resize + centre crop), with nearest-neighbour sampling so class ids stay class ids.
pub fn preprocess_mask(mask: &GrayImage, proc: &ImageProcessor) -> GrayImage {
    let s = proc.size;
    let (w, h) = mask.dimensions();
    if w == s && h == s {
        return mask.clone();
    }
    match proc.mode {
        ResizeMode::Square => image::imageops::resize(mask, s, s, FilterType::Nearest),
        ResizeMode::ShortestEdgeCenterCrop => {
            let scale = s as f64 / w.min(h) as f64;
            let (nw, nh) = (((w as f64 * scale).round() as u32).max(s), ((h as f64 * scale).round() as u32).max(s));
            let r = image::imageops::resize(mask, nw, nh, FilterType::Nearest);
            image::imageops::crop_imm(&r, (nw - s) / 2, (nh - s) / 2, s, s).to_image()
        }
    }
}

/// Masks of a segmentation set at the tower's resolution: [N, S, S] uint8 on the CPU.
pub fn mask_tensor(data: &SegDataset, proc: &ImageProcessor) -> Result<Tensor> {
    if data.is_empty() {
        return Err(PivotError::invalid("segmentation data set is empty"));
    }
    let s = proc.size as i64;
    let masks: Vec<Tensor> =
        data.samples.iter().map(|x| Tensor::from_slice(preprocess_mask(&x.mask, proc).as_raw()).view([s, s])).collect();
    Ok(Tensor::stack(&masks, 0))
}
