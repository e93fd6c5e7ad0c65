//! Charts drawn with plotters into PNG (bitmap backend + ab_glyph text) and SVG.
//!
//! Text is rasterised from DejaVu Sans embedded via the `dejavu` crate, so rendering needs no
//! fontconfig or system fonts (plotters' default `ttf` feature would).

use super::figure::{Figure, encode_png};
use crate::error::{PivotError, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::sync::OnceLock;

pub(super) const FONT: &str = "sans-serif";

fn ensure_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // Registration only fails for a corrupt font file, which the crate does not ship.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

pub(super) type DrawResult = std::result::Result<(), String>;

/// One chart, drawable on any plotters backend (so PNG and SVG come from the same code).
pub(super) trait Chart {
    fn title(&self) -> &str;
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;
}

pub(super) fn e<E: std::fmt::Debug>(err: E) -> String {
    format!("{err:?}")
}

pub(super) fn render<C: Chart>(chart: &C, size: (u32, u32)) -> Result<Figure> {
    ensure_font();
    let (w, h) = size;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        chart.draw(&root).map_err(|m| PivotError::invalid(format!("plot \"{}\": {m}", chart.title())))?;
        root.present().map_err(|m| PivotError::invalid(format!("plot: {m:?}")))?;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        chart.draw(&root).map_err(|m| PivotError::invalid(format!("plot \"{}\" (svg): {m}", chart.title())))?;
        root.present().map_err(|m| PivotError::invalid(format!("plot: {m:?}")))?;
    }
    Ok(Figure { title: chart.title().to_string(), width: w, height: h, png: encode_png(&buf, w, h)?, svg })
}

/// Series colours: plotters' Palette99 (distinct, colour-blind-friendly first entries).
pub fn series_color(i: usize) -> RGBColor {
    let c = Palette99::pick(i).to_rgba();
    RGBColor(c.0, c.1, c.2)
}

pub(super) fn finite_range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if hi - lo < 1e-12 {
        let pad = lo.abs().max(1.0) * 0.05;
        return Some((lo - pad, hi + pad));
    }
    let pad = (hi - lo) * 0.05;
    Some((lo - pad, hi + pad))
}

/// A named (x, y) series, e.g. one training run's loss per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points }
    }
    /// y values at x = 0, 1, 2, ...
    pub fn from_values(name: impl Into<String>, ys: &[f64]) -> Self {
        Series::new(name, ys.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect())
    }
}

struct Curves<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
}

impl Chart for Curves<'_> {
    fn title(&self) -> &str {
        self.title
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = finite_range(all().map(|p| p.0)).unwrap_or((0.0, 1.0));
        let (y0, y1) = finite_range(all().map(|p| p.1)).unwrap_or((0.0, 1.0));
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .label_style((FONT, 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        for (i, s) in self.series.iter().enumerate() {
            let color = series_color(i);
            let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
        Ok(())
    }
}

/// Line curves of several runs (one series per run, legend), e.g. loss vs step.
pub fn curves(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<Figure> {
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PivotError::invalid("curves: nothing to plot (all series are empty)"));
    }
    render(&Curves { title, x_label, y_label, series }, (800, 480))
}

/// One bar: a label and its per-seed values (mean drawn as the bar, ±1 std and every seed as dots).
#[derive(Debug, Clone, PartialEq)]
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
}

impl BarGroup {
    pub fn new(label: impl Into<String>, values: Vec<f64>) -> Self {
        BarGroup { label: label.into(), values }
    }
    pub fn mean(&self) -> f64 {
        let v: Vec<f64> = self.values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
    }
    /// Sample standard deviation (n − 1); 0 for a single seed.
    pub fn std(&self) -> f64 {
        let v: Vec<f64> = self.values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.len() < 2 {
            return 0.0;
        }
        let m = self.mean();
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    }
}

struct Bars<'a> {
    title: &'a str,
    y_label: &'a str,
    groups: &'a [BarGroup],
}

