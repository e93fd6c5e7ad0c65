//! Tower pretraining: something for post-training to reshape.
//!
//! The study's towers are tiny and start random, so before stage 1 the tower learns to see on
//! scenes that no later stage uses (`StudyPart::Pretrain`), with an objective of its own:
//! multi-label tagging. From the mean of the patch tokens the MLLM reads (hidden state −2), a
//! head (layer norm + linear, dropped afterwards) predicts which colours and shapes are in the
//! scene, the shape and the colour group of the large object, the background texture and the
//! number of objects (29 binary tags, sigmoid cross-entropy). The probe label of the study is the
//! large object's colour group and shape (12 classes): the tags name both factors, but as 8 of 29
//! binary outputs of a pooled feature that also has to carry the rest, so a linear probe on
//! other scenes lands above chance but (at these sizes) below its ceiling, with room for
//! post-training to move it.
//!
//! Pilots (`examples/study_pilot.rs`, probe on 400 + 400 `Eval` scenes, chance 0.083, random
//! tower 0.150 for seed 0, 0.142 for seed 1; "large" is the held-out top-1 of the large object's
//! shape from the head, 6 classes): at 600 steps × 32 of 4,096 scenes, lr 1e-3, seed 0 reaches
//! top-1 0.258 (large 0.307, colour group 0.988), seed 1 0.352. What limits the probe is the
//! large object's shape, not its colour group. A tower twice as wide (192) at 600 steps: 0.280
//! (large 0.287); the one-hot groups as softmax classifications (`categorical_groups`): 0.270 /
//! 0.223 (seeds 0 / 1; large 0.281 / 0.262), so neither is the default. More steps are: the
//! loss was not flat at step 600 (in a 2,000-step run its mean over steps 551–600 is 0.287,
//! then 0.230 at 1,000, 0.202 at 1,500, 0.192 at 2,000), and 2,000 steps give seed 0 top-1
//! 0.345 (large 0.414, tag accuracy 0.892; 227 CPU-s with the probe); 4,000 steps 0.362 (large
//! 0.414, tag accuracy 0.888, loss 0.128; 445 CPU-s): the training loss keeps falling while the
//! held-out scores stop, i.e. 4,096 scenes are overfitted, so more distinct scenes (untested) are
//! the next lever. The default is 2,000 steps (about 3.5 CPU-min, cached): seed 0 0.345, seed 1
//! 0.367 (large 0.381, tag accuracy 0.900; 211 CPU-s), both still below the 0.4–0.75 band.
//! More distinct scenes do not move it: 2,000 steps on 16,384 scenes give 0.350 / 0.350 (seeds
//! 0 / 1; large 0.416 / 0.414, tag accuracy 0.899 / 0.903, last loss 0.221 / 0.206, 231 / 233
//! CPU-s of training), so the held-out large-object shape, stuck near 0.41 in every run from
//! 2,000 steps on, is what the tower cannot yet tell, not the number of scenes; 4,096 stays.
//!
//! The objective reads only the mean of the patch tokens, so nothing asks a token to say what
//! covers its own patch. The patch objective (`patch_weight`) does: each patch token predicts,
//! through a linear map of its own, the class of most of its patch's pixels (the world's mask),
//! cross-entropy added to the tags' loss. Pilots at 2,000 steps, weight 1 (seeds 0 / 1; patch-seg
//! as 05 runs it, MLP 256, 10 epochs, on 120 + 60 `Eval` scenes, macro recall, random tower
//! 0.511 / 0.513; CPU-s of the pretraining, in the first row with the linear probe):
//!
//! | patch classes | probe top-1 | large | tag accuracy | held-out patches right | patch-seg | CPU-s |
//! |---|---|---|---|---|---|---|
//! | none (the tags alone, above) | 0.345 / 0.367 | 0.414 / 0.381 | 0.892 / 0.900 | — | — | 227 / 211 |
//! | background + 6 shapes (`patch_shape_only`) | 0.348 / 0.382 | 0.420 / 0.430 | 0.891 / 0.903 | 0.920 / 0.922 | 0.601 / 0.575 | 228 / 233 |
//! | background + 6 small + 6 large shapes | 0.448 / 0.422 | 0.461 / 0.436 | 0.898 / 0.900 | 0.926 / 0.926 | 0.668 / 0.556 | 246 / 248 |
//!
//! Where a shape is says little more (the shape-only form); which object is the large one does:
//! with the large object's patches as classes of their own the probe of both seeds lands in the
//! 0.4–0.75 band, for 8 % more CPU, and patch-seg stays far from its ceiling. It is the default
//! (`patch_weight` 1; 0 gives the tags alone, whose caches stay valid). Stage 1 as 02 runs it
//! (`study_pilot`, 400 `Eval` pairs) does not bind words to objects any better on these towers:
//! with the image / blank 0.585 / 0.500 and 0.530 / 0.500 (seeds 0 / 1; count 0.988 / 0.981,
//! colour, shape, size and position 0.38–0.53; 392 / 395 CPU-s) at 1,600 full steps, against
//! 0.585 / 0.565 on the tags-only towers; 0.620 / 0.585 at 2,400 (597 / 585 CPU-s), against
//! 0.680 / 0.593 on the tags-only towers at 3,200: the base's target (≥ 0.65 with the image) is
//! not met by the tower's objective.
//!
//! A training scene is rendered when a batch first draws it and kept (image and tags), so a short
//! run (CI's 20 steps) renders the scenes it uses, not all of `scenes` up front.
//!
//! [`TowerPretrain::load_or_run`] caches the tower in a folder with a manifest of every
//! setting (and the tower's shape); a changed setting trains afresh. A run is deterministic on
//! the CPU for a given seed: the tower's initialisation, the head's and the order of the scenes
//! all follow `seed` (the global torch generator is seeded, so run it on one thread at a time).
//!
//! The optimiser is tch's AdamW on the tower's and the head's variable stores: the trainers'
//! fused AdamW works on a whole MLLM, and a bare tower with a throw-away head is not one.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use super::engine::epoch_order;
use super::log::{StepMetrics, TrainLog};
use super::optim::cosine_schedule;
use crate::data::{RenderedScene, Scene, ShapesConfig, ShapesWorld, Split, StudyPart};
use crate::data::{Colour, ColourGroup, Shape, Size, Texture};
use crate::error::{PivotError, Result};
use crate::model::{
    FeatureSelect, LanguageModel, Mllm, MllmConfig, Provenance, Stage, VisionConfig, VisionEncoder, VisionTower, weights,
};
use crate::runtime::{MimeBundle, Progress, Rich, check_interrupt};

