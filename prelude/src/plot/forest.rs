//! Forest plot: several effects side by side, one row each, with a point estimate, an interval as
//! a bar, optionally a second interval as a thin capped line, a vertical reference line (no
//! effect) and an optional mark per row (e.g. the smallest effect of interest). It takes plain
//! rows, so any layer can draw one; the study's statistics (analysis/stats.rs) fill them.

use super::charts::{Chart, DrawResult, FONT, e, finite_range, render, series_color};
use super::figure::Figure;
use crate::error::{PivotError, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Colour of the per-row marks: apart from the usual verdict colours (green, red, grey).
const MARK_COLOR: RGBColor = RGBColor(118, 42, 131);

/// One row of a forest plot.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestRow {
    pub label: String,
    pub estimate: f64,
    /// Drawn as a bar (e.g. a multiplicity-adjusted interval).
    pub bar: (f64, f64),
    /// Drawn as a thin line with end caps over the bar (e.g. the unadjusted interval).
    pub line: Option<(f64, f64)>,
    /// Drawn as a short vertical stroke on the row (e.g. the smallest effect of interest).
    pub mark: Option<f64>,
    /// Printed at the right edge (e.g. a verdict).
    pub note: String,
    /// RGB of the bar, line and note; `None` takes the first series colour.
    pub color: Option<[u8; 3]>,
}

impl ForestRow {
    pub fn new(label: impl Into<String>, estimate: f64, bar: (f64, f64)) -> Self {
        ForestRow { label: label.into(), estimate, bar, line: None, mark: None, note: String::new(), color: None }
    }
    pub fn line(mut self, lower: f64, upper: f64) -> Self {
        self.line = Some((lower, upper));
        self
    }
    pub fn mark(mut self, x: f64) -> Self {
        self.mark = Some(x);
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
    pub fn color(mut self, rgb: [u8; 3]) -> Self {
        self.color = Some(rgb);
        self
    }

    fn rgb(&self) -> RGBColor {
        self.color.map_or_else(|| series_color(0), |[r, g, b]| RGBColor(r, g, b))
    }

    fn check(&self, i: usize) -> Result<()> {
        let bad = |what: &str, detail: String| {
            Err(PivotError::invalid(format!("forest plot row {i} (`{}`): {what} {detail}", self.label)))
        };
        let interval_ok = |(lo, hi): (f64, f64)| lo.is_finite() && hi.is_finite() && lo <= hi;
        if !self.estimate.is_finite() {
            return bad("estimate is not finite:", self.estimate.to_string());
        }
        if !interval_ok(self.bar) {
            return bad("bar interval must be finite with lower ≤ upper, got", format!("{:?}", self.bar));
        }
        if let Some(line) = self.line.filter(|&l| !interval_ok(l)) {
            return bad("line interval must be finite with lower ≤ upper, got", format!("{line:?}"));
        }
        if let Some(mark) = self.mark.filter(|m| !m.is_finite()) {
            return bad("mark is not finite:", mark.to_string());
        }
        Ok(())
    }
}

/// A forest plot: its rows (drawn top to bottom in order) and the legend's names for each element.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestPlot {
    pub title: String,
    pub x_label: String,
    /// Where the vertical reference line goes: no effect (0 for differences, 1 for ratios).
    pub reference: f64,
    pub estimate_name: String,
    pub bar_name: String,
    pub line_name: String,
    pub mark_name: String,
    pub rows: Vec<ForestRow>,
}

impl ForestPlot {
    pub fn new(title: impl Into<String>, x_label: impl Into<String>) -> Self {
        ForestPlot {
            title: title.into(),
            x_label: x_label.into(),
            reference: 0.0,
            estimate_name: "estimate".into(),
            bar_name: "interval".into(),
            line_name: "inner interval".into(),
            mark_name: "mark".into(),
            rows: Vec::new(),
        }
    }
    pub fn reference(mut self, x: f64) -> Self {
        self.reference = x;
        self
    }
    /// Legend names of the point, the bar, the line and the mark.
    pub fn legend(mut self, estimate: impl Into<String>, bar: impl Into<String>, line: impl Into<String>, mark: impl Into<String>) -> Self {
        (self.estimate_name, self.bar_name, self.line_name, self.mark_name) = (estimate.into(), bar.into(), line.into(), mark.into());
        self
    }
    pub fn row(mut self, row: ForestRow) -> Self {
        self.rows.push(row);
        self
    }

    /// PNG + SVG, 900 px wide and 44 px per row.
    pub fn render(&self) -> Result<Figure> {
        if self.rows.is_empty() {
            return Err(PivotError::invalid(format!("forest plot \"{}\": no rows", self.title)));
        }
        if !self.reference.is_finite() {
            return Err(PivotError::invalid(format!("forest plot \"{}\": reference {} is not finite", self.title, self.reference)));
        }
        for (i, row) in self.rows.iter().enumerate() {
            row.check(i)?;
        }
        render(self, (900, 170 + 44 * self.rows.len() as u32))
    }
}