impl Chart for Bars<'_> {
    fn title(&self) -> &str {
        self.title
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let n = self.groups.len();
        let hi = self
            .groups
            .iter()
            .flat_map(|g| g.values.iter().copied().chain([g.mean() + g.std()]))
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max);
        let lo = self.groups.iter().flat_map(|g| g.values.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::min);
        let hi = if hi.is_finite() && hi > lo { hi + 0.08 * (hi - lo) } else { lo + 1.0 };
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
            .map_err(e)?;
        let labels: Vec<String> = self.groups.iter().map(|g| g.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() { labels[i as usize].clone() } else { String::new() }
            })
            .y_desc(self.y_label)
            .label_style((FONT, 13))
            .draw()
            .map_err(e)?;
        for (i, g) in self.groups.iter().enumerate() {
            let (x, m, s) = (i as f64, g.mean(), g.std());
            if !m.is_finite() {
                continue;
            }
            let color = series_color(i);
            chart.draw_series([Rectangle::new([(x - 0.35, 0f64.max(lo)), (x + 0.35, m)], color.mix(0.75).filled())]).map_err(e)?;
            chart.draw_series([ErrorBar::new_vertical(x, m - s, m, m + s, BLACK.stroke_width(2), 14)]).map_err(e)?;
            chart
                .draw_series(g.values.iter().filter(|v| v.is_finite()).map(|&v| Circle::new((x + 0.18, v), 3, BLACK.filled())))
                .map_err(e)?;
        }
        Ok(())
    }
}

/// Bars with per-seed spread: bar = mean, error bar = ±1 sample std, dots = individual seeds.
pub fn bars(title: &str, y_label: &str, groups: &[BarGroup]) -> Result<Figure> {
    if groups.is_empty() {
        return Err(PivotError::invalid("bars: no groups to plot"));
    }
    let w = (160 + 110 * groups.len() as u32).clamp(480, 1600);
    render(&Bars { title, y_label, groups }, (w, 480))
}

struct Heatmap<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    values: &'a [Vec<f64>],
    mark: Option<(usize, usize)>,
}

impl Chart for Heatmap<'_> {
    fn title(&self) -> &str {
        self.title
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        root.fill(&WHITE).map_err(e)?;
        let rows = self.values.len();
        let cols = self.values.first().map_or(0, |r| r.len());
        let (lo, hi) = {
            let it = self.values.iter().flatten().copied().filter(|v| v.is_finite());
            let (lo, hi) = it.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
            if lo > hi { (0.0, 1.0) } else if hi - lo < 1e-12 { (lo - 0.5, hi + 0.5) } else { (lo, hi) }
        };
        let (w, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(w.saturating_sub(110));
        let mut chart = ChartBuilder::on(&main)
            .caption(self.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .x_labels(cols.min(16) + 1)
            .y_labels(rows.min(16) + 1)
            .x_label_formatter(&|v| format!("{}", v.floor() as i64))
            .y_label_formatter(&|v| format!("{}", v.floor() as i64))
            .label_style((FONT, 12))
            .draw()
            .map_err(e)?;
        let color = |v: f64| {
            if v.is_finite() { ViridisRGB::get_color_normalized(v as f32, lo as f32, hi as f32) } else { RGBColor(200, 200, 200) }
        };
        chart
            .draw_series(self.values.iter().enumerate().flat_map(|(i, row)| {
                row.iter().enumerate().map(move |(j, &v)| {
                    Rectangle::new([(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)], color(v).filled())
                })
            }))
            .map_err(e)?;
        if let Some((i, j)) = self.mark {
            let r = [(j as f64 + 0.08, i as f64 + 0.08), (j as f64 + 0.92, i as f64 + 0.92)];
            chart.draw_series([Rectangle::new(r, RED.stroke_width(3))]).map_err(e)?;
        }
        // Colour bar: 64 stacked cells with min/max/mid labels.
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(50)
            .margin_bottom(57)
            .margin_right(10)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1.0, lo..hi)
            .map_err(e)?;
        cb.configure_mesh().disable_mesh().disable_x_axis().y_labels(5).label_style((FONT, 12)).draw().map_err(e)?;
        let steps = 64;
        cb.draw_series((0..steps).map(|s| {
            let a = lo + (hi - lo) * s as f64 / steps as f64;
            let b = lo + (hi - lo) * (s + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], color((a + b) / 2.0).filled())
        }))
        .map_err(e)?;
        Ok(())
    }
}

/// Heat map of `values[row][col]` (e.g. an alignment grid, row = layer of A) with a colour bar;
/// `mark` outlines one cell (e.g. the argmax).
pub fn heatmap(title: &str, x_label: &str, y_label: &str, values: &[Vec<f64>], mark: Option<(usize, usize)>) -> Result<Figure> {
    if values.is_empty() || values[0].is_empty() || values.iter().any(|r| r.len() != values[0].len()) {
        return Err(PivotError::invalid("heatmap: values must be a non-empty rectangular grid"));
    }
    render(&Heatmap { title, x_label, y_label, values, mark }, (760, 560))
}

