//! Counterfactual preference pairs: the study's stage-2 rows and its two-way choice items.
//!
//! Every pair is built from one scene `a` and a counterfactual `b` of it in which the asked fact
//! takes another object's value (its colour, its shape, its size), the target sits on the other
//! side of the reference object, or one small object is gone (count). The question is the same
//! for both, the two answers differ in the one word that states the fact, and the rows come in
//! mirrored twos:
//!
//! - row 2k: image `a`, chosen "… x …", rejected "… y …";
//! - row 2k+1: image `b`, chosen "… y …", rejected "… x …".
//!
//! So every rejected answer is plausible (the wrong colour, shape or size is another object's in
//! the same image, a wrong count is off by one, a wrong side is the other side), and every text
//! (question, answer) is chosen exactly as often as it is rejected: a model that does not look at
//! the image cannot beat chance, whatever text statistics it learns (see
//! [`text_only_accuracy`](super::text_only_accuracy)).
//!
//! [`ShapesWorld::image_preferences`] gives the image-counterfactual form of the same pairs
//! (PIVOT's `image_rejected`): the text is the row's true answer on both sides, and the rejected
//! image is the row's scene with one object changed so that the answer is wrong for it.
//!
//! Counterfactual scenes keep the base scene's background bytes (its texture stream) and are
//! checked like any scene (inside the image, every object at least 60 % visible). Pair k draws
//! its category first, then tries candidate base scenes (indices k + j·2³², j ≥ 1: never the
//! scene k that the part's other tasks show) until one allows a pair of that category, so the
//! five categories are equally likely. Counterfactual scenes keep the base scene's `class`.

use std::sync::Arc;

use image::RgbImage;

use super::render::render;
use super::rng::{Stream, WorldRng};
use super::scene::{Colour, Scene, Shape, Size};
use super::world::{ShapesWorld, visible_objects};
use super::{ImageSource, PreferenceDataset, PreferenceSample, Split};
use crate::error::{PivotError, Result};

const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];

/// Candidate base scenes per pair before any category is accepted (a position or size pair fits
/// in about one scene of four; a colour pair in every scene of two objects or more).
const CANDIDATES: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct Placed {
    shape: Shape,
    colour: Colour,
    size: Size,
    cx: f64,
    cy: f64,
    radius: f64,
}

/// An editable copy of a scene's layout.
#[derive(Debug, Clone)]
struct Layout {
    objects: Vec<Placed>,
    draw_order: Vec<usize>,
}

impl Layout {
    fn of(scene: &Scene) -> Layout {
        let objects = scene
            .objects
            .iter()
            .map(|o| Placed { shape: o.shape, colour: o.colour, size: o.size, cx: o.cx, cy: o.cy, radius: o.radius })
            .collect();
        Layout { objects, draw_order: scene.draw_order.clone() }
    }

    /// The layout without object `i`.
    fn without(&self, i: usize) -> Layout {
        let mut objects = self.objects.clone();
        objects.remove(i);
        let draw_order = self.draw_order.iter().filter(|&&j| j != i).map(|&j| if j > i { j - 1 } else { j }).collect();
        Layout { objects, draw_order }
    }

    /// The scene of this layout on `base`'s background, if every object lies inside the image
    /// (as the world places them) and stays clearly visible.
    fn scene(&self, base: &Scene) -> Option<Scene> {
        let s = base.image_size as f64;
        let inside = |c: f64, r: f64| c - r >= 1.0 - 1e-9 && c + r <= s - 1.0 + 1e-9;
        if !self.objects.iter().all(|o| inside(o.cx, o.radius) && inside(o.cy, o.radius)) {
            return None;
        }
        let kinds: Vec<(Shape, Colour, Size)> = self.objects.iter().map(|o| (o.shape, o.colour, o.size)).collect();
        let geometry: Vec<(Shape, f64, f64, f64)> = self.objects.iter().map(|o| (o.shape, o.cx, o.cy, o.radius)).collect();
        let objects = visible_objects(base.image_size, &kinds, &geometry, &self.draw_order)?;
        Some(Scene {
            image_size: base.image_size,
            objects,
            draw_order: self.draw_order.clone(),
            background: base.background.clone(),
            class: base.class,
        })
    }
}

