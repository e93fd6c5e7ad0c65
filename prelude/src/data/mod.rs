//! Data: the embedded `ShapesWorld` and loaders for the formats the field uses.
//!
//! Everything here produces plain sample vectors (`VqaDataset`, `PreferenceDataset`, ...) whose
//! images are an [`ImageSource`]: either a decoded image held in memory (the world) or a file path
//! that is checked at load time and decoded only when a trainer or probe asks for it.
//!
//! Loaders are strict by default: the first bad record is an error that names the file, the line
//! and the field ([`PivotError::Record`]). With [`SkipPolicy::Skip`] bad records are dropped instead
//! and counted in the dataset's [`SkipReport`], so a researcher can see what a real dump lost.
//!
//! Conventions of the real formats:
//! - LLaVA conversation JSON (BLIP558K, LLaVA-OV): a JSON list of
//!   `{id, image, conversations: [{from: human, value}, {from: gpt, value}, ...]}`; every
//!   (human, gpt) pair becomes one sample and the `<image>` placeholder is removed from questions.
//!   For JSON lists, the line of an error is the line where the offending record starts (or the
//!   line of a syntax error inside it).
//! - Preference data: JSONL (RLAIF-V / MMPR rows `{image, question, chosen, rejected}`) or PIVOT's
//!   DPO JSON list (`prompt` = `"<image>\n<question>"`); `prompt`/`query` are accepted for
//!   `question`.
//! - `ImageFolder`: one folder per class, classes sorted by name (the torchvision/ImageNet layout).
//! - ADE20K: "reduce zero label" — file value 0 (other) becomes 255 (ignored), v becomes v − 1,
//!   giving 150 classes.
//! - COCO-Stuff (stuffthingmaps): raw value v becomes (v + 1) mod 256, so 255 (unlabeled) becomes
//!   class 0 `unlabeled` and COCO id k keeps index k: 183 classes, 255 stays the ignore index.

mod balance;
mod export;
mod folders;
mod formats;
mod json;
mod pairs;
mod render;
mod rng;
mod samples;
mod scene;
mod text;
pub mod vocab;
mod world;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::error::{PivotError, Result};

pub use balance::text_only_accuracy;
pub use export::ShapesExport;
pub use folders::{ImageFolder, MaskEncoding, ADE20K_CLASSES, COCO_STUFF_CLASSES};
pub use samples::*;
pub use text::CAPTION_PROMPT;
pub use vocab::{tiny_words, TINY_VOCABULARY};
pub use scene::{Background, BoundingBox, Colour, ColourGroup, Scene, SceneObject, Shape, Size, Texture};
pub use world::{RenderedScene, ShapesConfig, ShapesWorld, StudyPart, VQA_CATEGORIES};

/// Which part of a data set. The world draws each split from its own random stream, so splits
/// never share an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a loader does with a bad record (malformed line, missing field, missing or unreadable image),
/// and what a trainer does with an image that fails to decode when a micro-batch first uses it
/// (`TrainConfig::bad_images`, see [`collate_on_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipPolicy {
    /// Stop at the first bad record with an error naming file, line and field.
    #[default]
    Error,
    /// Drop bad records and list them in the dataset's `skipped` report.
    Skip,
}

/// How much a loader checks each image at load time. Training decodes the images later, on use,
/// so an image that fails there stops the run; the checks move that failure to load time, where
/// [`SkipPolicy::Skip`] drops and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Trust the paths.
    None,
    /// One `stat` per image: the file exists.
    Exists,
    /// Read the image's header and its last bytes: the file exists, is a PNG/JPEG the decoder
    /// understands, and ends as a complete one does (JPEG: an end-of-image marker after the last
    /// scan; PNG: the `IEND` chunk). Two small reads per image, which catch truncated downloads
    /// and HTML error pages.
    #[default]
    Header,
    /// Decode every image fully at load time (and check its end as `Header` does): also catches
    /// corruption inside complete files, at the cost of one decode per image.
    Decode,
}

/// Options shared by every loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub skip_policy: SkipPolicy,
    pub image_check: ImageCheck,
    /// Keep at most this many samples (after skipping); `None` keeps all. `ImageFolder` applies
    /// it per class, so that a quick subset still has every class.
    pub limit: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { skip_policy: SkipPolicy::Error, image_check: ImageCheck::Header, limit: None }
    }
}