/// A deterministic palette for class ids: 0 black, the rest spread in hue by the golden ratio.
pub fn seg_palette(num_classes: usize) -> Vec<[u8; 3]> {
    (0..num_classes)
        .map(|c| {
            if c == 0 {
                return [0, 0, 0];
            }
            let h = (c as f64 * 0.618_033_988_75).fract();
            let s = 0.55 + 0.35 * ((c * 7) % 3) as f64 / 2.0;
            let v = 0.95 - 0.25 * ((c * 5) % 2) as f64;
            let hsl = HSLColor(h, s, v * 0.55);
            let rgb = hsl.to_rgba();
            [rgb.0, rgb.1, rgb.2]
        })
        .collect()
}

/// Class-id map [H, W] (any integer kind) as an image; ids outside the palette (e.g. 255 =
/// ignore) are white.
pub fn colorize_labels(labels: &tch::Tensor, palette: &[[u8; 3]]) -> Result<RgbImage> {
    let s = labels.size();
    if s.len() != 2 {
        return Err(PivotError::invalid(format!("colorize_labels: expected [H, W], got {s:?}")));
    }
    let v: Vec<i64> = Vec::try_from(&labels.to_device(tch::Device::Cpu).to_kind(tch::Kind::Int64).reshape([-1]))?;
    Ok(RgbImage::from_fn(s[1] as u32, s[0] as u32, |x, y| {
        let c = v[(y as i64 * s[1] + x as i64) as usize];
        image::Rgb(if c >= 0 && (c as usize) < palette.len() { palette[c as usize] } else { [255, 255, 255] })
    }))
}

/// Tiles images into a grid (`cols` per row) with a caption above each tile. Tiles keep their size;
/// each cell is as large as the largest tile.
pub fn image_grid(title: &str, tiles: &[(String, RgbImage)], cols: usize) -> Result<Figure> {
    if tiles.is_empty() {
        return Err(PivotError::invalid("image_grid: no images"));
    }
    ensure_font();
    let cols = cols.clamp(1, tiles.len());
    let rows = tiles.len().div_ceil(cols);
    let (cw, ch) = tiles.iter().fold((0u32, 0u32), |(w, h), (_, im)| (w.max(im.width()), h.max(im.height())));
    let (pad, cap, head) = (8u32, 22u32, if title.is_empty() { 0 } else { 32u32 });
    let w = cols as u32 * (cw + pad) + pad;
    let h = head + rows as u32 * (ch + cap + pad) + pad;
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let origin = |k: usize| {
        let (r, c) = ((k / cols) as u32, (k % cols) as u32);
        (pad + c * (cw + pad), head + pad + r * (ch + cap + pad))
    };
    for (k, (_, im)) in tiles.iter().enumerate() {
        let (x0, y0) = origin(k);
        image::imageops::replace(&mut canvas, im, x0 as i64, (y0 + cap) as i64);
    }
    let mut buf = canvas.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let style = TextStyle::from((FONT, 15).into_font()).color(&BLACK);
        if head > 0 {
            root.draw(&Text::new(title.to_string(), (pad as i32, 6), (FONT, 20).into_font().color(&BLACK)))
                .map_err(|m| PivotError::invalid(format!("image_grid: {m:?}")))?;
        }
        for (k, (caption, _)) in tiles.iter().enumerate() {
            let (x0, y0) = origin(k);
            root.draw(&Text::new(caption.clone(), (x0 as i32, y0 as i32 + 2), style.clone()))
                .map_err(|m| PivotError::invalid(format!("image_grid: {m:?}")))?;
        }
        root.present().map_err(|m| PivotError::invalid(format!("image_grid: {m:?}")))?;
    }
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| PivotError::invalid("image_grid: buffer size"))?;
    Figure::from_image(title, &img)
}

/// Prediction vs ground truth for a few samples: columns image | ground truth | prediction.
pub fn seg_comparison(images: &[RgbImage], truth: &[tch::Tensor], pred: &[tch::Tensor], num_classes: usize) -> Result<Figure> {
    if images.len() != truth.len() || truth.len() != pred.len() {
        return Err(PivotError::invalid("seg_comparison: images, truth and predictions must have the same length"));
    }
    let pal = seg_palette(num_classes);
    let mut tiles = Vec::new();
    for (i, ((im, t), p)) in images.iter().zip(truth).zip(pred).enumerate() {
        tiles.push((format!("#{i} image"), im.clone()));
        tiles.push((format!("#{i} ground truth"), colorize_labels(t, &pal)?));
        tiles.push((format!("#{i} prediction"), colorize_labels(p, &pal)?));
    }
    image_grid("segmentation: prediction vs ground truth", &tiles, 3)
}

