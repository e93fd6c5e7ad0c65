//! `ShapesWorld`: the embedded, procedural, seeded data world.
//!
//! Every image shows one large object and up to three small ones (distinct shapes, distinct
//! colours) on a textured background; objects may overlap, later ones covering earlier ones, but
//! each stays at least 60 % visible so questions about it have an answer in the pixels.
//!
//! The probe label is (colour group of the large object, shape of the large object): 2 × 6 = 12
//! classes. It is chosen first, by a seeded permutation within each block of 12 consecutive
//! indices, so any prefix of a split is balanced to within one sample per class. The background
//! is drawn independently of the label, and small objects use every colour and shape, so neither
//! the background nor a single colour statistic gives the label away: the probe has to find the
//! large object and read its shape.
//!
//! Sample i of every task in a split shows the same image (scene i), and `vqa(split, n)[i]` is the
//! SFT view of `preferences(split, n)[i]` (same question, answer = chosen), as PIVOT trains SFT and
//! DPO on the same rows.

use std::sync::Arc;

use image::{GrayImage, RgbImage};

use super::render::{owner_map, render};
use super::rng::{Stream, WorldRng, WorldSeed};
use super::scene::{Background, BoundingBox, Colour, ColourGroup, Scene, SceneObject, Shape, Size, Texture};
use super::text;
use super::{
    CaptionDataset, CaptionSample, ClassSample, ClassificationDataset, ImageSource, PreferenceDataset,
    PreferenceSample, SegDataset, SegSample, Split, VqaDataset, VqaSample,
};

/// The question categories of the world's VQA and preference data.
pub const VQA_CATEGORIES: [&str; 5] = ["colour", "shape", "count", "position", "size"];

/// A scene with its image and class mask.
#[derive(Debug, Clone)]
pub struct RenderedScene {
    pub scene: Scene,
    pub image: Arc<RgbImage>,
    /// 0 = background, 1 + `Shape::index()` for object pixels.
    pub mask: GrayImage,
}

/// Which stage of a study a world's scenes serve. Each part draws every scene, text and texture
/// from random streams of its own, so for one seed and split the pretraining, stage-1, stage-2
/// and evaluation scenes are four disjoint sets: no stage trains or is measured on another's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StudyPart {
    /// The tower's own pretraining (`train::TowerPretrain`), seen by no later stage.
    Pretrain,
    /// Stage 1: caption alignment and instruction tuning of the base.
    Stage1,
    /// Stage 2: the SFT and DPO rows.
    Stage2,
    /// Every measurement: probes, choice accuracy, alignment, gradient maps.
    Eval,
}

impl StudyPart {
    pub const ALL: [StudyPart; 4] = [StudyPart::Pretrain, StudyPart::Stage1, StudyPart::Stage2, StudyPart::Eval];

    pub fn name(self) -> &'static str {
        match self {
            StudyPart::Pretrain => "pretrain",
            StudyPart::Stage1 => "stage1",
            StudyPart::Stage2 => "stage2",
            StudyPart::Eval => "eval",
        }
    }

    /// The byte of the random streams' key; 0 is the world without a part.
    fn key(self) -> u8 {
        self as u8 + 1
    }
}

impl std::fmt::Display for StudyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of the world. Sizes are relative to `image_size`, so any size renders the same
/// layouts at a different resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapesConfig {
    pub seed: u64,
    /// Side of the square RGB images; 64 fits the tiny tower (patch 8 → 8 × 8 grid).
    pub image_size: u32,
    /// Most objects per image (1..=4; the large object is always there).
    pub max_objects: usize,
    /// Images per split that `export` writes (train, val, test).
    pub export_counts: [usize; 3],
    /// The study part whose scenes this world draws; `None`: the world's own stream (what every
    /// world drew before parts existed, byte for byte).
    pub part: Option<StudyPart>,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig { seed: 0, image_size: 64, max_objects: 4, export_counts: [1000, 200, 200], part: None }
    }
}

