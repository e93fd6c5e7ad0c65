//! Per-step metrics (TRL's names), the `TrainLog` that collects them, and the live view.

use crate::data::SkipReport;
use crate::error::{PivotError, Result};
use crate::plot::{Figure, Metrics, Series, curves};
use crate::runtime::{DisplayHandle, Frontend, MimeBundle, Progress, Rich, display, frontend, html_escape};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// The metrics of one optimizer step: `step` (1-based), `epoch` (fractional) and named values
/// such as `loss`, `learning_rate`, `grad_norm`, `rewards/margins`, in insertion order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub values: Vec<(String, f64)>,
}

impl StepMetrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "step" => Some(self.step as f64),
            "epoch" => Some(self.epoch),
            _ => self.values.iter().find(|(n, _)| n == name).map(|(_, v)| *v),
        }
    }
    pub(crate) fn set(&mut self, name: &str, value: f64) {
        match self.values.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.values.push((name.to_string(), value)),
        }
    }
    /// "step 12 · loss 0.6931 · lr 1.0e-5" for progress bars.
    pub fn short(&self) -> String {
        let mut s = format!("step {}", self.step);
        for key in ["loss", "rewards/accuracies", "rewards/margins", "grad_norm"] {
            if let Some(v) = self.get(key) {
                s.push_str(&format!(" · {} {v:.4}", key.trim_start_matches("rewards/")));
            }
        }
        if let Some(lr) = self.get("learning_rate") {
            s.push_str(&format!(" · lr {lr:.1e}"));
        }
        s
    }
}

/// Every step of one training run. Displays as a table of the last rows and a loss curve.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// Run name shown in legends ("SFT", "DPO", "stage1 projector", ...).
    pub name: String,
    pub rows: Vec<StepMetrics>,
    /// Samples left out because their image failed to decode (`TrainConfig::bad_images = Skip`).
    #[serde(default)]
    pub skipped: SkipReport,
}

