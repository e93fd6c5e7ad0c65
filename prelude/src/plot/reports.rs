//! How probe and analysis results show themselves: text, HTML, plots and `Metrics` rows for `Runs`.

use super::charts::{Series, curves, heatmap};
use super::figure::Figure;
use super::table::Metrics;
use crate::analysis::{AlignmentGrid, LocalisationScore};
use crate::error::Result;
use crate::probe::{DenseSegReport, PatchSegReport, ProbeReport};
use crate::runtime::{MimeBundle, Rich, html_escape};
use std::fmt;

fn html_kv(title: &str, rows: &[(String, String)]) -> String {
    let mut s = format!("<table class=\"pivot-report\"><caption style=\"text-align:left\"><b>{}</b></caption>", html_escape(title));
    for (k, v) in rows {
        s += &format!("<tr><th style=\"text-align:left\">{}</th><td>{}</td></tr>", html_escape(k), html_escape(v));
    }
    s + "</table>"
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

impl ProbeReport {
    fn rows(&self) -> Vec<(String, String)> {
        let mut r = vec![
            ("method".into(), self.method.clone()),
            ("top-1".into(), pct(self.top1)),
            ("top-5".into(), pct(self.top5)),
        ];
        if let Some(c) = self.c {
            r.push(("C".into(), format!("{c:.4e}")));
        }
        if let Some(lr) = self.lr {
            r.push(("lr".into(), format!("{lr:.1e}")));
        }
        r.push(("train / val".into(), format!("{} / {}", self.n_train, self.n_val)));
        r.push(("features".into(), format!("{} (standardised: {})", self.num_features, self.standardized)));
        r.push(("sweep points".into(), self.sweep.len().to_string()));
        r.push(("fit time".into(), format!("{:.2} s", self.fit_seconds)));
        let worst = self
            .per_class_accuracy
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_finite())
            .min_by(|a, b| a.1.total_cmp(b.1));
        if let Some((i, a)) = worst {
            let name = self.class_names.get(i).cloned().unwrap_or_else(|| format!("class {i}"));
            r.push(("worst class".into(), format!("{name}: {}", pct(*a))));
        }
        r
    }

    pub fn to_html(&self) -> String {
        html_kv("Linear probe", &self.rows())
    }

    /// Held-out top-1 against the swept hyper-parameter (log x axis as log10).
    pub fn plot_sweep(&self) -> Result<Figure> {
        let pts = self.sweep.iter().map(|p| (p.param.log10(), p.top1)).collect();
        let x = if self.c.is_some() { "log10 C" } else { "log10 lr" };
        curves("probe sweep", x, "held-out top-1", &[Series::new(self.method.clone(), pts)])
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in self.rows() {
            writeln!(f, "{k:>14}: {v}")?;
        }
        Ok(())
    }
}

impl Rich for ProbeReport {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string()).with_html(self.to_html())
    }
}

impl Metrics for ProbeReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        let mut m = vec![("top1".to_string(), self.top1), ("top5".to_string(), self.top5)];
        if let Some(c) = self.c {
            m.push(("C".into(), c));
        }
        if let Some(lr) = self.lr {
            m.push(("lr".into(), lr));
        }
        m
    }
}

impl PatchSegReport {
    fn rows(&self) -> Vec<(String, String)> {
        let b = &self.best;
        vec![
            ("labels / head".into(), format!("{:?} / {:?}", self.labels, self.head)),
            ("macro recall".into(), pct(b.macro_recall)),
            ("macro precision".into(), pct(b.macro_precision)),
            ("macro F1".into(), pct(b.macro_f1)),
            ("micro accuracy".into(), pct(b.micro_accuracy)),
            ("best epoch".into(), format!("{} of {}", self.best_epoch + 1, self.epochs.len())),
            ("classes present".into(), format!("{} of {}", b.classes_present, self.num_classes)),
            ("train / val".into(), format!("{} / {}", self.n_train, self.n_val)),
            ("fit time".into(), format!("{:.2} s", self.fit_seconds)),
        ]
    }
    pub fn to_html(&self) -> String {
        html_kv("Patch segmentation probe", &self.rows())
    }
}