impl ShapesConfig {
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn image_size(mut self, image_size: u32) -> Self {
        self.image_size = image_size;
        self
    }
    pub fn max_objects(mut self, max_objects: usize) -> Self {
        self.max_objects = max_objects;
        self
    }
    pub fn export_counts(mut self, train: usize, val: usize, test: usize) -> Self {
        self.export_counts = [train, val, test];
        self
    }
    pub fn part(mut self, part: StudyPart) -> Self {
        self.part = Some(part);
        self
    }
}

/// The procedural world. Cheap to construct; every sample is generated on demand from
/// (seed, split, index).
#[derive(Debug, Clone)]
pub struct ShapesWorld {
    config: ShapesConfig,
}

const SMALL_RADIUS: (f64, f64) = (0.09, 0.12);
const LARGE_RADIUS: (f64, f64) = (0.20, 0.26);
const MIN_VISIBLE: f64 = 0.6;
const PLACEMENT_TRIES: usize = 64;

impl ShapesWorld {
    /// Out-of-range settings are clamped rather than rejected (image size to at least 16 pixels,
    /// `max_objects` to 1..=4), so a notebook cell never fails here.
    pub fn new(config: ShapesConfig) -> Self {
        let mut config = config;
        config.image_size = config.image_size.max(16);
        config.max_objects = config.max_objects.clamp(1, 4);
        ShapesWorld { config }
    }

    pub fn config(&self) -> &ShapesConfig {
        &self.config
    }

    /// The same world drawing the scenes of study part `part` (same seed, size and objects).
    pub fn part(&self, part: StudyPart) -> ShapesWorld {
        ShapesWorld::new(self.config.clone().part(part))
    }

    pub(super) fn world_seed(&self) -> WorldSeed {
        WorldSeed { seed: self.config.seed, part: self.config.part.map_or(0, StudyPart::key) }
    }

    pub fn num_classes(&self) -> usize {
        ColourGroup::ALL.len() * Shape::ALL.len()
    }

    /// Probe class names, `<group>_<shape>`, in label order (which is also sorted order, so an
    /// exported class-per-folder copy reads back with the same labels).
    pub fn class_names(&self) -> Vec<String> {
        ColourGroup::ALL
            .iter()
            .flat_map(|g| Shape::ALL.iter().map(move |s| format!("{}_{}", g.name(), s.name())))
            .collect()
    }

    /// Segmentation class names: `background`, then the shapes.
    pub fn seg_class_names(&self) -> Vec<String> {
        std::iter::once("background".to_string()).chain(Shape::ALL.iter().map(|s| s.name().to_string())).collect()
    }

    fn class_of(&self, split: Split, index: usize) -> usize {
        let k = self.num_classes();
        let block = (index / k) as u64;
        let mut perm: Vec<usize> = (0..k).collect();
        WorldRng::new(self.world_seed(), split, block, Stream::ClassBlock).shuffle(&mut perm);
        perm[index % k]
    }

    /// The layout of image `index` of `split`.
    pub fn scene(&self, split: Split, index: usize) -> Scene {
        let size = self.config.image_size;
        let s = size as f64;
        let class = self.class_of(split, index);
        let group = ColourGroup::ALL[class / Shape::ALL.len()];
        let main_shape = Shape::ALL[class % Shape::ALL.len()];
        let mut rng = WorldRng::new(self.world_seed(), split, index as u64, Stream::Scene);

        let main_colour = *rng.choose(&group.colours());
        let mut shapes: Vec<Shape> = Shape::ALL.iter().copied().filter(|&x| x != main_shape).collect();
        let mut colours: Vec<Colour> = Colour::ALL.iter().copied().filter(|&c| c != main_colour).collect();
        rng.shuffle(&mut shapes);
        rng.shuffle(&mut colours);
        let mut count = 1 + rng.below(self.config.max_objects);

        let mut kinds = vec![(main_shape, main_colour, Size::Large)];
        kinds.extend((1..count).map(|i| (shapes[i - 1], colours[i - 1], Size::Small)));

        // Rejection sampling of positions until every object is clearly visible; a crowded
        // layout that never fits loses its last small object.
        loop {
            for _ in 0..PLACEMENT_TRIES {
                let geometry: Vec<(Shape, f64, f64, f64)> = kinds
                    .iter()
                    .map(|&(shape, _, size)| {
                        let (lo, hi) = if size == Size::Large { LARGE_RADIUS } else { SMALL_RADIUS };
                        let radius = rng.range(lo, hi) * s;
                        let cx = rng.range(radius + 1.0, s - radius - 1.0);
                        let cy = rng.range(radius + 1.0, s - radius - 1.0);
                        (shape, cx, cy, radius)
                    })
                    .collect();
                let mut draw_order: Vec<usize> = (0..count).collect();
                rng.shuffle(&mut draw_order);
                if let Some(objects) = visible_objects(size, &kinds, &geometry, &draw_order) {
                    let background = self.background(&mut rng);
                    return Scene { image_size: size, objects, draw_order, background, class };
                }
            }
            count -= 1;
            kinds.truncate(count);
        }
    }

