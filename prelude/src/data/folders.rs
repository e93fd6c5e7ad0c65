//! Folder-based data sets: class-per-folder image sets and segmentation images + label PNGs.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use image::GrayImage;

use super::{
    check_image, image_dimensions, ClassSample, ClassificationDataset, ImageCheck, ImageSource, LoadOptions,
    SegDataset, SegSample, SkipPolicy, SkipReport, Skipped, Split,
};
use crate::error::{PivotError, Result};

/// Extensions the image decoder understands (the `image` crate is built with PNG and JPEG only).
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Entries of `dir`, sorted by file name so that every machine sees the same order.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| PivotError::file(dir, format!("cannot list folder: {e}")))?;
    let mut entries = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| PivotError::file(dir, format!("cannot list folder: {e}")))?;
        entries.push(entry.path());
    }
    entries.sort();
    Ok(entries)
}

/// Image files under `dir`, recursively (as torchvision's `ImageFolder` walks class folders).
fn image_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in sorted_entries(dir)? {
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            image_files(&path, out)?;
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Applies the skip policy to a per-file failure of a folder data set.
fn skip_or_fail(options: &LoadOptions, skipped: &mut SkipReport, path: &Path, field: &str, message: String) -> Result<()> {
    match options.skip_policy {
        SkipPolicy::Error => Err(PivotError::file(path, format!("{field}: {message}"))),
        SkipPolicy::Skip => {
            skipped.push(Skipped { path: path.to_path_buf(), line: None, field: field.to_string(), message });
            Ok(())
        }
    }
}

/// A class-per-folder image set (the ImageNet / torchvision layout): `root/<class>/<image>`.
/// Class names are the folder names, sorted; labels index them. It dereferences to its
/// [`ClassificationDataset`], so it can be passed wherever one is expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub dataset: ClassificationDataset,
}

impl ImageFolder {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, LoadOptions::default())
    }

    /// `options.limit` keeps at most that many images *per class*, so a quick subset still has
    /// every class.
    pub fn open_with(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let root = dir.as_ref();
        if !root.is_dir() {
            return Err(PivotError::file(root, "not a folder (expected one sub-folder per class)"));
        }
        let class_dirs: Vec<PathBuf> =
            sorted_entries(root)?.into_iter().filter(|p| p.is_dir() && !is_hidden(p)).collect();
        if class_dirs.is_empty() {
            return Err(PivotError::file(root, "no class folders (expected one sub-folder per class)"));
        }
        let mut class_names = Vec::with_capacity(class_dirs.len());
        let mut samples = Vec::new();
        let mut skipped = SkipReport::default();
        for (label, class_dir) in class_dirs.iter().enumerate() {
            let name = class_dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                PivotError::file(class_dir, "class folder name is not valid UTF-8")
            })?;
            class_names.push(name.to_string());
            let mut files = Vec::new();
            image_files(class_dir, &mut files)?;
            let mut kept = 0;
            for file in files {
                if options.limit.is_some_and(|limit| kept >= limit) {
                    break;
                }
                match check_image(&file, options.image_check) {
                    Ok(()) => {
                        samples.push(ClassSample { image: ImageSource::File(file), label });
                        kept += 1;
                    }
                    Err(message) => skip_or_fail(&options, &mut skipped, &file, "image", message)?,
                }
            }
        }
        Ok(ImageFolder { root: root.to_path_buf(), dataset: ClassificationDataset { samples, class_names, skipped } })
    }

    pub fn into_dataset(self) -> ClassificationDataset {
        self.dataset
    }
}

impl Deref for ImageFolder {
    type Target = ClassificationDataset;
    fn deref(&self) -> &ClassificationDataset {
        &self.dataset
    }
}

impl From<ImageFolder> for ClassificationDataset {
    fn from(folder: ImageFolder) -> Self {
        folder.dataset
    }
}

/// How the values stored in a label PNG map to class indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskEncoding {
    /// Stored value = class index; 255 = ignore.
    Identity,
    /// ADE20K's "reduce zero label": 0 (other / unlabelled) → 255 (ignore), v → v − 1.
    ReduceZeroLabel,
    /// COCO-Stuff stuffthingmaps: v → (v + 1) mod 256, so 255 (unlabeled) → class 0 and the value
    /// of COCO category id k (stored as k − 1) → k.
    CocoStuff,
}

impl MaskEncoding {
    pub fn decode(self, stored: u8) -> u8 {
        match self {
            MaskEncoding::Identity => stored,
            MaskEncoding::ReduceZeroLabel => stored.wrapping_sub(1),
            MaskEncoding::CocoStuff => stored.wrapping_add(1),
        }
    }
}

fn load_mask(path: &Path, encoding: MaskEncoding) -> std::result::Result<GrayImage, String> {
    let decoded = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read label image: {e}"))?
        .decode()
        .map_err(|e| format!("not a readable label PNG: {e}"))?;
    // Converting an RGB or palette PNG to grey would silently invent class indices.
    let image::DynamicImage::ImageLuma8(mut mask) = decoded else {
        return Err(format!("expected an 8-bit single-channel label PNG, found {:?}", decoded.color()));
    };
    for value in mask.iter_mut() {
        *value = encoding.decode(*value);
    }
    Ok(mask)
}