impl LoadOptions {
    /// Shorthand for `LoadOptions::default().with_skip_policy(SkipPolicy::Skip)`.
    pub fn skipping() -> Self {
        LoadOptions::default().with_skip_policy(SkipPolicy::Skip)
    }
    pub fn with_skip_policy(mut self, policy: SkipPolicy) -> Self {
        self.skip_policy = policy;
        self
    }
    pub fn with_image_check(mut self, check: ImageCheck) -> Self {
        self.image_check = check;
        self
    }
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// One record a loader dropped under [`SkipPolicy::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    /// 1-based line of the record; `None` for folder-based data sets.
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: field `{}`: {}", self.path.display(), self.field, self.message),
            None => write!(f, "{}: field `{}`: {}", self.path.display(), self.field, self.message),
        }
    }
}

impl Skipped {
    fn with_field(mut self, field: &str) -> Skipped {
        self.field = field.into();
        self
    }

    fn from_error(err: PivotError) -> Skipped {
        match err {
            PivotError::Record { path, line, field, message } => Skipped { path, line: Some(line), field, message },
            PivotError::File { path, message } => Skipped { path, line: None, field: "file".into(), message },
            other => Skipped { path: PathBuf::new(), line: None, field: String::new(), message: other.to_string() },
        }
    }
}

/// What a loader (or a training run) skipped under [`SkipPolicy::Skip`]; empty otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkipReport {
    /// Number of records (or, for multi-turn conversations, whole records) dropped.
    pub count: usize,
    /// Why, one entry per dropped record, at most [`SkipReport::MAX_REASONS`] of them: a dump with
    /// a million broken rows should not hold a million messages.
    pub reasons: Vec<Skipped>,
}

impl SkipReport {
    pub const MAX_REASONS: usize = 1000;

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn push(&mut self, skipped: Skipped) {
        self.count += 1;
        if self.reasons.len() < Self::MAX_REASONS {
            self.reasons.push(skipped);
        }
    }
}

impl fmt::Display for SkipReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return f.write_str("nothing skipped");
        }
        writeln!(f, "skipped {} record(s):", self.count)?;
        for reason in self.reasons.iter().take(10) {
            writeln!(f, "  {reason}")?;
        }
        if self.count > 10 {
            writeln!(f, "  ... and {} more", self.count - 10)?;
        }
        Ok(())
    }
}

/// Where a sample's image comes from.
#[derive(Clone, PartialEq)]
pub enum ImageSource {
    /// Decoded and held in memory (the embedded world). Cloning shares the pixels.
    Memory(Arc<RgbImage>),
    /// A PNG or JPEG file, decoded on `load`.
    File(PathBuf),
}

impl ImageSource {
    /// The image as RGB8. File errors name the file.
    pub fn load(&self) -> Result<RgbImage> {
        match self {
            ImageSource::Memory(image) => Ok(RgbImage::clone(image)),
            ImageSource::File(path) => decode_rgb(path),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageSource::File(path) => Some(path),
            ImageSource::Memory(_) => None,
        }
    }
}

impl From<RgbImage> for ImageSource {
    fn from(image: RgbImage) -> Self {
        ImageSource::Memory(Arc::new(image))
    }
}

// A derived Debug would print every pixel.
impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Memory(image) => write!(f, "Memory({}x{})", image.width(), image.height()),
            ImageSource::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

/// Any sample that carries an image, so feature extraction can run over every dataset type.
pub trait ImageSample {
    fn image(&self) -> &ImageSource;
    /// Whether the sample reads the image file `path` (a preference pair also reads its
    /// `image_rejected`), so that a decode failure is pinned on the samples that use the file.
    fn reads_file(&self, path: &Path) -> bool {
        self.image().path() == Some(path)
    }
}

/// The outcome of [`collate_on_use`]: which of the samples made it into `batch`, and which were
/// left out because their image failed to decode.
#[derive(Debug)]
pub struct Collated<T> {
    /// Positions (in the slice given) of the samples in the batch, in order.
    pub kept: Vec<usize>,
    /// One entry per sample left out, naming its image file and the decoder's error.
    pub skipped: Vec<Skipped>,
    pub batch: Result<T>,
}

