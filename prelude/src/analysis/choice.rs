//! Two-way multiple-choice VQA on preference pairs: is the correct answer more likely than the
//! answer that hallucinates one visual fact? The multiple-choice benchmarks of the paper's
//! "vision-centric" group (MMVP, CV-Bench) score a model the same way: it picks between given
//! answers instead of generating one, so the score says whether the model *sees* the fact even
//! when it is too small to produce the exact reference sentence.
//!
//! ```no_run
//! use pivot::prelude::*;
//! # fn main() -> pivot::Result<()> {
//! let world = ShapesWorld::new(ShapesConfig::default());
//! let report = ChoiceEval::default().run(&Mllm::tiny(Device::Cpu), &world.preferences(Split::Val, 64))?;
//! println!("{:.3}", report.accuracy());
//! # Ok(()) }
//! ```

use crate::data::PreferenceDataset;
use crate::error::{PivotError, Result};
use crate::model::Mllm;
use crate::plot::Metrics;
use crate::runtime::{MimeBundle, Progress, Rich, check_interrupt, html_escape};
use std::collections::BTreeMap;
use std::fmt;
use tch::Device;

/// Scores `log p(chosen) > log p(rejected)` (summed answer log-probabilities, as DPO's) on
/// held-out preference pairs; a tie counts as wrong. An image-counterfactual pair (with
/// `image_rejected`) scores its rejected answer with that image, as DPO does.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceEval {
    /// Pairs per forward pass (each pair is two sequences sharing one image encoding).
    pub batch_size: usize,
    /// Evaluate at most this many pairs (the first ones).
    pub limit: Option<usize>,
    pub live: bool,
    /// Replace every image by a uniform grey one of the same size: the score of the model's
    /// text prior alone (see [`ChoiceEval::image_use`]).
    pub blank: bool,
}

impl Default for ChoiceEval {
    fn default() -> Self {
        ChoiceEval { batch_size: 16, limit: None, live: true, blank: false }
    }
}

/// A uniform mid-grey image of `image`'s size: no object, no texture, no colour.
fn blank_like(image: &image::RgbImage) -> image::RgbImage {
    image::RgbImage::from_pixel(image.width(), image.height(), image::Rgb([128, 128, 128]))
}

/// Choice accuracy with the real images and with blank ones: how much of the score comes from
/// the pixels ("VQA minus blank").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageUse {
    pub with_image: ChoiceReport,
    pub blank: ChoiceReport,
}

impl ImageUse {
    /// Accuracy with the images minus accuracy with blank images.
    pub fn gain(&self) -> f64 {
        self.with_image.accuracy() - self.blank.accuracy()
    }
}

impl fmt::Display for ImageUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "two-way choice [{}]: {:.3} with the images, {:.3} with blank images, gain {:+.3} ({} pairs)",
            self.with_image.label,
            self.with_image.accuracy(),
            self.blank.accuracy(),
            self.gain(),
            self.with_image.total
        )
    }
}

impl Metrics for ImageUse {
    fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            ("choice_accuracy".into(), self.with_image.accuracy()),
            ("choice_accuracy_blank".into(), self.blank.accuracy()),
            ("choice_image_gain".into(), self.gain()),
        ]
    }
}

impl Rich for ImageUse {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string())
    }
}

/// Two-way choice accuracy overall and per question category.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChoiceReport {
    /// Provenance label of the model.
    pub label: String,
    pub correct: usize,
    pub total: usize,
    /// category → (correct, total)
    pub by_category: BTreeMap<String, (usize, usize)>,
    /// Mean of log p(chosen) − log p(rejected) over the pairs.
    pub mean_margin: f64,
}

impl ChoiceReport {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 { f64::NAN } else { self.correct as f64 / self.total as f64 }
    }
    pub fn category_accuracy(&self, category: &str) -> Option<f64> {
        self.by_category.get(category).map(|&(c, t)| c as f64 / t.max(1) as f64)
    }
}