/// Version of the cache folder's layout; part of the manifest.
const CACHE_FORMAT: u32 = 2;

/// Settings of a pretraining run (all of them, except `live`, are in the cache's manifest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TowerPretrain {
    /// Seed of the world whose `Pretrain` part supplies the scenes.
    pub world_seed: u64,
    /// Side of the scenes in pixels.
    pub image_size: u32,
    /// Distinct training scenes, cycled through in a new order every epoch.
    pub scenes: usize,
    /// Held-out scenes (the `Pretrain` part's val split) for the tag accuracy at the end.
    pub val_scenes: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    /// Global gradient-norm clip of the tower and head; `None` disables it.
    pub max_grad_norm: Option<f64>,
    /// Train the [`ONE_HOT_GROUPS`] as softmax classifications (cross-entropy over each group's
    /// logits) and only the other tags as independent sigmoids; `false`: every tag a sigmoid.
    pub categorical_groups: bool,
    /// Weight of the patch objective beside the scene tags: every patch token (the tokens the
    /// MLLM reads, before pooling) predicts the class of the pixels that cover most of its patch
    /// ([`patch_targets`]: background, a small object's shape or the large object's; softmax
    /// cross-entropy through a linear map of its own). It keeps "what is where" in the tokens,
    /// which the pooled tags do not ask for. 0 disables it, and is left out of the manifest, so
    /// that caches made before it existed stay valid.
    #[serde(skip_serializing_if = "is_zero")]
    pub patch_weight: f64,
    /// The patch classes without the large/small split (background and the six shapes; the
    /// first form of the objective, kept to reproduce its pilots). Left out of the manifest when
    /// `false`.
    #[serde(skip_serializing_if = "is_false")]
    pub patch_shape_only: bool,
    /// Initialisation and scene order.
    pub seed: u64,
    /// Progress bar.
    #[serde(skip)]
    pub live: bool,
}