/// Pixel width of `text` in `FONT` at `size` (approximate for the layout of margins only).
fn text_width(text: &str, size: u32) -> u32 {
    (text.chars().count() as u32 * size * 6).div_ceil(10)
}

impl Chart for ForestPlot {
    fn title(&self) -> &str {
        &self.title
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let n = self.rows.len();
        let (_, h) = root.dim_in_pixel();
        let values = self.rows.iter().flat_map(|r| {
            let line = r.line.into_iter().flat_map(|(a, b)| [a, b]);
            [r.estimate, r.bar.0, r.bar.1].into_iter().chain(line).chain(r.mark)
        });
        let (x0, x1) = finite_range(values.chain([self.reference])).unwrap_or((-1.0, 1.0));
        let label_width = self.rows.iter().map(|r| text_width(&r.label, 14)).max().unwrap_or(0).clamp(40, 300) + 16;
        let note_width = self.rows.iter().map(|r| text_width(&r.note, 14)).max().unwrap_or(0).min(240) + 16;
        let legend_height = 34;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22))
            .margin(12)
            .margin_right(12 + note_width)
            .margin_bottom(12 + legend_height)
            .x_label_area_size(44)
            .y_label_area_size(label_width)
            .build_cartesian_2d(x0..x1, -0.6f64..(n as f64 - 0.4))
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc(self.x_label.as_str())
            .label_style((FONT, 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        let (y0, y1) = (-0.6, n as f64 - 0.4);
        chart
            .draw_series([PathElement::new(vec![(self.reference, y0), (self.reference, y1)], BLACK.stroke_width(1))])
            .map_err(e)?;
        let label_style = TextStyle::from((FONT, 14).into_font()).color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
        for (i, row) in self.rows.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            let color = row.rgb();
            let (lo, hi) = row.bar;
            chart.draw_series([Rectangle::new([(lo, y - 0.17), (hi, y + 0.17)], color.mix(0.35).filled())]).map_err(e)?;
            if let Some((lo, hi)) = row.line {
                let style = color.stroke_width(2);
                chart
                    .draw_series([
                        PathElement::new(vec![(lo, y), (hi, y)], style),
                        PathElement::new(vec![(lo, y - 0.1), (lo, y + 0.1)], style),
                        PathElement::new(vec![(hi, y - 0.1), (hi, y + 0.1)], style),
                    ])
                    .map_err(e)?;
            }
            if let Some(m) = row.mark {
                chart.draw_series([PathElement::new(vec![(m, y - 0.3), (m, y + 0.3)], MARK_COLOR.stroke_width(3))]).map_err(e)?;
            }
            chart.draw_series([Circle::new((row.estimate, y), 5, BLACK.filled())]).map_err(e)?;
            let (left, py) = chart.backend_coord(&(x0, y));
            root.draw(&Text::new(row.label.clone(), (left - 8, py), label_style.clone())).map_err(e)?;
            if !row.note.is_empty() {
                let (right, _) = chart.backend_coord(&(x1, y));
                let note_style = TextStyle::from((FONT, 14).into_font()).color(&color).pos(Pos::new(HPos::Left, VPos::Center));
                root.draw(&Text::new(row.note.clone(), (right + 10, py), note_style)).map_err(e)?;
            }
        }
        // Legend along the bottom edge: only the elements that some row has.
        let legend_style = TextStyle::from((FONT, 13).into_font()).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        let ly = h as i32 - 12 - legend_height as i32 / 2;
        let mut x = 12 + label_width as i32;
        // Rows carry their own colours (e.g. by verdict), so the keys are neutral.
        let key = RGBColor(100, 100, 100);
        enum Glyph {
            Point,
            Bar,
            Line,
            Mark,
        }
        let entries = [
            (true, self.estimate_name.as_str(), Glyph::Point),
            (true, self.bar_name.as_str(), Glyph::Bar),
            (self.rows.iter().any(|r| r.line.is_some()), self.line_name.as_str(), Glyph::Line),
            (self.rows.iter().any(|r| r.mark.is_some()), self.mark_name.as_str(), Glyph::Mark),
        ];
        for (_, name, glyph) in entries.into_iter().filter(|(shown, name, _)| *shown && !name.is_empty()) {
            match glyph {
                Glyph::Point => root.draw(&Circle::new((x + 11, ly), 5, BLACK.filled())).map_err(e)?,
                Glyph::Bar => root.draw(&Rectangle::new([(x, ly - 6), (x + 22, ly + 6)], key.mix(0.35).filled())).map_err(e)?,
                Glyph::Line => root.draw(&PathElement::new(vec![(x, ly), (x + 22, ly)], key.stroke_width(2))).map_err(e)?,
                Glyph::Mark => {
                    root.draw(&PathElement::new(vec![(x + 11, ly - 9), (x + 11, ly + 9)], MARK_COLOR.stroke_width(3))).map_err(e)?
                }
            }
            root.draw(&Text::new(name.to_string(), (x + 28, ly), legend_style.clone())).map_err(e)?;
            x += 28 + text_width(name, 13) as i32 + 24;
        }
        Ok(())
    }
}