/// Ground truth next to several models' predictions on the same images: one row per image with
/// columns image | ground truth | one per model, then a legend row (one swatch per class).
/// `truth` and every prediction are class maps [N, H, W]; `preds` pairs a model name with its
/// maps. Tiles are enlarged `scale` times (nearest), so 64-pixel scenes stay readable.
pub fn seg_comparison_models(
    title: &str,
    images: &[RgbImage],
    truth: &tch::Tensor,
    preds: &[(&str, tch::Tensor)],
    class_names: &[String],
    scale: u32,
) -> Result<Figure> {
    let n = images.len();
    let shape_ok = |t: &tch::Tensor| t.dim() == 3 && t.size()[0] == n as i64;
    if n == 0 || !shape_ok(truth) || preds.iter().any(|(_, p)| !shape_ok(p)) {
        return Err(PivotError::invalid(format!(
            "seg_comparison_models: {n} images need ground truth and predictions of shape [{n}, H, W] (got {:?} and {:?})",
            truth.size(),
            preds.iter().map(|(_, p)| p.size()).collect::<Vec<_>>()
        )));
    }
    if class_names.is_empty() {
        return Err(PivotError::invalid("seg_comparison_models: no class names"));
    }
    let pal = seg_palette(class_names.len());
    let s = scale.max(1);
    let big = |im: &RgbImage| image::imageops::resize(im, im.width() * s, im.height() * s, image::imageops::FilterType::Nearest);
    let mut tiles = Vec::new();
    for (i, im) in images.iter().enumerate() {
        tiles.push((format!("#{i} image"), big(im)));
        tiles.push(("ground truth".to_string(), big(&colorize_labels(&truth.get(i as i64), &pal)?)));
        for (name, p) in preds {
            tiles.push((name.to_string(), big(&colorize_labels(&p.get(i as i64), &pal)?)));
        }
    }
    let main = image_grid(title, &tiles, 2 + preds.len())?.to_image()?;
    // Legend below: one wide swatch per class (wide enough for its caption), in rows as wide as the grid.
    let swatch_w = class_names.iter().map(|n| 9 * n.chars().count() as u32 + 8).max().unwrap_or(40).max(40);
    let swatches: Vec<(String, RgbImage)> =
        class_names.iter().enumerate().map(|(c, n)| (n.clone(), RgbImage::from_pixel(swatch_w, 14, image::Rgb(pal[c])))).collect();
    let per_row = ((main.width().saturating_sub(8)) / (swatch_w + 8)).max(1) as usize;
    let legend = image_grid("", &swatches, per_row)?.to_image()?;
    let mut out = RgbImage::from_pixel(main.width().max(legend.width()), main.height() + legend.height(), image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, &main, 0, 0);
    image::imageops::replace(&mut out, &legend, 0, main.height() as i64);
    Figure::from_image(title, &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn seg_comparison_models_lays_out_truth_models_and_legend() {
        let img = RgbImage::from_pixel(8, 8, image::Rgb([200, 200, 200]));
        let truth = Tensor::zeros([2, 8, 8], (tch::Kind::Int64, tch::Device::Cpu));
        let a = Tensor::ones([2, 8, 8], (tch::Kind::Int64, tch::Device::Cpu));
        let b = a.full_like(2);
        let names: Vec<String> = ["background", "circle", "star"].iter().map(|s| s.to_string()).collect();
        let fig = seg_comparison_models("t", &[img.clone(), img.clone()], &truth, &[("A", a.shallow_clone()), ("B", b)], &names, 3)
            .unwrap();
        let out = fig.to_image().unwrap();
        let pal = seg_palette(3);
        // Four columns of 24-pixel tiles; each class colour shows (model B paints class 2), and the
        // legend adds one swatch per class below the grid.
        assert!(out.width() >= 4 * 24);
        for c in 1..3 {
            assert!(out.pixels().filter(|p| p.0 == pal[c]).count() >= 2 * 24 * 24, "class {c}");
        }
        let grid_only = image_grid("t", &[("x".to_string(), img.clone())], 4).unwrap();
        assert!(out.height() > 2 * (24 + 22) + grid_only.height - 24);
        assert!(out.pixels().filter(|p| p.0 == pal[0]).count() >= 2 * 24 * 24 + 40 * 14);
        // Mismatched shapes are an error, not a panic.
        let bad = Tensor::zeros([1, 8, 8], (tch::Kind::Int64, tch::Device::Cpu));
        assert!(seg_comparison_models("t", &[img.clone(), img.clone()], &truth, &[("A", bad)], &names, 1).is_err());
        assert!(seg_comparison_models("t", &[img], &truth, &[("A", a)], &names, 1).is_err());
    }
}