/// Collates `samples` with `collate`, which decodes their images on first use. Under
/// [`SkipPolicy::Error`] the first failure is returned as it is (it names the file). Under
/// [`SkipPolicy::Skip`] a sample whose image fails to decode is left out and recorded, and the
/// rest are collated again: an image that passed the load-time check (or was loaded with
/// [`ImageCheck::None`]) but is corrupt inside never stops a run. A failure that is not about one
/// of the samples' image files (tokenisation, shapes) is returned under both policies, and so is
/// a micro-batch with no sample left (with `kept` empty; the training loop skips such a
/// micro-batch instead of stopping). The retry re-decodes the images before the bad one: a cost
/// paid only when an image is bad, instead of holding every decoded image through the call.
pub fn collate_on_use<S: ImageSample, T>(samples: &[&S], policy: SkipPolicy, collate: impl Fn(&[&S]) -> Result<T>) -> Collated<T> {
    let mut kept: Vec<usize> = (0..samples.len()).collect();
    let mut skipped = Vec::new();
    loop {
        let subset: Vec<&S> = kept.iter().map(|&i| samples[i]).collect();
        let batch = collate(&subset);
        let bad = match (&batch, policy) {
            (Err(PivotError::File { path, .. }), SkipPolicy::Skip) => {
                kept.iter().position(|&i| samples[i].reads_file(path))
            }
            _ => None,
        };
        let Some(at) = bad else { return Collated { kept, skipped, batch } };
        let Err(err) = batch else { unreachable!("only a failed collation has a bad image") };
        kept.remove(at);
        skipped.push(Skipped::from_error(err).with_field("image"));
        if kept.is_empty() {
            let files: Vec<String> = skipped.iter().map(|s| s.path.display().to_string()).collect();
            let batch = Err(PivotError::invalid(format!(
                "no image of this micro-batch could be decoded (skipped: {})",
                files.join(", ")
            )));
            return Collated { kept, skipped, batch };
        }
    }
}

fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| PivotError::file(path, format!("cannot open image: {e}")))?
        .with_guessed_format()
        .map_err(|e| PivotError::file(path, format!("cannot read image: {e}")))?;
    let decoded = reader.decode().map_err(|e| PivotError::file(path, format!("cannot decode image: {e}")))?;
    Ok(decoded.into_rgb8())
}

/// The load-time image check of [`ImageCheck`]; the error message is meant for a `Record`.
fn check_image(path: &Path, check: ImageCheck) -> std::result::Result<(), String> {
    match check {
        ImageCheck::None => Ok(()),
        ImageCheck::Exists => {
            if path.is_file() {
                Ok(())
            } else {
                Err(format!("image file {} does not exist", path.display()))
            }
        }
        ImageCheck::Header | ImageCheck::Decode => {
            if !path.is_file() {
                return Err(format!("image file {} does not exist", path.display()));
            }
            image_dimensions(path)?;
            check_image_end(path)?;
            if check == ImageCheck::Decode {
                decode_rgb(path).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

/// How far from the end a complete image's end marker may sit (some writers pad or append a few
/// bytes after it).
const IMAGE_TAIL_BYTES: u64 = 64 * 1024;

/// Checks that a PNG/JPEG file ends like a complete one, from its last [`IMAGE_TAIL_BYTES`]: a
/// truncated download keeps a valid header, so the header alone cannot tell.
fn check_image_end(path: &Path) -> std::result::Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let truncated = |what: &str| format!("{} is truncated or incomplete: {what}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| format!("cannot read image {}: {e}", path.display()))?.len();
    let mut head = [0u8; 8];
    file.read_exact(&mut head).map_err(|_| truncated("shorter than an image header"))?;
    let from = len.saturating_sub(IMAGE_TAIL_BYTES);
    let mut tail = Vec::with_capacity((len - from) as usize);
    file.seek(SeekFrom::Start(from))
        .and_then(|_| file.read_to_end(&mut tail))
        .map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    let find_last = |needle: &[u8]| tail.windows(needle.len()).rposition(|w| w == needle);
    if head.starts_with(&[0x89, b'P', b'N', b'G']) {
        // The IEND chunk: zero length, type, and its fixed CRC.
        if find_last(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]).is_none() {
            return Err(truncated("no IEND chunk at its end"));
        }
    } else if head.starts_with(&[0xFF, 0xD8]) {
        // Entropy-coded data never holds FF D9 (a data byte FF is stuffed as FF 00), so the last
        // FF D9 is a real end-of-image marker; no scan (FF DA) may start after it.
        match find_last(&[0xFF, 0xD9]) {
            Some(eoi) if !tail[eoi..].windows(2).any(|w| w == [0xFF, 0xDA]) => {}
            _ => return Err(truncated("no end-of-image marker after its last scan")),
        }
    }
    Ok(())
}

fn image_dimensions(path: &Path) -> std::result::Result<(u32, u32), String> {
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read image {}: {e}", path.display()))?
        .into_dimensions()
        .map_err(|e| format!("{} is not a readable PNG/JPEG image: {e}", path.display()))
}
