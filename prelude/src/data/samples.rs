//! Sample and dataset types shared by the world and the file loaders.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use image::GrayImage;

use super::{ImageSample, ImageSource, SkipReport};

/// An image and its caption (stage-1 alignment, Platonic alignment pairs).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionSample {
    pub image: ImageSource,
    pub caption: String,
}

/// One question about an image and its reference answer (SFT, VQA evaluation).
#[derive(Debug, Clone, PartialEq)]
pub struct VqaSample {
    pub image: ImageSource,
    pub question: String,
    pub answer: String,
    /// Question category (`colour`, `shape`, `count`, `position`, `size` in the world); empty
    /// when the source file has none.
    pub category: String,
}

/// A question with a preferred and a dispreferred answer (DPO).
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceSample {
    pub image: ImageSource,
    pub question: String,
    pub chosen: String,
    pub rejected: String,
    pub category: String,
    /// The image the rejected answer is scored with (PIVOT's `image_rejected`, an image
    /// counterfactual: the same scene with one object changed, so that the chosen text is wrong
    /// for it). `None`: both answers are scored with `image`.
    pub image_rejected: Option<ImageSource>,
}

impl PreferenceSample {
    /// The image the rejected answer is scored with.
    pub fn rejected_image(&self) -> &ImageSource {
        self.image_rejected.as_ref().unwrap_or(&self.image)
    }
}

/// An image and its class index (linear probing).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSample {
    pub image: ImageSource,
    pub label: usize,
}

/// An image and its per-pixel class mask (segmentation probing); mask values index the dataset's
/// `class_names`, except its `ignore_index`.
#[derive(Clone, PartialEq)]
pub struct SegSample {
    pub image: ImageSource,
    pub mask: GrayImage,
}

impl fmt::Debug for SegSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegSample")
            .field("image", &self.image)
            .field("mask", &format_args!("{}x{}", self.mask.width(), self.mask.height()))
            .finish()
    }
}

macro_rules! impl_image_sample {
    ($($sample:ty),*) => {$(
        impl ImageSample for $sample {
            fn image(&self) -> &ImageSource {
                &self.image
            }
        }
    )*};
}
impl_image_sample!(CaptionSample, VqaSample, ClassSample, SegSample);

impl ImageSample for PreferenceSample {
    fn image(&self) -> &ImageSource {
        &self.image
    }
    fn reads_file(&self, path: &Path) -> bool {
        [Some(&self.image), self.image_rejected.as_ref()].into_iter().flatten().any(|image| image.path() == Some(path))
    }
}