impl Default for TowerPretrain {
    fn default() -> Self {
        TowerPretrain {
            world_seed: 0,
            image_size: 64,
            scenes: 4096,
            val_scenes: 512,
            steps: 2000,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            warmup_ratio: 0.05,
            max_grad_norm: Some(1.0),
            categorical_groups: false,
            patch_weight: 1.0,
            patch_shape_only: false,
            seed: 0,
            live: true,
        }
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_false(x: &bool) -> bool {
    !*x
}

/// The tag groups (the tag name's part before `:`) with exactly one true tag in every scene.
pub const ONE_HOT_GROUPS: [&str; 4] = ["large", "large_group", "background", "objects"];

/// The tag names, in the order of the head's outputs.
pub fn pretrain_tag_names() -> Vec<String> {
    let colours = Colour::ALL.iter().map(|c| format!("colour:{}", c.name()));
    let shapes = Shape::ALL.iter().map(|s| format!("shape:{}", s.name()));
    let large = Shape::ALL.iter().map(|s| format!("large:{}", s.name()));
    let large_group = ColourGroup::ALL.iter().map(|g| format!("large_group:{}", g.name()));
    let textures = Texture::ALL.iter().map(|t| format!("background:{}", t.adjective()));
    let counts = (1..=4).map(|k| format!("objects:{k}"));
    colours.chain(shapes).chain(large).chain(large_group).chain(textures).chain(counts).collect()
}

/// The 0/1 tags of a scene, in [`pretrain_tag_names`] order.
pub fn pretrain_tags(scene: &Scene) -> Vec<f32> {
    let mut tags = Vec::with_capacity(29);
    tags.extend(Colour::ALL.iter().map(|c| scene.objects.iter().any(|o| o.colour == *c) as u8 as f32));
    tags.extend(Shape::ALL.iter().map(|s| scene.objects.iter().any(|o| o.shape == *s) as u8 as f32));
    tags.extend(Shape::ALL.iter().map(|s| scene.objects.iter().any(|o| o.shape == *s && o.size == Size::Large) as u8 as f32));
    tags.extend(ColourGroup::ALL.iter().map(|g| scene.objects.iter().any(|o| o.colour.group() == *g && o.size == Size::Large) as u8 as f32));
    tags.extend(Texture::ALL.iter().map(|t| (scene.background.texture == *t) as u8 as f32));
    tags.extend((1..=4).map(|k| (scene.objects.len() == k) as u8 as f32));
    tags
}

/// A pretrained tower with its log.
pub struct PretrainedTower {
    /// The tower (as an encoder that reads what the MLLM reads, provenance "tag-pretrained").
    pub encoder: VisionEncoder,
    pub log: TrainLog,
    /// Share of the held-out scenes' tags predicted right (threshold 0.5).
    pub val_tag_accuracy: f64,
    /// Share of held-out scenes with every tag right.
    pub val_exact: f64,
    /// Top-1 (argmax over the group's logits) on the held-out scenes for each tag group that has
    /// exactly one true tag per scene ([`ONE_HOT_GROUPS`]): a per-factor score that, unlike the
    /// tag accuracy, is not inflated by the many easy negatives. With the patch objective also
    /// `patches`: the share of held-out patches whose class the patch head gets right.
    pub val_group_top1: Vec<(String, f64)>,
    /// Wall time of the training (0 when loaded).
    pub seconds: f64,
    /// Whether it came from the cache folder.
    pub from_cache: bool,
}

impl PretrainedTower {
    /// A fresh MLLM around a copy of the pretrained tower (new projector; `lm` as given), the
    /// start of stage 1.
    pub fn mllm(&self, lm: LanguageModel) -> Result<Mllm> {
        let tower = self.encoder.tower().deep_clone()?;
        let mut mllm = Mllm::new(tower, lm, MllmConfig::default().with_select(self.encoder.select()));
        mllm.provenance.tower = self.encoder.provenance().tower.clone();
        mllm.provenance.history = self.encoder.provenance().history.clone();
        Ok(mllm)
    }
}

impl std::fmt::Display for PretrainedTower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.log.last().and_then(|r| r.get("loss")).unwrap_or(f64::NAN);
        write!(
            f,
            "tag-pretrained tower {}: {} steps, last loss {last:.4}, held-out tag accuracy {:.3}, all tags right {:.3}, top-1 per group {}, {}",
            self.encoder.provenance().tower,
            self.log.len(),
            self.val_tag_accuracy,
            self.val_exact,
            self.val_group_top1.iter().map(|(g, a)| format!("{g} {a:.3}")).collect::<Vec<_>>().join(" · "),
            if self.from_cache { "loaded from the cache".to_string() } else { format!("trained in {:.1} s", self.seconds) }
        )
    }
}