impl ChoiceEval {
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }
    pub fn quiet(mut self) -> Self {
        self.live = false;
        self
    }

    /// Accuracy with the real images and with blank images, on the same pairs: one call for
    /// "VQA minus blank".
    pub fn image_use(&self, mllm: &Mllm, data: &PreferenceDataset) -> Result<ImageUse> {
        let with_image = ChoiceEval { blank: false, ..self.clone() }.run(mllm, data)?;
        let blank = ChoiceEval { blank: true, ..self.clone() }.run(mllm, data)?;
        Ok(ImageUse { with_image, blank })
    }

    pub fn run(&self, mllm: &Mllm, data: &PreferenceDataset) -> Result<ChoiceReport> {
        let n = self.limit.unwrap_or(usize::MAX).min(data.len());
        if n == 0 {
            return Err(PivotError::invalid("ChoiceEval: the data set is empty"));
        }
        let mut report = ChoiceReport { label: mllm.provenance.label(), ..Default::default() };
        let mut margin_sum = 0.0;
        let mut progress = self.live.then(|| Progress::new(format!("choice eval · {}", report.label), n as u64));
        for (k, chunk) in data.samples[..n].chunks(self.batch_size.max(1)).enumerate() {
            check_interrupt(&format!("choice eval batch {k}"))?;
            // The pairs' images, then the rejected images of image-counterfactual pairs.
            let mut images = chunk.iter().map(|s| s.image.load()).collect::<Result<Vec<_>>>()?;
            let mut image_of: Vec<usize> = (0..chunk.len()).collect();
            for (i, s) in chunk.iter().enumerate() {
                match &s.image_rejected {
                    Some(own) => {
                        image_of.push(images.len());
                        images.push(own.load()?);
                    }
                    None => image_of.push(i),
                }
            }
            if self.blank {
                images = images.iter().map(blank_like).collect();
            }
            let mut seqs = Vec::with_capacity(2 * chunk.len());
            for s in chunk {
                seqs.push(mllm.encode_chat(&s.question, Some(&s.chosen))?);
            }
            for s in chunk {
                seqs.push(mllm.encode_chat(&s.question, Some(&s.rejected))?);
            }
            let logps = tch::no_grad(|| -> Result<Vec<f64>> {
                let px = mllm.preprocess(&images)?;
                let lp = mllm.sequence_logps(&mllm.forward(&px, &seqs, &image_of)?)?;
                Ok(Vec::<f64>::try_from(lp.to_device(Device::Cpu).to_kind(tch::Kind::Double))?)
            })?;
            let b = chunk.len();
            for (i, s) in chunk.iter().enumerate() {
                let margin = logps[i] - logps[b + i];
                let ok = margin > 0.0;
                margin_sum += margin;
                report.correct += ok as usize;
                report.total += 1;
                let cat = if s.category.is_empty() { "all".to_string() } else { s.category.clone() };
                let e = report.by_category.entry(cat).or_default();
                e.0 += ok as usize;
                e.1 += 1;
            }
            if let Some(p) = &mut progress {
                p.set(report.total as u64, format!("accuracy {:.3}", report.accuracy()));
            }
        }
        if let Some(p) = &mut progress {
            p.finish();
        }
        report.mean_margin = margin_sum / report.total.max(1) as f64;
        Ok(report)
    }
}

impl Metrics for ChoiceReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![("choice_accuracy".to_string(), self.accuracy()), ("choice_margin".to_string(), self.mean_margin)];
        for (c, &(k, t)) in &self.by_category {
            m.push((format!("choice_accuracy/{c}"), k as f64 / t.max(1) as f64));
        }
        m
    }
}

impl fmt::Display for ChoiceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "two-way choice accuracy [{}]: {:.3} ({}/{}), mean log-prob margin {:+.3}",
            self.label,
            self.accuracy(),
            self.correct,
            self.total,
            self.mean_margin
        )?;
        for (c, &(k, t)) in &self.by_category {
            writeln!(f, "  {c:<10} {:.3} ({k}/{t})", k as f64 / t.max(1) as f64)?;
        }
        Ok(())
    }
}

impl Rich for ChoiceReport {
    fn mime_bundle(&self) -> MimeBundle {
        let mut html = format!(
            "<b>two-way choice accuracy</b> [{}]: {:.3} ({}/{}), mean margin {:+.3}<table><tr><th>category</th><th>accuracy</th><th>n</th></tr>",
            html_escape(&self.label),
            self.accuracy(),
            self.correct,
            self.total,
            self.mean_margin
        );
        for (c, &(k, t)) in &self.by_category {
            html.push_str(&format!("<tr><td>{}</td><td>{:.3}</td><td>{t}</td></tr>", html_escape(c), k as f64 / t.max(1) as f64));
        }
        html.push_str("</table>");
        MimeBundle::text(self.to_string()).with_html(html)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ShapesConfig, ShapesWorld, Split};

    #[test]
    fn choice_eval_counts_pairs_by_category_and_agrees_with_logps() {
        tch::manual_seed(0);
        let world = ShapesWorld::new(ShapesConfig::default());
        let prefs = world.preferences(Split::Val, 5);
        let m = Mllm::tiny(Device::Cpu);
        let r = ChoiceEval { batch_size: 2, live: false, ..Default::default() }.run(&m, &prefs).unwrap();
        assert_eq!(r.total, 5);
        assert_eq!(r.by_category.values().map(|v| v.1).sum::<usize>(), 5);
        assert!((0.0..=1.0).contains(&r.accuracy()));
        // The same decision, one pair at a time.
        let mut correct = 0;
        for s in &prefs.samples {
            let px = m.preprocess(&[s.image.load().unwrap()]).unwrap();
            let seqs = [m.encode_chat(&s.question, Some(&s.chosen)).unwrap(), m.encode_chat(&s.question, Some(&s.rejected)).unwrap()];
            let lp = tch::no_grad(|| m.sequence_logps(&m.forward(&px, &seqs, &[0, 0]).unwrap()).unwrap());
            correct += (lp.double_value(&[0]) > lp.double_value(&[1])) as usize;
        }
        assert_eq!(r.correct, correct);
        let limited = ChoiceEval::default().quiet().limit(3).run(&m, &prefs).unwrap();
        assert_eq!(limited.total, 3);
        assert!(r.metrics().iter().any(|(k, _)| k == "choice_accuracy"));
        assert!(ChoiceEval::default().quiet().run(&m, &prefs.take(0)).is_err());
    }
}