impl fmt::Display for PatchSegReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in self.rows() {
            writeln!(f, "{k:>16}: {v}")?;
        }
        Ok(())
    }
}

impl Rich for PatchSegReport {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string()).with_html(self.to_html())
    }
}

impl Metrics for PatchSegReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        let b = &self.best;
        vec![
            ("macro_recall".into(), b.macro_recall),
            ("macro_precision".into(), b.macro_precision),
            ("macro_f1".into(), b.macro_f1),
            ("micro_accuracy".into(), b.micro_accuracy),
        ]
    }
}

impl DenseSegReport {
    fn rows(&self) -> Vec<(String, String)> {
        vec![
            ("mIoU".into(), pct(self.miou)),
            ("pixel accuracy".into(), pct(self.pixel_accuracy)),
            ("classes scored".into(), format!("{} of {}", self.iou_per_class.iter().filter(|v| !v.is_nan()).count(), self.iou_per_class.len())),
            ("train / val".into(), format!("{} / {}", self.n_train, self.n_val)),
            ("fit time".into(), format!("{:.2} s", self.fit_seconds)),
        ]
    }
    pub fn to_html(&self) -> String {
        html_kv("Dense linear segmentation probe", &self.rows())
    }
}

impl fmt::Display for DenseSegReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in self.rows() {
            writeln!(f, "{k:>16}: {v}")?;
        }
        Ok(())
    }
}

impl Rich for DenseSegReport {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string()).with_html(self.to_html())
    }
}

impl Metrics for DenseSegReport {
    fn metrics(&self) -> Vec<(String, f64)> {
        vec![("miou".into(), self.miou), ("pixel_accuracy".into(), self.pixel_accuracy)]
    }
}

impl AlignmentGrid {
    /// The full layer × layer grid with the argmax outlined.
    pub fn heatmap(&self) -> Result<Figure> {
        let title = format!("{}: max {:.4} at ({}, {})", self.metric.name(), self.best, self.argmax.0, self.argmax.1);
        heatmap(&title, &self.labels_b, &self.labels_a, &self.scores, Some(self.argmax))
    }
}

impl fmt::Display for AlignmentGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: max {:.4} at ({} {}, {} {}) over a {}×{} grid",
            self.metric.name(),
            self.best,
            self.labels_a,
            self.argmax.0,
            self.labels_b,
            self.argmax.1,
            self.scores.len(),
            self.scores.first().map_or(0, |r| r.len())
        )
    }
}

impl Rich for AlignmentGrid {
    fn mime_bundle(&self) -> MimeBundle {
        let b = MimeBundle::text(self.to_string());
        match self.heatmap() {
            Ok(fig) => b.with_png(&fig.png),
            Err(_) => b,
        }
    }
}

impl Metrics for AlignmentGrid {
    fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            (self.metric.name(), self.best),
            ("argmax_a".into(), self.argmax.0 as f64),
            ("argmax_b".into(), self.argmax.1 as f64),
        ]
    }
}

impl Metrics for LocalisationScore {
    fn metrics(&self) -> Vec<(String, f64)> {
        vec![
            ("energy_in_mask".into(), self.energy),
            ("pointing_game".into(), self.pointing),
            ("chance".into(), self.chance),
        ]
    }
}

impl fmt::Display for LocalisationScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "localisation over {} maps: energy in mask {:.3} (chance {:.3}), pointing game {:.3}",
            self.n, self.energy, self.chance, self.pointing
        )
    }
}

impl Rich for LocalisationScore {
    fn mime_bundle(&self) -> MimeBundle {
        MimeBundle::text(self.to_string())
    }
}