    fn background(&self, rng: &mut WorldRng) -> Background {
        let texture = *rng.choose(&Texture::ALL);
        let grey = rng.int_range(70, 190);
        // Channel offsets within ±20 keep the base desaturated (spread ≤ 40).
        let base = [0; 3].map(|_: u8| (grey + rng.int_range(-20, 20)) as u8);
        let amplitude = rng.int_range(10, 26);
        let period = match texture {
            Texture::Noise => rng.int_range(2, 4),
            _ => rng.int_range(4, 10),
        } as u32;
        let orientation = rng.below(4) as u8;
        Background { texture, base, amplitude, period, orientation }
    }

    /// Image `index` of `split`, with its layout and class mask.
    pub fn render(&self, split: Split, index: usize) -> RenderedScene {
        let scene = self.scene(split, index);
        let (image, mask) = render(&scene, self.world_seed(), split, index as u64);
        RenderedScene { scene, image: Arc::new(image), mask }
    }

    /// Scenes `0..n` of `split` with their images and masks (rendered on all cores).
    pub fn rendered_scenes(&self, split: Split, n: usize) -> Vec<RenderedScene> {
        self.rendered(split, n).map(|(_, r)| r).collect()
    }

    /// Scenes `0..n`, rendered on all cores. Each index has its own random streams, so the
    /// result does not depend on the number of threads.
    fn rendered(&self, split: Split, n: usize) -> impl Iterator<Item = (usize, RenderedScene)> {
        const PER_THREAD_MIN: usize = 256;
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.div_ceil(PER_THREAD_MIN));
        let scenes: Vec<RenderedScene> = if threads <= 1 {
            (0..n).map(|i| self.render(split, i)).collect()
        } else {
            let chunk = n.div_ceil(threads);
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
                        scope.spawn(move || range.map(|i| self.render(split, i)).collect::<Vec<_>>())
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect()
            })
        };
        scenes.into_iter().enumerate()
    }

    /// Short captions for stage-1 alignment ("A picture of a large red circle and a small blue star
    /// on a striped background .").
    pub fn captions(&self, split: Split, n: usize) -> CaptionDataset {
        let seed = self.world_seed();
        CaptionDataset::new(
            self.rendered(split, n)
                .map(|(i, r)| {
                    let mut rng = WorldRng::new(seed, split, i as u64, Stream::Caption);
                    CaptionSample { image: ImageSource::Memory(r.image), caption: text::caption(&r.scene, &mut rng) }
                })
                .collect(),
        )
    }

    /// Image–caption pairs for Platonic alignment: one deterministic, complete description per
    /// image (every object with size, colour, shape and place, and the background).
    pub fn image_text_pairs(&self, split: Split, n: usize) -> CaptionDataset {
        CaptionDataset::new(
            self.rendered(split, n)
                .map(|(_, r)| CaptionSample { caption: text::description(&r.scene), image: ImageSource::Memory(r.image) })
                .collect(),
        )
    }

    /// One question per image about colour, shape, count, relative position or size, answered by
    /// a short template sentence.
    pub fn vqa(&self, split: Split, n: usize) -> VqaDataset {
        VqaDataset::new(
            self.rendered(split, n)
                .map(|(i, r)| {
                    let qa = self.question(split, i, &r.scene);
                    VqaSample {
                        image: ImageSource::Memory(r.image),
                        question: qa.question.clone(),
                        answer: qa.answer(),
                        category: qa.category.to_string(),
                    }
                })
                .collect(),
        )
    }

    /// The questions of `vqa` with a rejected answer that hallucinates exactly one visual fact of
    /// the question's category.
    pub fn preferences(&self, split: Split, n: usize) -> PreferenceDataset {
        let seed = self.world_seed();
        PreferenceDataset::new(
            self.rendered(split, n)
                .map(|(i, r)| {
                    let qa = self.question(split, i, &r.scene);
                    let mut rng = WorldRng::new(seed, split, i as u64, Stream::Hallucination);
                    PreferenceSample {
                        image: ImageSource::Memory(r.image),
                        question: qa.question.clone(),
                        chosen: qa.answer(),
                        rejected: qa.hallucinated(&mut rng),
                        category: qa.category.to_string(),
                        image_rejected: None,
                    }
                })
                .collect(),
        )
    }

    fn question(&self, split: Split, index: usize, scene: &Scene) -> text::Qa {
        let mut rng = WorldRng::new(self.world_seed(), split, index as u64, Stream::Question);
        text::question(scene, &mut rng)
    }

    /// Linear-probe data: 12 balanced classes (colour group × shape of the large object).
    pub fn classification(&self, split: Split, n: usize) -> ClassificationDataset {
        ClassificationDataset::new(
            self.rendered(split, n)
                .map(|(_, r)| ClassSample { label: r.scene.class, image: ImageSource::Memory(r.image) })
                .collect(),
            self.class_names(),
        )
    }

    /// Segmentation-probe data: per-pixel shape category (0 background, 1..=6 shapes; the world
    /// draws hard edges, so no pixel needs the ignore index 255).
    pub fn segmentation(&self, split: Split, n: usize) -> SegDataset {
        SegDataset::new(
            self.rendered(split, n).map(|(_, r)| SegSample { image: ImageSource::Memory(r.image), mask: r.mask }).collect(),
            self.seg_class_names(),
            255,
        )
    }
}