/// One question on two scenes: `answers[0]` is true of `scenes[0]`, `answers[1]` of `scenes[1]`;
/// `counterfactuals[i]` is `scenes[i]` with one object changed so that `answers[i]` is false.
struct Counterfactual {
    category: &'static str,
    question: String,
    answers: [String; 2],
    scenes: [Scene; 2],
    counterfactuals: [Scene; 2],
}

fn reference(o: &Placed) -> String {
    format!("{} {}", o.colour.name(), o.shape.name())
}

/// Objects `(t, o)` with `t != o`, in a random order.
fn object_pairs(n: usize, rng: &mut WorldRng) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (0..n).flat_map(|t| (0..n).filter(move |&o| o != t).map(move |o| (t, o))).collect();
    rng.shuffle(&mut pairs);
    pairs
}

fn colour_pair(base: &Scene, rng: &mut WorldRng) -> Option<Counterfactual> {
    let a = Layout::of(base);
    let question_form = rng.coin();
    for (t, o) in object_pairs(a.objects.len(), rng) {
        let (ct, co) = (a.objects[t].colour, a.objects[o].colour);
        let mut b = a.clone();
        b.objects[t].colour = co;
        b.objects[o].colour = ct;
        let mut cf_a = a.clone();
        cf_a.objects[t].colour = co;
        let mut cf_b = b.clone();
        cf_b.objects[t].colour = ct;
        let shape = a.objects[t].shape.name();
        let question = if question_form { format!("What colour is the {shape} ?") } else { format!("What is the colour of the {shape} ?") };
        let answer = |c: Colour| format!("The {shape} is {} .", c.name());
        return Some(Counterfactual {
            category: "colour",
            question,
            answers: [answer(ct), answer(co)],
            scenes: [a.scene(base)?, b.scene(base)?],
            counterfactuals: [cf_a.scene(base)?, cf_b.scene(base)?],
        });
    }
    None
}

fn shape_pair(base: &Scene, rng: &mut WorldRng) -> Option<Counterfactual> {
    let a = Layout::of(base);
    let question_form = rng.coin();
    for (t, o) in object_pairs(a.objects.len(), rng) {
        let (st, so) = (a.objects[t].shape, a.objects[o].shape);
        let mut b = a.clone();
        b.objects[t].shape = so;
        b.objects[o].shape = st;
        let mut cf_a = a.clone();
        cf_a.objects[t].shape = so;
        let mut cf_b = b.clone();
        cf_b.objects[t].shape = st;
        // Shapes cover different pixels: a swap can hide an object, so try the next pair then.
        let (Some(sa), Some(sb), Some(ca), Some(cb)) = (a.scene(base), b.scene(base), cf_a.scene(base), cf_b.scene(base)) else {
            continue;
        };
        let colour = a.objects[t].colour.name();
        let question = if question_form { format!("What shape is the {colour} object ?") } else { format!("Which shape is {colour} ?") };
        let answer = |s: Shape| format!("The {colour} shape is a {} .", s.name());
        return Some(Counterfactual { category: "shape", question, answers: [answer(st), answer(so)], scenes: [sa, sb], counterfactuals: [ca, cb] });
    }
    None
}

fn size_pair(base: &Scene, rng: &mut WorldRng) -> Option<Counterfactual> {
    let a = Layout::of(base);
    let question_form = rng.coin();
    for (t, o) in object_pairs(a.objects.len(), rng) {
        let (ot, oo) = (a.objects[t], a.objects[o]);
        if ot.size == oo.size {
            continue;
        }
        let mut b = a.clone();
        (b.objects[t].radius, b.objects[t].size) = (oo.radius, oo.size);
        (b.objects[o].radius, b.objects[o].size) = (ot.radius, ot.size);
        let mut cf_a = a.clone();
        (cf_a.objects[t].radius, cf_a.objects[t].size) = (oo.radius, oo.size);
        let mut cf_b = b.clone();
        (cf_b.objects[t].radius, cf_b.objects[t].size) = (ot.radius, ot.size);
        let (Some(sa), Some(sb), Some(ca), Some(cb)) = (a.scene(base), b.scene(base), cf_a.scene(base), cf_b.scene(base)) else {
            continue;
        };
        let r = reference(&ot);
        let question = if question_form { format!("Is the {r} large or small ?") } else { format!("What size is the {r} ?") };
        let answer = |s: Size| format!("The {r} is {} .", s.name());
        return Some(Counterfactual { category: "size", question, answers: [answer(ot.size), answer(oo.size)], scenes: [sa, sb], counterfactuals: [ca, cb] });
    }
    None
}

