//! Gradient maps on a whole MLLM: PIVOT's map (∂L/∂ projector output) and Grad-CAM on a tower
//! layer, for the SFT loss and the DPO loss of one sample, plus a localisation score over a set of
//! samples with object masks, which turns "DPO localises better than SFT" into a number.
//!
//! The model is never changed: gradients are taken with `Tensor::run_backward` with respect to
//! leaves created here (autograd.grad semantics), so no parameter's `.grad` is touched.
//!
//! ```no_run
//! use pivot::prelude::*;
//! # fn main() -> pivot::Result<()> {
//! let world = ShapesWorld::new(ShapesConfig::default());
//! let mllm = Mllm::tiny(Device::Cpu);
//! let prefs = world.preferences(Split::Val, 8);
//! let sft = GradMap::pivot(&mllm, &prefs[0], Objective::Sft)?;
//! let dpo = GradMap::pivot(&mllm, &prefs[0], Objective::dpo(0.1))?;
//! let set = shapes_localisation_set(&world, Split::Val, 32, MaskTarget::AnswerObjects);
//! let score = localisation_score(&mllm, &set, Objective::dpo(0.1))?;
//! # Ok(()) }
//! ```

use super::gradmap::{GradMapOptions, LocalisationScore, colorize, grad_cam, localisation, overlay, pivot_map};
use crate::data::{PreferenceSample, ShapesWorld, Split, VqaSample};
use crate::error::{PivotError, Result};
use crate::model::{Encoded, Mllm};
use crate::plot::{Figure, Metrics, image_grid};
use crate::probe::preprocess_mask;
use crate::runtime::{MimeBundle, Progress, Rich, check_interrupt};
use crate::train::dpo_loss;
use image::{GrayImage, RgbImage};
use std::fmt;
use tch::Tensor;

/// The training loss whose gradient is mapped.
#[derive(Clone, Copy)]
pub enum Objective<'a> {
    /// Token-mean cross-entropy of the answer (the chosen answer of a preference pair).
    Sft,
    /// Sigmoid DPO on (chosen, rejected). `reference: None` uses the policy itself as the
    /// reference (z = 0), which is the first step of DPO training, where PIVOT takes its maps.
    Dpo { beta: f64, reference: Option<&'a Mllm> },
}

impl<'a> Objective<'a> {
    pub fn dpo(beta: f64) -> Self {
        Objective::Dpo { beta, reference: None }
    }
    pub fn dpo_with_reference(beta: f64, reference: &'a Mllm) -> Self {
        Objective::Dpo { beta, reference: Some(reference) }
    }
    pub fn name(&self) -> String {
        match self {
            Objective::Sft => "SFT".into(),
            Objective::Dpo { beta, .. } => format!("DPO β={beta}"),
        }
    }
}

impl fmt::Debug for Objective<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One image with a question and answer(s): what a gradient map is taken on.
#[derive(Debug, Clone)]
pub struct GradInput {
    pub image: RgbImage,
    pub question: String,
    /// The SFT target, and DPO's chosen answer.
    pub answer: String,
    /// DPO's rejected answer.
    pub rejected: Option<String>,
}

/// Anything a [`GradInput`] can be made from.
pub trait AsGradInput {
    fn grad_input(&self) -> Result<GradInput>;
}

impl AsGradInput for GradInput {
    fn grad_input(&self) -> Result<GradInput> {
        Ok(self.clone())
    }
}

impl AsGradInput for PreferenceSample {
    fn grad_input(&self) -> Result<GradInput> {
        Ok(GradInput {
            image: self.image.load()?,
            question: self.question.clone(),
            answer: self.chosen.clone(),
            rejected: Some(self.rejected.clone()),
        })
    }
}

impl AsGradInput for VqaSample {
    fn grad_input(&self) -> Result<GradInput> {
        Ok(GradInput { image: self.image.load()?, question: self.question.clone(), answer: self.answer.clone(), rejected: None })
    }
}