impl Rich for PretrainedTower {
    fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::text(self.to_string());
        if let Ok(fig) = self.log.plot("loss") {
            b = b.with_html(fig.to_html()).with_png(&fig.png);
        }
        b
    }
}

/// Classes of the patch objective: background, the six shapes as small objects, the six shapes
/// as the large object (the world's mask values, and 6 more where the large object shows).
pub const PATCH_CLASSES: i64 = 1 + 2 * Shape::ALL.len() as i64;

/// The patch objective's targets of one scene: for each cell of a `grid` × `grid` split of its
/// mask (row-major, as the tower orders its patch tokens), the class that covers most of the
/// cell's pixels (ties go to the lower class). A pixel's class is its mask value (0 background,
/// 1 + the shape's index), plus 6 where it is `large`'s shape: a scene's shapes are all different
/// (`ShapesWorld`), so the mask value tells the large object's pixels from the others.
pub fn patch_targets(mask: &image::GrayImage, grid: usize, large: Option<Shape>) -> Vec<i64> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let shapes = Shape::ALL.len();
    let large = large.map(|s| s.mask_value() as usize);
    let mut counts = vec![[0u32; PATCH_CLASSES as usize]; grid * grid];
    for (x, y, p) in mask.enumerate_pixels() {
        let cell = (y as usize * grid / h) * grid + x as usize * grid / w;
        let value = (p.0[0] as usize).min(shapes);
        counts[cell][if Some(value) == large { value + shapes } else { value }] += 1;
    }
    counts.iter().map(|c| (0..c.len()).rev().max_by_key(|&k| c[k]).expect("classes") as i64).collect()
}

/// The heads: layer norm and a linear map from the pooled tokens to the tags; with the patch
/// objective, layer norm and a linear map from every patch token to the patch classes.
struct TagHead {
    vs: nn::VarStore,
    norm: nn::LayerNorm,
    linear: nn::Linear,
    patch: Option<(nn::LayerNorm, nn::Linear)>,
}

impl TagHead {
    /// `patch_classes`: 0 for no patch head.
    fn new(hidden: i64, tags: i64, patch_classes: i64, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let norm = nn::layer_norm(vs.root() / "norm", vec![hidden], Default::default());
        let linear = nn::linear(vs.root() / "linear", hidden, tags, Default::default());
        // Made after the tag head, and only when used, so that a run without the patch objective
        // draws the same initialisation as before it existed.
        let patch = (patch_classes > 0).then(|| {
            (
                nn::layer_norm(vs.root() / "patch_norm", vec![hidden], Default::default()),
                nn::linear(vs.root() / "patch_linear", hidden, patch_classes, Default::default()),
            )
        });
        TagHead { vs, norm, linear, patch }
    }