fn position_pair(base: &Scene, rng: &mut WorldRng) -> Option<Counterfactual> {
    let a = Layout::of(base);
    let gap = 0.2 * base.image_size as f64;
    let question_form = rng.coin();
    for (t, o) in object_pairs(a.objects.len(), rng) {
        let (ot, oo) = (a.objects[t], a.objects[o]);
        let apart_x = (ot.cx - oo.cx).abs() >= gap;
        let apart_y = (ot.cy - oo.cy).abs() >= gap;
        let mut axes = [true, false].into_iter().filter(|&h| if h { apart_x } else { apart_y }).collect::<Vec<_>>();
        rng.shuffle(&mut axes);
        for horizontal in axes {
            // The target reflected through the reference along the axis: the same distance on
            // the other side, one object moved.
            let mut b = a.clone();
            if horizontal {
                b.objects[t].cx = 2.0 * oo.cx - ot.cx;
            } else {
                b.objects[t].cy = 2.0 * oo.cy - ot.cy;
            }
            let (Some(sa), Some(sb)) = (a.scene(base), b.scene(base)) else {
                continue;
            };
            let (rt, ro) = (reference(&ot), reference(&oo));
            // "Where is …" names no axis, so it is asked only when the other axis says nothing.
            let other_apart = if horizontal { apart_y } else { apart_x };
            let where_question = format!("Where is the {rt} relative to the {ro} ?");
            let (question, answers) = if horizontal {
                let q = if question_form && !other_apart { where_question } else { format!("Is the {rt} to the left or to the right of the {ro} ?") };
                let words = if ot.cx < oo.cx { ["left", "right"] } else { ["right", "left"] };
                (q, words.map(|w| format!("The {rt} is to the {w} of the {ro} .")))
            } else {
                let q = if question_form && !other_apart { where_question } else { format!("Is the {rt} above or below the {ro} ?") };
                let words = if ot.cy < oo.cy { ["above", "below"] } else { ["below", "above"] };
                (q, words.map(|w| format!("The {rt} is {w} the {ro} .")))
            };
            return Some(Counterfactual { category: "position", question, answers, scenes: [sa.clone(), sb.clone()], counterfactuals: [sb, sa] });
        }
    }
    None
}

fn count_pair(base: &Scene, rng: &mut WorldRng) -> Option<Counterfactual> {
    let a = Layout::of(base);
    let small: Vec<usize> = (0..a.objects.len()).filter(|&i| a.objects[i].size == Size::Small).collect();
    if small.is_empty() {
        return None;
    }
    let removed = *rng.choose(&small);
    let b = a.without(removed);
    let (sa, sb) = (a.scene(base)?, b.scene(base)?);
    let (question, subject, count) = if rng.coin() {
        let q = if rng.coin() { "How many shapes are in the image ?" } else { "How many shapes can you see ?" };
        (q, "shapes", a.objects.len())
    } else {
        ("How many small shapes are there ?", "small shapes", small.len())
    };
    let answer = |k: usize| format!("The number of {subject} is {} .", NUMBERS[k]);
    Some(Counterfactual {
        category: "count",
        question: question.to_string(),
        answers: [answer(count), answer(count - 1)],
        scenes: [sa.clone(), sb.clone()],
        counterfactuals: [sb, sa],
    })
}

impl ShapesWorld {
    /// `n` text preference pairs in mirrored twos (see the module documentation): one visual
    /// fact differs between chosen and rejected, every rejected answer is plausible, and every
    /// text is chosen as often as rejected. Categories as `VQA_CATEGORIES`, about a fifth each.
    /// Rows `2k` and `2k + 1` depend on `k` only.
    /// Needs `max_objects >= 2` (a pair compares two objects or removes one).
    pub fn balanced_preferences(&self, split: Split, n: usize) -> Result<PreferenceDataset> {
        self.counterfactual_rows(split, n, false)
    }