/// Which copy of the image tokens a DPO map reads. PIVOT encodes the image once per sequence and
/// plots the chosen copy; `Sum` is what a shared encoding (one copy read by both) receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DpoCopy {
    #[default]
    Chosen,
    Rejected,
    Sum,
}

/// Which map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MapMethod {
    /// PIVOT's: per-token norm of ∂L/∂(projector output).
    #[default]
    Pivot,
    /// Grad-CAM on the output of tower hidden state `layer` (negative from the end), target −L.
    GradCam { layer: i64 },
}

/// Gradient-map settings. `GradMap::pivot` / `GradMap::grad_cam` use the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GradMap {
    pub method: MapMethod,
    /// Post-processing of the PIVOT map (norm, border fix, gamma); `size` is overridden by `size`.
    pub options: GradMapOptions,
    /// Output size (H, W); default: the tower's resolution (the image the tower saw).
    pub size: Option<(i64, i64)>,
    pub dpo_copy: DpoCopy,
}

impl Default for GradMap {
    fn default() -> Self {
        GradMap { method: MapMethod::Pivot, options: GradMapOptions::default(), size: None, dpo_copy: DpoCopy::Chosen }
    }
}

/// A gradient map of one sample, with the overlay PIVOT draws.
#[derive(Debug)]
pub struct GradMapResult {
    /// "pivot" or "grad-cam (layer k)".
    pub method: String,
    pub objective: String,
    /// Provenance label of the model.
    pub model: String,
    pub question: String,
    pub answer: String,
    /// The loss the map differentiates.
    pub loss: f64,
    /// [grid, grid] map at token resolution, in [0, 1].
    pub token_map: Tensor,
    /// [H, W] map in [0, 1].
    pub map: Tensor,
    /// The image as the tower saw it (resized).
    pub image: RgbImage,
    /// Jet overlay of `map` on the darkened image.
    pub overlay: RgbImage,
}

impl GradMapResult {
    /// Image | map | overlay.
    pub fn figure(&self) -> Result<Figure> {
        let tiles = vec![
            ("image".to_string(), self.image.clone()),
            ("map".to_string(), colorize(&self.map)),
            ("overlay".to_string(), self.overlay.clone()),
        ];
        image_grid(&format!("{} · {} · {}", self.model, self.method, self.objective), &tiles, 3)
    }

    /// (row, col) of the token-map maximum.
    pub fn peak(&self) -> (i64, i64) {
        let w = self.token_map.size()[1];
        let i = self.token_map.reshape([-1]).argmax(0, false).int64_value(&[]);
        (i / w, i % w)
    }
}

impl fmt::Display for GradMapResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, c) = self.peak();
        write!(
            f,
            "{} map of {} under {} (loss {:.4}): peak at token ({r}, {c}) of a {:?} grid\n  Q: {}\n  A: {}",
            self.method,
            self.model,
            self.objective,
            self.loss,
            self.token_map.size(),
            self.question,
            self.answer
        )
    }
}

impl Rich for GradMapResult {
    fn mime_bundle(&self) -> MimeBundle {
        let b = MimeBundle::text(self.to_string());
        match self.figure() {
            Ok(fig) => b.with_png(&fig.png),
            Err(_) => b,
        }
    }
}

