//! VQA evaluation: greedy answers, exact match after normalisation, per question category.

use crate::data::VqaDataset;
use crate::error::{PivotError, Result};
use crate::model::Mllm;
use crate::plot::Metrics;
use crate::runtime::{MimeBundle, Progress, Rich, check_interrupt, html_escape};
use std::collections::BTreeMap;

/// Greedy decoding on held-out VQA.
#[derive(Clone, Debug, PartialEq)]
pub struct VqaEval {
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Evaluate at most this many samples (the first ones).
    pub limit: Option<usize>,
    /// How many (question, prediction, answer) examples the report keeps.
    pub keep_examples: usize,
    pub live: bool,
}

impl Default for VqaEval {
    fn default() -> Self {
        VqaEval { batch_size: 16, max_new_tokens: 24, limit: None, keep_examples: 8, live: true }
    }
}

/// Lowercase, punctuation dropped, whitespace collapsed: "The circle is RED." → "the circle is red".
pub fn normalize_answer(s: &str) -> String {
    let kept: String = s.chars().map(|c| if c.is_alphanumeric() { c.to_lowercase().next().unwrap_or(c) } else if c.is_whitespace() { ' ' } else { ' ' }).collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact-match accuracy overall and per category.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VqaReport {
    pub label: String,
    pub correct: usize,
    pub total: usize,
    /// category → (correct, total)
    pub by_category: BTreeMap<String, (usize, usize)>,
    /// (category, question, prediction, reference)
    pub examples: Vec<(String, String, String, String)>,
}

impl VqaReport {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 { f64::NAN } else { self.correct as f64 / self.total as f64 }
    }
    pub fn category_accuracy(&self, category: &str) -> Option<f64> {
        self.by_category.get(category).map(|&(c, t)| c as f64 / t.max(1) as f64)
    }
}

impl VqaEval {
    pub fn run(&self, mllm: &Mllm, data: &VqaDataset) -> Result<VqaReport> {
        let n = self.limit.unwrap_or(usize::MAX).min(data.len());
        if n == 0 {
            return Err(PivotError::invalid("VqaEval: the data set is empty"));
        }
        let mut report = VqaReport { label: mllm.provenance.label(), ..Default::default() };
        let mut progress = self.live.then(|| Progress::new("VQA eval", n as u64));
        for (k, chunk) in data.samples[..n].chunks(self.batch_size.max(1)).enumerate() {
            check_interrupt(&format!("VQA eval batch {k}"))?;
            let images = chunk.iter().map(|s| s.image.load()).collect::<Result<Vec<_>>>()?;
            let questions: Vec<&str> = chunk.iter().map(|s| s.question.as_str()).collect();
            let preds = mllm.answer_batch(&images, &questions, self.max_new_tokens)?;
            for (s, p) in chunk.iter().zip(preds) {
                let ok = normalize_answer(&p) == normalize_answer(&s.answer);
                report.correct += ok as usize;
                report.total += 1;
                let cat = if s.category.is_empty() { "all".to_string() } else { s.category.clone() };
                let e = report.by_category.entry(cat.clone()).or_default();
                e.0 += ok as usize;
                e.1 += 1;
                if report.examples.len() < self.keep_examples {
                    report.examples.push((cat, s.question.clone(), p, s.answer.clone()));
                }
            }
            if let Some(p) = &mut progress {
                p.set(report.total as u64, format!("accuracy {:.3}", report.accuracy()));
            }
        }
        if let Some(p) = &mut progress {
            p.finish();
        }
        Ok(report)
    }
}

impl Metrics for VqaReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![("vqa_accuracy".to_string(), self.accuracy())];
        for (c, &(k, t)) in &self.by_category {
            m.push((format!("vqa_accuracy/{c}"), k as f64 / t.max(1) as f64));
        }
        m
    }
}

impl Rich for VqaReport {
    fn mime_bundle(&self) -> MimeBundle {
        let mut text = format!("VQA exact match [{}]: {:.3} ({}/{})\n", self.label, self.accuracy(), self.correct, self.total);
        let mut html = format!(
            "<b>VQA exact match</b> [{}]: {:.3} ({}/{})<table><tr><th>category</th><th>accuracy</th><th>n</th></tr>",
            html_escape(&self.label),
            self.accuracy(),
            self.correct,
            self.total
        );
        for (c, &(k, t)) in &self.by_category {
            let a = k as f64 / t.max(1) as f64;
            text.push_str(&format!("  {c:<10} {a:.3} ({k}/{t})\n"));
            html.push_str(&format!("<tr><td>{}</td><td>{a:.3}</td><td>{t}</td></tr>", html_escape(c)));
        }
        html.push_str("</table><table><tr><th>category</th><th>question</th><th>prediction</th><th>reference</th></tr>");
        for (c, q, p, a) in &self.examples {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(c),
                html_escape(q),
                html_escape(p),
                html_escape(a)
            ));
        }
        html.push_str("</table>");
        MimeBundle::text(text).with_html(html)
    }
}