    /// Tag logits [B, T] of a batch of pixels, and with the patch head its logits [B, N, C].
    fn logits(&self, tower: &VisionTower, select: FeatureSelect, pixels: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let tokens = tower.features(pixels, select)?;
        let pooled = tokens.mean_dim([1i64].as_slice(), false, Kind::Float);
        let tags = self.linear.forward(&self.norm.forward(&pooled));
        let patch = self.patch.as_ref().map(|(norm, linear)| linear.forward(&norm.forward(&tokens)));
        Ok((tags, patch))
    }
}

impl TowerPretrain {
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn quiet(mut self) -> Self {
        self.live = false;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(PivotError::config("TowerPretrain", field, msg));
        if self.scenes == 0 || self.batch_size == 0 || self.steps == 0 {
            return bad("scenes/batch_size/steps", format!("{} / {} / {}: each must be at least 1", self.scenes, self.batch_size, self.steps));
        }
        if self.batch_size > self.scenes {
            return bad("batch_size", format!("{} is more than the {} scenes", self.batch_size, self.scenes));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a valid learning rate", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", format!("{} is outside [0, 1)", self.warmup_ratio));
        }
        Ok(())
    }

    fn world(&self) -> ShapesWorld {
        ShapesWorld::new(ShapesConfig::default().seed(self.world_seed).image_size(self.image_size).part(StudyPart::Pretrain))
    }

    /// What the cache's manifest records: the format, every setting but `live`, the tower's
    /// shape and the tags.
    fn manifest(&self, config: &VisionConfig) -> serde_json::Value {
        serde_json::json!({
            "format": CACHE_FORMAT,
            "settings": self,
            "tower": config,
            "tags": pretrain_tag_names(),
        })
    }

    /// Pretrains a fresh tower of shape `config` on `device`.
    pub fn run(&self, config: VisionConfig, device: Device) -> Result<PretrainedTower> {
        self.validate()?;
        let start = Instant::now();
        let world = self.world();
        // Training scenes are rendered when a batch first draws them (and kept): a short run
        // renders only the scenes it uses, not all `scenes` up front.
        let mut train: Vec<Option<(Arc<image::RgbImage>, Vec<f32>, Vec<i64>)>> = (0..self.scenes).map(|_| None).collect();
        let val = world.rendered_scenes(Split::Val, self.val_scenes);
        tch::manual_seed(self.seed as i64);
        let tower = VisionTower::new(config, device);
        let select = FeatureSelect::pivot(tower.config());
        let names = pretrain_tag_names();
        let with_patches = self.patch_weight > 0.0;
        // The shape-only form has the first 7 classes (its targets never reach the large ones).
        let patch_classes = match (with_patches, self.patch_shape_only) {
            (false, _) => 0,
            (true, true) => 1 + Shape::ALL.len() as i64,
            (true, false) => PATCH_CLASSES,
        };
        let head = TagHead::new(tower.config().hidden_size, names.len() as i64, patch_classes, device);
        let grid = tower.config().grid() as usize;
        let large_of = |scene: &Scene| (!self.patch_shape_only).then(|| scene.main_object().shape);
        let adamw = nn::AdamW { wd: self.weight_decay, ..Default::default() };
        let mut opt_tower = adamw.build(tower.var_store(), self.lr)?;
        let mut opt_head = adamw.build(&head.vs, self.lr)?;
        let processor = tower.processor();
        let tensors = |images: &[image::RgbImage], tags: Vec<f32>, patches: Vec<i64>, rows: usize| -> Result<(Tensor, Tensor, Tensor)> {
            let pixels = processor.preprocess(images)?.to_device(device);
            let targets = Tensor::from_slice(&tags).view([rows as i64, -1]).to_device(device);
            let patches = Tensor::from_slice(&patches).view([rows as i64, -1]).to_device(device);
            Ok((pixels, targets, patches))
        };
        let batch = |rows: &[usize], scenes: &[RenderedScene]| -> Result<(Tensor, Tensor, Tensor)> {
            let images: Vec<image::RgbImage> = rows.iter().map(|&i| scenes[i].image.as_ref().clone()).collect();
            let tags: Vec<f32> = rows.iter().flat_map(|&i| pretrain_tags(&scenes[i].scene)).collect();
            let patches: Vec<i64> =
                if with_patches { rows.iter().flat_map(|&i| patch_targets(&scenes[i].mask, grid, large_of(&scenes[i].scene))).collect() } else { Vec::new() };
            tensors(&images, tags, patches, rows.len())
        };
        let mut train_batch = |rows: &[usize]| -> Result<(Tensor, Tensor, Tensor)> {
            let mut images = Vec::with_capacity(rows.len());
            let mut tags = Vec::with_capacity(rows.len() * names.len());
            let mut patches = Vec::with_capacity(rows.len() * grid * grid);
            for &i in rows {
                let (image, t, p) = train[i].get_or_insert_with(|| {
                    let r = world.render(Split::Train, i);
                    let p = if with_patches { patch_targets(&r.mask, grid, large_of(&r.scene)) } else { Vec::new() };
                    (r.image, pretrain_tags(&r.scene), p)
                });
                images.push(image.as_ref().clone());
                tags.extend_from_slice(t);
                patches.extend_from_slice(p);
            }
            tensors(&images, tags, patches, rows.len())
        };
        // Cross-entropy of the patch logits [B, N, C] against the targets [B, N].
        let patch_loss = |logits: &Tensor, targets: &Tensor| -> Result<Tensor> {
            let n = logits.size()[1];
            if n != targets.size()[1] {
                return Err(PivotError::invalid(format!(
                    "tower pretrain: the tower gives {n} patch tokens, the {grid} × {grid} patch targets {}",
                    targets.size()[1]
                )));
            }
            Ok(logits.reshape([-1, patch_classes]).cross_entropy_for_logits(&targets.reshape([-1])))
        };

        // Index ranges (first, length) of the one-hot groups in the head's outputs.
        let groups: Vec<(String, i64, i64)> = ONE_HOT_GROUPS
            .iter()
            .map(|g| {
                let idx: Vec<usize> = (0..names.len()).filter(|&i| names[i].split_once(':').map(|(p, _)| p) == Some(*g)).collect();
                (g.to_string(), idx[0] as i64, idx.len() as i64)
            })
            .collect();
        // The sigmoid tags: all of them, or those outside the one-hot groups.
        let sigmoid_tags: Vec<i64> = (0..names.len() as i64)
            .filter(|&i| !self.categorical_groups || !groups.iter().any(|(_, first, len)| (*first..first + len).contains(&i)))
            .collect();
        let sigmoid_index = Tensor::from_slice(&sigmoid_tags).to_device(device);
        let tag_loss = |logits: &Tensor, targets: &Tensor| -> Tensor {
            let mut loss = logits.index_select(1, &sigmoid_index).binary_cross_entropy_with_logits::<Tensor>(
                &targets.index_select(1, &sigmoid_index),
                None,
                None,
                Reduction::Mean,
            );
            if self.categorical_groups {
                for (_, first, len) in &groups {
                    let classes = targets.narrow(1, *first, *len).argmax(1, false);
                    loss = loss + logits.narrow(1, *first, *len).cross_entropy_for_logits(&classes);
                }
            }
            loss
        };
        let mut log = TrainLog::new("tower pretrain");
        let mut progress = self.live.then(|| Progress::new("tower pretrain", self.steps as u64));
        let per_epoch = self.scenes / self.batch_size;
        let mut order = (usize::MAX, Vec::new());
        for step in 0..self.steps {
            check_interrupt(&format!("tower pretrain step {} of {}", step + 1, self.steps))?;
            let t0 = Instant::now();
            let epoch = step / per_epoch;
            if order.0 != epoch {
                order = (epoch, epoch_order(self.seed, epoch, self.scenes, true));
            }
            let first = (step % per_epoch) * self.batch_size;
            let (pixels, targets, patch_classes) = train_batch(&order.1[first..first + self.batch_size])?;
            let (logits, patch_logits) = head.logits(&tower, select, &pixels)?;
            let mut loss = tag_loss(&logits, &targets);
            let mut patch_value = None;
            if let Some(patch_logits) = &patch_logits {
                let l = patch_loss(patch_logits, &patch_classes)?;
                patch_value = Some(l.double_value(&[]));
                loss = loss + l * self.patch_weight;
            }
            let loss_value = loss.double_value(&[]);
            if !loss_value.is_finite() {
                return Err(PivotError::NonFinite { what: format!("tower pretrain loss ({loss_value})"), step: step + 1, last_good: step });
            }
            opt_tower.zero_grad();
            opt_head.zero_grad();
            loss.backward();
            let grad_norm = global_grad_norm(&[tower.var_store(), &head.vs]);
            let clip = match self.max_grad_norm {
                Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
                _ => 1.0,
            };
            if clip < 1.0 {
                tch::no_grad(|| {
                    for vs in [tower.var_store(), &head.vs] {
                        for t in vs.trainable_variables() {
                            let _ = t.grad().f_mul_(&Tensor::from(clip));
                        }
                    }
                });
            }
            let lr = self.lr * cosine_schedule(step, self.steps, self.warmup_ratio);
            opt_tower.set_lr(lr);
            opt_head.set_lr(lr);
            opt_tower.step();
            opt_head.step();
            let mut row = StepMetrics { step: step + 1, epoch: (step + 1) as f64 / per_epoch as f64, values: Vec::new() };
            row.set("loss", loss_value);
            if let Some(v) = patch_value {
                row.set("patch_loss", v);
            }
            row.set("learning_rate", lr);
            row.set("grad_norm", grad_norm);
            row.set("step_seconds", t0.elapsed().as_secs_f64());
            if let Some(p) = &mut progress {
                p.set(step as u64 + 1, row.short());
            }
            log.rows.push(row);
        }
        if let Some(p) = &mut progress {
            p.finish();
        }
        let (val_tag_accuracy, val_exact, val_group_top1) = tch::no_grad(|| -> Result<(f64, f64, Vec<(String, f64)>)> {
            if val.is_empty() {
                return Ok((f64::NAN, f64::NAN, groups.iter().map(|g| (g.0.clone(), f64::NAN)).collect()));
            }
            let (mut right, mut exact) = (0.0, 0.0);
            let mut group_right = vec![0.0; groups.len()];
            let mut patch_right = 0.0;
            for rows in (0..val.len()).collect::<Vec<_>>().chunks(64) {
                let (pixels, targets, patch_classes) = batch(rows, &val)?;
                let (logits, patch_logits) = head.logits(&tower, select, &pixels)?;
                if let Some(p) = &patch_logits {
                    patch_right += p.argmax(-1, false).eq_tensor(&patch_classes).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
                        * rows.len() as f64;
                }
                let predicted = logits.gt(0.0).to_kind(Kind::Float);
                let same = predicted.eq_tensor(&targets).to_kind(Kind::Float);
                right += same.sum(Kind::Double).double_value(&[]);
                exact += same.min_dim(1, false).0.sum(Kind::Double).double_value(&[]);
                for (k, (_, first, len)) in groups.iter().enumerate() {
                    let hit = logits.narrow(1, *first, *len).argmax(1, false).eq_tensor(&targets.narrow(1, *first, *len).argmax(1, false));
                    group_right[k] += hit.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                }
            }
            let n = val.len() as f64;
            let mut top1: Vec<(String, f64)> = groups.iter().zip(group_right).map(|(g, r)| (g.0.clone(), r / n)).collect();
            if with_patches {
                // Not a one-hot group of the tags: the share of held-out patches whose class the
                // patch head gets right.
                top1.push(("patches".to_string(), patch_right / n));
            }
            Ok((right / (val.len() * names.len()) as f64, exact / n, top1))
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let mut provenance = Provenance::new(Stage::Custom("tag-pretrained".into()), format!("{} tag-pretrained", tower.config().name), "");
        provenance.record(
            Stage::Custom("tag-pretrained".into()),
            self.steps,
            self.seed,
            format!(
                "tower pretrain: tagging{}{}, {} steps × {} of {} scenes, lr {:e}",
                if self.categorical_groups { " (one-hot groups as softmax)" } else { "" },
                if with_patches {
                    format!(" + patch classes{} × {}", if self.patch_shape_only { " (shape only)" } else { "" }, self.patch_weight)
                } else {
                    String::new()
                },
                self.steps, self.batch_size, self.scenes, self.lr),
        );
        let encoder = VisionEncoder::new(tower, provenance, select);
        Ok(PretrainedTower { encoder, log, val_tag_accuracy, val_exact, val_group_top1, seconds, from_cache: false })
    }

    /// The pretrained tower cached in `dir`: loaded when `dir/manifest.json` matches these
    /// settings and `config`, trained and saved there otherwise (replacing what was there).
    pub fn load_or_run(&self, config: VisionConfig, dir: impl AsRef<Path>, device: Device) -> Result<PretrainedTower> {
        let dir = dir.as_ref();
        let manifest_path = dir.join("manifest.json");
        let manifest = self.manifest(&config);
        if manifest_path.is_file() {
            let found = weights::read_json(&manifest_path)?;
            if found.get("manifest") == Some(&manifest) {
                let encoder = VisionEncoder::from_pretrained(dir, device)?;
                let number = |key: &str| found.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
                let log_path = dir.join("log.json");
                let log: TrainLog = serde_json::from_value(weights::read_json(&log_path)?)
                    .map_err(|e| PivotError::config(log_path.display().to_string(), "log", e))?;
                return Ok(PretrainedTower {
                    encoder,
                    log,
                    val_tag_accuracy: number("val_tag_accuracy"),
                    val_exact: number("val_exact"),
                    val_group_top1: serde_json::from_value(found.get("val_group_top1").cloned().unwrap_or_default()).unwrap_or_default(),
                    seconds: 0.0,
                    from_cache: true,
                });
            }
            // Settings changed: the old manifest goes first, so that a run cut short never
            // leaves a manifest that vouches for half-replaced weights.
            std::fs::remove_file(&manifest_path).map_err(|e| PivotError::file(&manifest_path, e))?;
        }
        let trained = self.run(config, device)?;
        trained.encoder.save_pretrained(dir)?;
        let log = serde_json::to_string_pretty(&trained.log).expect("json");
        weights::write_text_atomic(&dir.join("log.json"), &log)?;
        let record = serde_json::json!({
            "manifest": manifest,
            "val_tag_accuracy": trained.val_tag_accuracy,
            "val_exact": trained.val_exact,
            "val_group_top1": trained.val_group_top1,
            "seconds": trained.seconds,
        });
        weights::write_text_atomic(&manifest_path, &serde_json::to_string_pretty(&record).expect("json"))?;
        Ok(trained)
    }
}

/// √(Σ‖g‖²) over the trainable variables of `stores` that have a gradient.
fn global_grad_norm(stores: &[&nn::VarStore]) -> f64 {
    let mut sum = 0.0;
    for vs in stores {
        for t in vs.trainable_variables() {
            let g = t.grad();
            if g.defined() {
                sum += g.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]);
            }
        }
    }
    sum.sqrt()
}