/// Sequences and the loss of `objective` given image tokens: one tensor [1, N, D] read by every
/// sequence, or two (chosen copy, rejected copy) for DPO.
fn objective_loss(mllm: &Mllm, objective: &Objective, input: &GradInput, tokens: &[Tensor]) -> Result<Tensor> {
    match objective {
        Objective::Sft => {
            let seq = mllm.encode_chat(&input.question, Some(&input.answer))?;
            let out = mllm.forward_image_tokens(tokens[0].shallow_clone(), &[seq], &[0])?;
            mllm.answer_loss(&out)
        }
        Objective::Dpo { beta, reference } => {
            let rejected = input.rejected.as_deref().ok_or_else(|| {
                PivotError::invalid("a DPO map needs a rejected answer: pass a PreferenceSample (or a GradInput with `rejected`)")
            })?;
            let seqs = |m: &Mllm| -> Result<Vec<Encoded>> {
                Ok(vec![m.encode_chat(&input.question, Some(&input.answer))?, m.encode_chat(&input.question, Some(rejected))?])
            };
            let (toks, image_of) = if tokens.len() == 2 { (Tensor::cat(tokens, 0), [0, 1]) } else { (tokens[0].shallow_clone(), [0, 0]) };
            let lp = mllm.sequence_logps(&mllm.forward_image_tokens(toks, &seqs(mllm)?, &image_of)?)?;
            let refm = reference.unwrap_or(mllm);
            let rlp = tch::no_grad(|| -> Result<Tensor> {
                let t = refm.encode_images(&refm.preprocess(std::slice::from_ref(&input.image))?)?;
                refm.sequence_logps(&refm.forward_image_tokens(t, &seqs(refm)?, &[0, 0])?)
            })?
            .to_device(lp.device());
            let one = |t: &Tensor, i: i64| t.narrow(0, i, 1);
            Ok(dpo_loss(&one(&lp, 0), &one(&lp, 1), &one(&rlp, 0), &one(&rlp, 1), *beta, 0.0).loss)
        }
    }
}

fn pick(grads: Vec<Tensor>, copy: DpoCopy) -> Tensor {
    match (grads.len(), copy) {
        (1, _) | (_, DpoCopy::Chosen) => grads[0].shallow_clone(),
        (_, DpoCopy::Rejected) => grads[1].shallow_clone(),
        (_, DpoCopy::Sum) => &grads[0] + &grads[1],
    }
}

impl GradMap {
    pub fn new(method: MapMethod) -> Self {
        GradMap { method, ..Default::default() }
    }
    pub fn options(mut self, options: GradMapOptions) -> Self {
        self.options = options;
        self
    }
    pub fn size(mut self, h: i64, w: i64) -> Self {
        self.size = Some((h, w));
        self
    }
    pub fn dpo_copy(mut self, copy: DpoCopy) -> Self {
        self.dpo_copy = copy;
        self
    }

    /// PIVOT's map of `sample` under `objective` (defaults as in `llava/train/hook.py`).
    pub fn pivot(mllm: &Mllm, sample: &dyn AsGradInput, objective: Objective) -> Result<GradMapResult> {
        GradMap::default().compute(mllm, sample, objective)
    }

    /// Grad-CAM on tower hidden state `layer` (CLIP's class token dropped).
    pub fn grad_cam(mllm: &Mllm, sample: &dyn AsGradInput, objective: Objective, layer: i64) -> Result<GradMapResult> {
        GradMap::new(MapMethod::GradCam { layer }).compute(mllm, sample, objective)
    }