/// The scene objects if every one is at least `MIN_VISIBLE` visible, else `None`.
pub(super) fn visible_objects(
    size: u32,
    kinds: &[(Shape, Colour, Size)],
    geometry: &[(Shape, f64, f64, f64)],
    draw_order: &[usize],
) -> Option<Vec<SceneObject>> {
    let n = size as usize;
    let owners = owner_map(size, geometry, draw_order);
    let mut objects = Vec::with_capacity(kinds.len());
    for (i, (&(shape, colour, obj_size), &(_, cx, cy, radius))) in kinds.iter().zip(geometry).enumerate() {
        let alone = owner_map(size, &geometry[i..=i], &[0]).iter().filter(|o| o.is_some()).count();
        let mut visible = 0;
        let mut bbox = BoundingBox { x0: u32::MAX, y0: u32::MAX, x1: 0, y1: 0 };
        for (p, owner) in owners.iter().enumerate() {
            if *owner == Some(i) {
                let (x, y) = ((p % n) as u32, (p / n) as u32);
                visible += 1;
                bbox = BoundingBox { x0: bbox.x0.min(x), y0: bbox.y0.min(y), x1: bbox.x1.max(x + 1), y1: bbox.y1.max(y + 1) };
            }
        }
        let fraction = if alone == 0 { 0.0 } else { visible as f64 / alone as f64 };
        // A lone object is always accepted, so placement terminates even on tiny images.
        if kinds.len() > 1 && (fraction < MIN_VISIBLE || visible < 6) {
            return None;
        }
        objects.push(SceneObject {
            shape,
            colour,
            size: obj_size,
            cx,
            cy,
            radius,
            bbox,
            visible_pixels: visible,
            visible_fraction: fraction,
        });
    }
    Some(objects)
}