/// The accessors every dataset has. `take` and `split_at` keep the metadata (class names, skip
/// report) on every part.
macro_rules! dataset_common {
    ($dataset:ident, $sample:ty) => {
        impl $dataset {
            pub fn len(&self) -> usize {
                self.samples.len()
            }
            pub fn is_empty(&self) -> bool {
                self.samples.is_empty()
            }
            pub fn get(&self, index: usize) -> Option<&$sample> {
                self.samples.get(index)
            }
            pub fn iter(&self) -> std::slice::Iter<'_, $sample> {
                self.samples.iter()
            }
            /// The first `n` samples (all of them if there are fewer).
            pub fn take(&self, n: usize) -> Self {
                let mut out = self.with_samples(Vec::new());
                out.samples = self.samples.iter().take(n).cloned().collect();
                out
            }
            /// The first `mid` samples and the rest; `mid` is clamped to the length.
            pub fn split_at(&self, mid: usize) -> (Self, Self) {
                let mid = mid.min(self.samples.len());
                let (head, tail) = self.samples.split_at(mid);
                (self.with_samples(head.to_vec()), self.with_samples(tail.to_vec()))
            }
        }

        impl std::ops::Index<usize> for $dataset {
            type Output = $sample;
            fn index(&self, index: usize) -> &$sample {
                &self.samples[index]
            }
        }

        impl<'a> IntoIterator for &'a $dataset {
            type Item = &'a $sample;
            type IntoIter = std::slice::Iter<'a, $sample>;
            fn into_iter(self) -> Self::IntoIter {
                self.samples.iter()
            }
        }

        impl IntoIterator for $dataset {
            type Item = $sample;
            type IntoIter = std::vec::IntoIter<$sample>;
            fn into_iter(self) -> Self::IntoIter {
                self.samples.into_iter()
            }
        }
    };
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionDataset {
    pub samples: Vec<CaptionSample>,
    pub skipped: SkipReport,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct VqaDataset {
    pub samples: Vec<VqaSample>,
    pub skipped: SkipReport,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferenceDataset {
    pub samples: Vec<PreferenceSample>,
    pub skipped: SkipReport,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassificationDataset {
    pub samples: Vec<ClassSample>,
    pub class_names: Vec<String>,
    pub skipped: SkipReport,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegDataset {
    pub samples: Vec<SegSample>,
    pub class_names: Vec<String>,
    /// Mask value that marks pixels without a label; losses and metrics leave them out.
    pub ignore_index: u8,
    pub skipped: SkipReport,
}

impl CaptionDataset {
    pub fn new(samples: Vec<CaptionSample>) -> Self {
        CaptionDataset { samples, skipped: SkipReport::default() }
    }
    fn with_samples(&self, samples: Vec<CaptionSample>) -> Self {
        CaptionDataset { samples, skipped: self.skipped.clone() }
    }
    /// The captions as instruction rows: `question` (such as [`CAPTION_PROMPT`](super::CAPTION_PROMPT)) answered by
    /// the caption, category `describe`. A caption names the colour and shape of every object, so
    /// most of its words depend on the image; a balanced two-way answer has one such word.
    pub fn to_vqa(&self, question: &str) -> VqaDataset {
        VqaDataset {
            samples: self
                .samples
                .iter()
                .map(|c| VqaSample { image: c.image.clone(), question: question.to_string(), answer: c.caption.clone(), category: "describe".into() })
                .collect(),
            skipped: self.skipped.clone(),
        }
    }
}

impl VqaDataset {
    pub fn new(samples: Vec<VqaSample>) -> Self {
        VqaDataset { samples, skipped: SkipReport::default() }
    }
    fn with_samples(&self, samples: Vec<VqaSample>) -> Self {
        VqaDataset { samples, skipped: self.skipped.clone() }
    }
    /// These rows, then `other`'s (the training engine shuffles them); the skip reports add up.
    pub fn concat(&self, other: &VqaDataset) -> VqaDataset {
        let mut skipped = self.skipped.clone();
        skipped.count += other.skipped.count;
        let room = SkipReport::MAX_REASONS.saturating_sub(skipped.reasons.len());
        skipped.reasons.extend(other.skipped.reasons.iter().take(room).cloned());
        VqaDataset { samples: self.samples.iter().chain(&other.samples).cloned().collect(), skipped }
    }
    /// Number of samples per question category, sorted by category.
    pub fn category_counts(&self) -> BTreeMap<String, usize> {
        count_by(self.samples.iter().map(|s| s.category.as_str()))
    }
}

impl PreferenceDataset {
    pub fn new(samples: Vec<PreferenceSample>) -> Self {
        PreferenceDataset { samples, skipped: SkipReport::default() }
    }
    fn with_samples(&self, samples: Vec<PreferenceSample>) -> Self {
        PreferenceDataset { samples, skipped: self.skipped.clone() }
    }
    pub fn category_counts(&self) -> BTreeMap<String, usize> {
        count_by(self.samples.iter().map(|s| s.category.as_str()))
    }
    /// Pairs whose rejected answer is scored with an image of its own.
    pub fn image_counterfactual_count(&self) -> usize {
        self.samples.iter().filter(|s| s.image_rejected.is_some()).count()
    }
    /// The SFT view of the same rows (answer = chosen), as PIVOT builds its SFT set from the
    /// very rows its DPO set uses, so the two runs see identical questions and images.
    pub fn to_sft(&self) -> VqaDataset {
        VqaDataset {
            samples: self
                .samples
                .iter()
                .map(|s| VqaSample {
                    image: s.image.clone(),
                    question: s.question.clone(),
                    answer: s.chosen.clone(),
                    category: s.category.clone(),
                })
                .collect(),
            skipped: self.skipped.clone(),
        }
    }
}

impl ClassificationDataset {
    pub fn new(samples: Vec<ClassSample>, class_names: Vec<String>) -> Self {
        ClassificationDataset { samples, class_names, skipped: SkipReport::default() }
    }
    fn with_samples(&self, samples: Vec<ClassSample>) -> Self {
        ClassificationDataset { samples, class_names: self.class_names.clone(), skipped: self.skipped.clone() }
    }
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    /// Samples per class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for sample in &self.samples {
            if let Some(c) = counts.get_mut(sample.label) {
                *c += 1;
            }
        }
        counts
    }
}

impl SegDataset {
    pub fn new(samples: Vec<SegSample>, class_names: Vec<String>, ignore_index: u8) -> Self {
        SegDataset { samples, class_names, ignore_index, skipped: SkipReport::default() }
    }
    fn with_samples(&self, samples: Vec<SegSample>) -> Self {
        SegDataset {
            samples,
            class_names: self.class_names.clone(),
            ignore_index: self.ignore_index,
            skipped: self.skipped.clone(),
        }
    }
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

dataset_common!(CaptionDataset, CaptionSample);
dataset_common!(VqaDataset, VqaSample);
dataset_common!(PreferenceDataset, PreferenceSample);
dataset_common!(ClassificationDataset, ClassSample);
dataset_common!(SegDataset, SegSample);

fn count_by<'a>(keys: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for key in keys {
        *counts.entry(key.to_string()).or_insert(0) += 1;
    }
    counts
}

fn write_counts(f: &mut fmt::Formatter<'_>, counts: &BTreeMap<String, usize>) -> fmt::Result {
    if counts.is_empty() || (counts.len() == 1 && counts.contains_key("")) {
        return Ok(());
    }
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    write!(f, " ({})", parts.join(", "))
}

fn write_skipped(f: &mut fmt::Formatter<'_>, skipped: &SkipReport) -> fmt::Result {
    if skipped.is_empty() { Ok(()) } else { write!(f, "; {skipped}") }
}

impl fmt::Display for CaptionDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaptionDataset: {} samples", self.len())?;
        write_skipped(f, &self.skipped)
    }
}

impl fmt::Display for VqaDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VqaDataset: {} samples", self.len())?;
        write_counts(f, &self.category_counts())?;
        write_skipped(f, &self.skipped)
    }
}

impl fmt::Display for PreferenceDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PreferenceDataset: {} pairs", self.len())?;
        write_counts(f, &self.category_counts())?;
        write_skipped(f, &self.skipped)
    }
}

impl fmt::Display for ClassificationDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClassificationDataset: {} samples, {} classes", self.len(), self.num_classes())?;
        write_skipped(f, &self.skipped)
    }
}

impl fmt::Display for SegDataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SegDataset: {} samples, {} classes, ignore index {}",
            self.len(),
            self.num_classes(),
            self.ignore_index
        )?;
        write_skipped(f, &self.skipped)
    }
}