impl SegDataset {
    /// Images in `images_dir` (PNG/JPEG, sorted by name) paired with `masks_dir/<stem>.png`.
    /// Masks are decoded now (they are the labels, and small); images are decoded on use.
    /// The ignore index is 255 for every encoding.
    pub fn from_folders(
        images_dir: impl AsRef<Path>,
        masks_dir: impl AsRef<Path>,
        encoding: MaskEncoding,
        class_names: Vec<String>,
        options: LoadOptions,
    ) -> Result<Self> {
        let (images_dir, masks_dir) = (images_dir.as_ref(), masks_dir.as_ref());
        if !images_dir.is_dir() {
            return Err(PivotError::file(images_dir, "image folder not found"));
        }
        if !masks_dir.is_dir() {
            return Err(PivotError::file(masks_dir, "annotation folder not found"));
        }
        let images: Vec<PathBuf> =
            sorted_entries(images_dir)?.into_iter().filter(|p| p.is_file() && is_image_file(p)).collect();
        let mut samples = Vec::new();
        let mut skipped = SkipReport::default();
        for image in images {
            if options.limit.is_some_and(|limit| samples.len() >= limit) {
                break;
            }
            let stem = image.file_stem().unwrap_or_default();
            let mask_path = masks_dir.join(stem).with_extension("png");
            if !mask_path.is_file() {
                let message = format!("no annotation {} for image {}", mask_path.display(), image.display());
                skip_or_fail(&options, &mut skipped, &mask_path, "annotation", message)?;
                continue;
            }
            if let Err(message) = check_image(&image, options.image_check) {
                skip_or_fail(&options, &mut skipped, &image, "image", message)?;
                continue;
            }
            let mask = match load_mask(&mask_path, encoding) {
                Ok(mask) => mask,
                Err(message) => {
                    skip_or_fail(&options, &mut skipped, &mask_path, "annotation", message)?;
                    continue;
                }
            };
            if matches!(options.image_check, ImageCheck::Header | ImageCheck::Decode) {
                let (w, h) = image_dimensions(&image).unwrap_or(mask.dimensions());
                if (w, h) != mask.dimensions() {
                    let message = format!(
                        "annotation is {}x{} but image {} is {w}x{h}",
                        mask.width(),
                        mask.height(),
                        image.display()
                    );
                    skip_or_fail(&options, &mut skipped, &mask_path, "annotation", message)?;
                    continue;
                }
            }
            samples.push(SegSample { image: ImageSource::File(image), mask });
        }
        Ok(SegDataset { samples, class_names, ignore_index: 255, skipped })
    }

    /// ADE20K SceneParsing (`ADEChallengeData2016/`): `images/{training,validation}/*.jpg` with
    /// `annotations/{training,validation}/*.png`, reduce-zero-label, the 150 classes of
    /// [`ADE20K_CLASSES`], ignore index 255. `Split::Test` has no public annotations.
    pub fn ade20k(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        Self::ade20k_with(root, split, LoadOptions::default())
    }

    pub fn ade20k_with(root: impl AsRef<Path>, split: Split, options: LoadOptions) -> Result<Self> {
        let folder = match split {
            Split::Train => "training",
            Split::Val => "validation",
            Split::Test => return Err(PivotError::invalid("ADE20K has no public test annotations; use Split::Val")),
        };
        let root = root.as_ref();
        let names = ADE20K_CLASSES.iter().map(|s| s.to_string()).collect();
        Self::from_folders(
            root.join("images").join(folder),
            root.join("annotations").join(folder),
            MaskEncoding::ReduceZeroLabel,
            names,
            options,
        )
    }

    /// COCO-Stuff 164k: `images/{train2017,val2017}/*.jpg` with
    /// `annotations/{train2017,val2017}/*.png` (stuffthingmaps), values mapped by
    /// [`MaskEncoding::CocoStuff`] onto the 183 names of [`COCO_STUFF_CLASSES`] (0 = `unlabeled`,
    /// then COCO ids 1..=182, including the 11 unused thing ids). Ignore index 255 (never produced
    /// by the mapping; probes that should not learn `unlabeled` can treat class 0 as ignored).
    pub fn coco_stuff(root: impl AsRef<Path>, split: Split) -> Result<Self> {
        Self::coco_stuff_with(root, split, LoadOptions::default())
    }

    pub fn coco_stuff_with(root: impl AsRef<Path>, split: Split, options: LoadOptions) -> Result<Self> {
        let folder = match split {
            Split::Train => "train2017",
            Split::Val => "val2017",
            Split::Test => return Err(PivotError::invalid("COCO-Stuff has no public test annotations; use Split::Val")),
        };
        let root = root.as_ref();
        let names = COCO_STUFF_CLASSES.iter().map(|s| s.to_string()).collect();
        Self::from_folders(
            root.join("images").join(folder),
            root.join("annotations").join(folder),
            MaskEncoding::CocoStuff,
            names,
            options,
        )
    }
}

/// The 150 ADE20K SceneParsing classes after reduce-zero-label (index 0 = `wall`), as in mmseg.
pub const ADE20K_CLASSES: [&str; 150] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
];

/// COCO-Stuff class names indexed by COCO category id (0 = `unlabeled`), from the dataset's
/// `labels.txt`.
pub const COCO_STUFF_CLASSES: [&str; 183] = [
    "unlabeled", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe",
    "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass",
    "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table",
    "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush", "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
];