impl TrainLog {
    pub fn new(name: impl Into<String>) -> Self {
        TrainLog { name: name.into(), rows: Vec::new(), skipped: SkipReport::default() }
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn last(&self) -> Option<&StepMetrics> {
        self.rows.last()
    }
    /// One metric over the run (rows that lack it are skipped).
    pub fn get(&self, name: &str) -> Vec<f64> {
        self.rows.iter().filter_map(|r| r.get(name)).collect()
    }
    /// (step, value) pairs of one metric.
    pub fn series(&self, name: &str) -> Series {
        Series::new(
            format!("{} {name}", self.name).trim().to_string(),
            self.rows.iter().filter_map(|r| r.get(name).map(|v| (r.step as f64, v))).collect(),
        )
    }
    /// Mean of a metric over the first / last `n` steps (handy for "did the loss go down").
    pub fn mean_first(&self, name: &str, n: usize) -> f64 {
        mean(&self.get(name).into_iter().take(n).collect::<Vec<_>>())
    }
    pub fn mean_last(&self, name: &str, n: usize) -> f64 {
        let v = self.get(name);
        mean(&v[v.len().saturating_sub(n)..])
    }
    /// Column names in first-seen order: step, epoch, then the metrics.
    pub fn columns(&self) -> Vec<String> {
        let mut cols = vec!["step".to_string(), "epoch".to_string()];
        for r in &self.rows {
            for (n, _) in &r.values {
                if !cols.contains(n) {
                    cols.push(n.clone());
                }
            }
        }
        cols
    }
    pub fn to_csv(&self) -> String {
        let cols = self.columns();
        let mut s = cols.join(",");
        s.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = cols.iter().map(|c| r.get(c).map(|v| format!("{v}")).unwrap_or_default()).collect();
            s.push_str(&cells.join(","));
            s.push('\n');
        }
        s
    }
    pub fn save_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_csv()).map_err(|e| PivotError::file(path, e))
    }
    /// Loss (or any metric) against step.
    pub fn plot(&self, metric: &str) -> Result<Figure> {
        curves(&format!("{} {metric}", self.name).trim().to_string(), "step", metric, &[self.series(metric)])
    }
    /// The last `last_rows` steps as a table, without the loss curve. End a training cell with it:
    /// the cell's live view already shows the curve, and the log itself would show it again.
    pub fn table(&self, last_rows: usize) -> MimeBundle {
        MimeBundle::text(self.to_text(last_rows)).with_html(self.to_html(last_rows))
    }
    pub fn to_html(&self, last_rows: usize) -> String {
        let cols = self.columns();
        let mut h = format!("<b>{}</b> — {} steps<table><tr>", html_escape(&self.name), self.rows.len());
        for c in &cols {
            h.push_str(&format!("<th>{}</th>", html_escape(c)));
        }
        h.push_str("</tr>");
        for r in &self.rows[self.rows.len().saturating_sub(last_rows)..] {
            h.push_str("<tr>");
            for c in &cols {
                h.push_str(&format!("<td>{}</td>", r.get(c).map(fmt_value).unwrap_or_default()));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
        if !self.skipped.is_empty() {
            h.push_str(&format!("<pre>{}</pre>", html_escape(&self.skipped.to_string())));
        }
        h
    }
    pub fn to_text(&self, last_rows: usize) -> String {
        let cols = self.columns();
        let mut s = format!("{} — {} steps\n{}\n", self.name, self.rows.len(), cols.join("\t"));
        for r in &self.rows[self.rows.len().saturating_sub(last_rows)..] {
            let cells: Vec<String> = cols.iter().map(|c| r.get(c).map(fmt_value).unwrap_or_default()).collect();
            s.push_str(&cells.join("\t"));
            s.push('\n');
        }
        if !self.skipped.is_empty() {
            s.push_str(&self.skipped.to_string());
        }
        s
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn fmt_value(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{v}")
    } else if v.abs() >= 1e-3 && v.abs() < 1e4 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

impl Rich for TrainLog {
    fn mime_bundle(&self) -> MimeBundle {
        let mut b = MimeBundle::text(self.to_text(10));
        let mut html = self.to_html(10);
        if let Ok(fig) = self.plot("loss") {
            html.push_str(&fig.to_html());
            b = b.with_png(&fig.png);
        }
        b.with_html(html)
    }
}

/// The last step's metrics, so that training runs can go into a `Runs` table.
impl Metrics for TrainLog {
    fn metrics(&self) -> Vec<(String, f64)> {
        self.last().map(|r| r.values.clone()).unwrap_or_default()
    }
}

/// Live progress while training: in Jupyter a display updated in place with the loss curve
/// (throttled, since rendering a PNG costs milliseconds), elsewhere the runtime's progress bar.
pub(crate) struct LiveView {
    progress: Option<Progress>,
    handle: Option<DisplayHandle>,
    last_plot: Option<Instant>,
    every: Duration,
}

impl LiveView {
    pub fn new(label: &str, total: usize, enabled: bool) -> Self {
        if !enabled {
            return LiveView { progress: None, handle: None, last_plot: None, every: Duration::MAX };
        }
        let progress = Some(Progress::new(label, total as u64));
        LiveView { progress, handle: None, last_plot: None, every: Duration::from_millis(1500) }
    }

    pub fn update(&mut self, log: &TrainLog, row: &StepMetrics, force: bool) {
        if let Some(p) = &mut self.progress {
            p.set(row.step as u64, row.short());
        }
        if self.progress.is_none() || frontend() != Frontend::Jupyter || log.len() < 2 {
            return;
        }
        let due = self.last_plot.is_none_or(|t| t.elapsed() >= self.every);
        if !(due || force) {
            return;
        }
        self.last_plot = Some(Instant::now());
        if let Ok(fig) = log.plot("loss") {
            let b = MimeBundle::text(row.short()).with_png(&fig.png);
            match &self.handle {
                Some(h) => h.update(&b),
                None => self.handle = Some(display(&b)),
            }
        }
    }

    pub fn finish(&mut self, log: &TrainLog) {
        if let Some(row) = log.last() {
            self.update(log, &row.clone(), true);
        }
        if let Some(p) = &mut self.progress {
            p.finish();
        }
    }
}