    /// The image-counterfactual form of [`ShapesWorld::balanced_preferences`] (PIVOT's
    /// `image_rejected`): chosen = rejected = the row's true answer, and `image_rejected` is the
    /// row's scene with one object changed (recoloured, reshaped, resized, moved to the other
    /// side, or removed) so that the answer is wrong for it.
    pub fn image_preferences(&self, split: Split, n: usize) -> Result<PreferenceDataset> {
        self.counterfactual_rows(split, n, true)
    }

    fn counterfactual_rows(&self, split: Split, n: usize, image: bool) -> Result<PreferenceDataset> {
        if self.config().max_objects < 2 {
            return Err(PivotError::config(
                "ShapesConfig",
                "max_objects",
                format!("counterfactual pairs compare two objects; this world has at most {}", self.config().max_objects),
            ));
        }
        let pairs = n.div_ceil(2);
        let build = |k: usize| -> Vec<PreferenceSample> {
            let (pair, key) = self.counterfactual(split, k);
            let draw = |scene: &Scene| -> ImageSource {
                let (rgb, _): (RgbImage, _) = render(scene, self.world_seed(), split, key);
                ImageSource::Memory(Arc::new(rgb))
            };
            let images = [draw(&pair.scenes[0]), draw(&pair.scenes[1])];
            (0..2)
                .map(|i| PreferenceSample {
                    image: images[i].clone(),
                    question: pair.question.clone(),
                    chosen: pair.answers[i].clone(),
                    rejected: if image { pair.answers[i].clone() } else { pair.answers[1 - i].clone() },
                    category: pair.category.to_string(),
                    image_rejected: image.then(|| draw(&pair.counterfactuals[i])),
                })
                .collect()
        };
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(pairs.div_ceil(64)).max(1);
        let chunk = pairs.div_ceil(threads);
        let mut samples: Vec<PreferenceSample> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * chunk).min(pairs)..((t + 1) * chunk).min(pairs);
                    let build = &build;
                    scope.spawn(move || range.flat_map(build).collect::<Vec<_>>())
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        samples.truncate(n);
        Ok(PreferenceDataset::new(samples))
    }

    /// The counterfactual of pair `k` and the scene index whose streams drew its base scene.
    /// The category is drawn first, uniformly, and candidate scenes are tried until one allows
    /// it (a position pair needs two objects apart, a size pair room for the swapped sizes), so
    /// the categories stay balanced; only if none of the candidates does, any category goes.
    fn counterfactual(&self, split: Split, k: usize) -> (Counterfactual, u64) {
        let build = |category: usize, base: &Scene, rng: &mut WorldRng| match category {
            0 => colour_pair(base, rng),
            1 => shape_pair(base, rng),
            2 => count_pair(base, rng),
            3 => position_pair(base, rng),
            _ => size_pair(base, rng),
        };
        let category = WorldRng::new(self.world_seed(), split, k as u64, Stream::Pair).below(5);
        let candidates = || (0..CANDIDATES).map(|candidate| k as u64 + ((candidate + 1) << 32));
        for index in candidates() {
            let base = self.scene(split, index as usize);
            if let Some(pair) = build(category, &base, &mut WorldRng::new(self.world_seed(), split, index, Stream::Pair)) {
                return (pair, index);
            }
        }
        for index in candidates() {
            let base = self.scene(split, index as usize);
            let mut rng = WorldRng::new(self.world_seed(), split, index, Stream::Pair);
            for category in 0..5 {
                if let Some(pair) = build(category, &base, &mut rng) {
                    return (pair, index);
                }
            }
        }
        // With max_objects >= 2 (checked by the caller) a scene has one object with probability
        // at most 1/2, and every scene of two objects or more allows a colour pair (a colour swap
        // moves no pixel of any outline): 64 failures in a row have probability 2^-64.
        unreachable!("no counterfactual pair for index {k} of {split} after {CANDIDATES} candidate scenes")
    }
}