    pub fn compute(&self, mllm: &Mllm, sample: &dyn AsGradInput, objective: Objective) -> Result<GradMapResult> {
        let input = sample.grad_input()?;
        let proc = mllm.tower.processor();
        let s = proc.size as i64;
        let size = self.size.unwrap_or((s, s));
        let grid = mllm.tower.config().grid();
        let (gh, gw) = mllm.image_token_grid();
        let pixels = mllm.preprocess(std::slice::from_ref(&input.image))?;
        let dpo = matches!(objective, Objective::Dpo { .. });
        let (loss, token_map, map, method) = match self.method {
            MapMethod::Pivot => {
                // The tower's graph is not needed: the map differentiates w.r.t. the projector output.
                let base = tch::no_grad(|| mllm.encode_images(&pixels))?.detach();
                let leaves: Vec<Tensor> =
                    (0..if dpo { 2 } else { 1 }).map(|_| base.copy().set_requires_grad(true)).collect();
                let loss = objective_loss(mllm, &objective, &input, &leaves)?;
                let g = pick(Tensor::run_backward(&[&loss], &leaves, false, false), self.dpo_copy).get(0);
                // Class (and register) tokens kept: they have no place on the grid.
                let n = g.size()[0];
                let g = g.narrow(0, n - gh * gw, gh * gw);
                let tok = pivot_map(&g, (gh, gw), &GradMapOptions { size: (gh, gw), ..self.options })?;
                let full = pivot_map(&g, (gh, gw), &GradMapOptions { size, ..self.options })?;
                (loss, tok, full, "pivot".to_string())
            }
            MapMethod::GradCam { layer } => {
                let tower = &mllm.tower;
                let idx = tower.resolve_layer(layer)?;
                let sel = tower.resolve_layer(mllm.config.select_layer)?;
                if idx > sel {
                    return Err(PivotError::invalid(format!(
                        "Grad-CAM layer {layer} (hidden state {idx}) lies above the layer the MLLM reads ({sel}): it does not affect the loss"
                    )));
                }
                let prefix = tower.config().num_prefix_tokens();
                let select = mllm.feature_select();
                // Pixels that require grad make autograd record the tower even when it is frozen.
                let run = || -> Result<(Tensor, Tensor)> {
                    let px = pixels.detach().copy().set_requires_grad(true);
                    let states = tower.hidden_states(&px, sel)?;
                    let feats = tower.select_tokens(&states[sel], select, (grid, grid))?;
                    let toks = mllm.projector.forward(&feats.to_kind(mllm.projector.kind())).to_kind(mllm.lm.kind());
                    Ok((states[idx].shallow_clone(), toks))
                };
                let runs: Vec<(Tensor, Tensor)> = (0..if dpo { 2 } else { 1 }).map(|_| run()).collect::<Result<_>>()?;
                let toks: Vec<Tensor> = runs.iter().map(|r| r.1.shallow_clone()).collect();
                let acts: Vec<Tensor> = runs.iter().map(|r| r.0.shallow_clone()).collect();
                let loss = objective_loss(mllm, &objective, &input, &toks)?;
                // Target y = −L: positive evidence is what lowers the loss.
                let g = -pick(Tensor::run_backward(&[&loss], &acts, false, false), self.dpo_copy).get(0);
                let a = acts[0].detach().get(0);
                let tok = grad_cam(&a, &g, prefix, (grid, grid), (grid, grid))?;
                let full = grad_cam(&a, &g, prefix, (grid, grid), size)?;
                (loss, tok, full, format!("grad-cam (layer {idx})"))
            }
        };
        let image = proc.resize(&input.image);
        let overlay = overlay(&image, &map);
        Ok(GradMapResult {
            method,
            objective: objective.name(),
            model: mllm.provenance.label(),
            question: input.question,
            answer: input.answer,
            loss: loss.double_value(&[]),
            token_map: token_map.detach(),
            map: map.detach(),
            image,
            overlay,
        })
    }

    /// Mean localisation of this map over `samples` (map energy inside each sample's mask, and
    /// pointing game); masks go through the tower's resize like the images.
    pub fn localisation(&self, mllm: &Mllm, samples: &[LocalisationSample], objective: Objective) -> Result<LocalisationScore> {
        if samples.is_empty() {
            return Err(PivotError::invalid("localisation: no samples"));
        }
        let proc = mllm.tower.processor();
        let mut progress = Progress::new(format!("localisation · {} · {}", mllm.provenance.label(), objective.name()), samples.len() as u64);
        let (mut maps, mut masks) = (Vec::with_capacity(samples.len()), Vec::with_capacity(samples.len()));
        for (i, s) in samples.iter().enumerate() {
            check_interrupt("localisation score")?;
            let r = self.compute(mllm, &s.input, objective)?;
            let m = preprocess_mask(&s.mask, &proc);
            let (w, h) = m.dimensions();
            masks.push(Tensor::from_slice(m.as_raw()).view([h as i64, w as i64]));
            maps.push(r.map);
            progress.set(i as u64 + 1, "");
        }
        progress.finish();
        localisation(&maps, &masks)
    }
}

/// [`GradMap::localisation`] with PIVOT's map.
pub fn localisation_score(mllm: &Mllm, samples: &[LocalisationSample], objective: Objective) -> Result<LocalisationScore> {
    GradMap::default().localisation(mllm, samples, objective)
}

/// A sample with the mask of what its answer is about (non-zero = target pixels).
#[derive(Debug, Clone)]
pub struct LocalisationSample {
    pub input: GradInput,
    pub mask: GrayImage,
}

/// Which pixels of a ShapesWorld scene count as the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskTarget {
    /// The objects the question names (by shape or colour word); all objects for questions that
    /// name none (counting).
    #[default]
    AnswerObjects,
    /// Every object (the union of object masks).
    AllObjects,
    /// The large object that defines the scene's class.
    MainObject,
}

/// Preference samples `0..n` of `split` with object masks from the world's renderer. Shapes and
/// colours are unique within a scene, so a named shape or colour identifies one object.
pub fn shapes_localisation_set(world: &ShapesWorld, split: Split, n: usize, target: MaskTarget) -> Vec<LocalisationSample> {
    let prefs = world.preferences(split, n);
    prefs
        .samples
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let r = world.render(split, i);
            let words: Vec<String> = p.question.to_lowercase().split(|c: char| !c.is_alphanumeric()).map(str::to_string).collect();
            let named = |o: &crate::data::SceneObject| words.iter().any(|w| w == o.shape.name() || w == o.colour.name());
            let objs = &r.scene.objects;
            let chosen: Vec<u8> = match target {
                MaskTarget::MainObject => vec![objs[0].shape.mask_value()],
                MaskTarget::AllObjects => objs.iter().map(|o| o.shape.mask_value()).collect(),
                MaskTarget::AnswerObjects => {
                    let v: Vec<u8> = objs.iter().filter(|o| named(o)).map(|o| o.shape.mask_value()).collect();
                    if v.is_empty() { objs.iter().map(|o| o.shape.mask_value()).collect() } else { v }
                }
            };
            let mask = GrayImage::from_fn(r.mask.width(), r.mask.height(), |x, y| {
                image::Luma([chosen.contains(&r.mask.get_pixel(x, y).0[0]) as u8])
            });
            let input = GradInput {
                image: r.image.as_ref().clone(),
                question: p.question.clone(),
                answer: p.chosen.clone(),
                rejected: Some(p.rejected.clone()),
            };
            LocalisationSample { input, mask }
        })
        .collect()
}

/// Localisation of several models / objectives side by side, keyed for `Runs`.
#[derive(Debug, Clone)]
pub struct LocalisationRow {
    pub model: String,
    pub objective: String,
    pub score: LocalisationScore,
}

impl Metrics for LocalisationRow {
    fn metrics(&self) -> Vec<(String, f64)> {
        self.score.metrics()
    }
}

impl crate::probe::Keyed for LocalisationRow {
    fn keys(&self) -> Vec<(String, String)> {
        vec![("model".into(), self.model.clone()), ("objective".into(), self.objective.clone())]
    }
    fn seed(&self) -> Option<i64> {
        None
    }
}

/// Scores `mllm` under `objective` and labels the row with the model's provenance.
pub fn localisation_row(map: &GradMap, mllm: &Mllm, samples: &[LocalisationSample], objective: Objective) -> Result<LocalisationRow> {
    Ok(LocalisationRow {
        model: mllm.provenance.label(),
        objective: objective.name(),
        score: map.localisation(mllm, samples, objective)?,
    })
}
