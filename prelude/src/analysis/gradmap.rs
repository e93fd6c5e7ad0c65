//! Gradient-map post-processing: PIVOT's per-token gradient-norm map (`llava/train/hook.py`),
//! Grad-CAM for ViT token activations (pytorch-grad-cam), the jet overlay, and a localisation
//! score against object masks. Inputs are gradients/activations already taken from the model.

use crate::error::{PivotError, Result};
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tch::{Device, Kind, Tensor};

/// Per-token reduction of the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenNorm {
    /// Σ_c |g_c| (PIVOT default).
    L1,
    /// ‖g‖₂.
    L2,
}

/// Options of [`pivot_map`]; the defaults are PIVOT's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradMapOptions {
    pub norm: TokenNorm,
    /// Replace the outer ring of the token grid (register-like artefacts) by inner cells.
    pub border_fix: bool,
    pub seed: u64,
    pub gamma: f64,
    /// Output (H, W).
    pub size: (i64, i64),
}

impl Default for GradMapOptions {
    fn default() -> Self {
        GradMapOptions { norm: TokenNorm::L1, border_fix: true, seed: 0, gamma: 1.1, size: (384, 384) }
    }
}

/// Every outer-ring cell takes the value of one of the two next-inner cells along its column (top
/// and bottom rows) or row (left and right columns), chosen by a seeded RNG. Rows are fixed first,
/// so corners inherit from already fixed rows. Grids smaller than 3×3 are returned unchanged.
pub fn border_fix(map: &Tensor, seed: u64) -> Tensor {
    let s = map.size();
    let (h, w) = (s[0], s[1]);
    if h < 3 || w < 3 {
        return map.copy();
    }
    let mut v: Vec<f64> = Vec::try_from(&map.to_device(Device::Cpu).to_kind(Kind::Double).reshape([-1])).unwrap_or_default();
    let (hu, wu) = (h as usize, w as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    // Index of the first or second cell inward from an edge cell.
    let inner = |rng: &mut StdRng, edge: usize| {
        let step = if rng.random_bool(0.5) { 1 } else { 2 };
        if edge == 0 { step } else { edge - step }
    };
    for j in 0..wu {
        for i in [0, hu - 1] {
            let src = inner(&mut rng, i);
            v[i * wu + j] = v[src * wu + j];
        }
    }
    for i in 0..hu {
        for j in [0, wu - 1] {
            let src = inner(&mut rng, j);
            v[i * wu + j] = v[i * wu + src];
        }
    }
    Tensor::from_slice(&v).view([h, w]).to_kind(map.kind()).to_device(map.device())
}

/// (x − min) / (max − min); all zeros when the map is constant.
pub fn min_max(map: &Tensor) -> Tensor {
    let (lo, hi) = (map.min(), map.max());
    let range = (&hi - &lo).double_value(&[]);
    if range <= 0.0 || !range.is_finite() { map.zeros_like() } else { (map - lo) / range }
}

fn resize(map: &Tensor, size: (i64, i64)) -> Tensor {
    let s = map.size();
    if (s[0], s[1]) == size {
        return map.shallow_clone();
    }
    map.view([1, 1, s[0], s[1]]).upsample_bilinear2d([size.0, size.1], false, None, None).view([size.0, size.1])
}

fn check_grid(n: i64, grid: (i64, i64), what: &str) -> Result<()> {
    if grid.0 * grid.1 != n {
        return Err(PivotError::invalid(format!("{what}: {n} tokens do not fill a {}×{} grid", grid.0, grid.1)));
    }
    Ok(())
}

/// PIVOT's map from gradients at the projector output (or any token sequence) `token_grads`
/// [N, D]: per-token norm → grid → border fix → min-max → ^gamma → bilinear resize. Returns
/// [H, W] float32 in [0, 1] (resizing keeps the range: bilinear weights are convex).
pub fn pivot_map(token_grads: &Tensor, grid: (i64, i64), opts: &GradMapOptions) -> Result<Tensor> {
    let s = token_grads.size();
    if s.len() != 2 {
        return Err(PivotError::invalid(format!("pivot_map: expected token gradients [N, D], got {s:?}")));
    }
    check_grid(s[0], grid, "pivot_map")?;
    let g = token_grads.to_kind(Kind::Float);
    let sal = match opts.norm {
        TokenNorm::L1 => g.abs().sum_dim_intlist([-1i64].as_slice(), false, Kind::Float),
        TokenNorm::L2 => g.norm_scalaropt_dim(2, [-1i64].as_slice(), false),
    };
    let mut m = sal.view([grid.0, grid.1]);
    if opts.border_fix {
        m = border_fix(&m, opts.seed);
    }
    let m = min_max(&m).pow_tensor_scalar(opts.gamma);
    Ok(resize(&m, opts.size))
}

/// Grad-CAM on one token-sequence layer: `activations` and `grads` [N_tok, C] (prefix tokens such
/// as CLIP's CLS first); weights α_c = mean over patches of ∂y/∂A_c, cam = ReLU(Σ_c α_c A_c),
/// then cam − min, / (max + 1e-7), bilinear resize to `size`.
pub fn grad_cam(activations: &Tensor, grads: &Tensor, prefix_tokens: i64, grid: (i64, i64), size: (i64, i64)) -> Result<Tensor> {
    let (a, g) = (activations.size(), grads.size());
    if a.len() != 2 || a != g {
        return Err(PivotError::invalid(format!("grad_cam: activations {a:?} and gradients {g:?} must both be [N_tok, C]")));
    }
    check_grid(a[0] - prefix_tokens, grid, "grad_cam")?;
    let act = activations.to_kind(Kind::Float).narrow(0, prefix_tokens, a[0] - prefix_tokens);
    let gr = grads.to_kind(Kind::Float).to_device(act.device()).narrow(0, prefix_tokens, a[0] - prefix_tokens);
    let w = gr.mean_dim([0i64].as_slice(), true, Kind::Float);
    let cam = (act * w).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float).relu().view([grid.0, grid.1]);
    let cam = &cam - cam.min();
    let cam = &cam / (cam.max() + 1e-7);
    Ok(resize(&cam, size))
}

/// matplotlib's `jet` colormap (its segment data), v in [0, 1].
pub fn jet(v: f64) -> [u8; 3] {
    fn seg(x: f64, pts: &[(f64, f64)]) -> f64 {
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            if x <= x1 {
                return y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0);
            }
        }
        pts[pts.len() - 1].1
    }
    let x = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let r = seg(x, &[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)]);
    let g = seg(x, &[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)]);
    let b = seg(x, &[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)]);
    [(r * 255.0).round() as u8, (g * 255.0).round() as u8, (b * 255.0).round() as u8]
}

/// A [H, W] map in [0, 1] as a jet-coloured image.
pub fn colorize(map: &Tensor) -> RgbImage {
    let s = map.size();
    let v: Vec<f32> = Vec::try_from(&map.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1])).unwrap_or_default();
    RgbImage::from_fn(s[1] as u32, s[0] as u32, |x, y| image::Rgb(jet(v[(y as i64 * s[1] + x as i64) as usize] as f64)))
}

/// PIVOT's overlay: 0.6·jet(map) + 0.4·(0.7·image). The map is resized to the image first.
pub fn overlay(image: &RgbImage, map: &Tensor) -> RgbImage {
    overlay_with(image, map, 0.6, 0.7)
}

/// [`overlay`] with explicit heat-map `alpha` and image `darken` factor.
pub fn overlay_with(image: &RgbImage, map: &Tensor, alpha: f64, darken: f64) -> RgbImage {
    let (w, h) = image.dimensions();
    let heat = colorize(&resize(&map.to_kind(Kind::Float), (h as i64, w as i64)));
    RgbImage::from_fn(w, h, |x, y| {
        let (p, q) = (image.get_pixel(x, y).0, heat.get_pixel(x, y).0);
        image::Rgb(std::array::from_fn(|c| (alpha * q[c] as f64 + (1.0 - alpha) * darken * p[c] as f64).round().clamp(0.0, 255.0) as u8))
    })
}

/// `image` with the boundary of `mask` (non-zero = inside) drawn in `colour`: the pixels inside
/// the mask that touch a pixel outside it (4-neighbourhood) or the image border. The mask is
/// resized (nearest) to the image first, so an upscaled overlay still gets a one-pixel line.
pub fn mask_outline(image: &RgbImage, mask: &GrayImage, colour: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    let m = if mask.dimensions() == (w, h) {
        mask.clone()
    } else {
        image::imageops::resize(mask, w, h, image::imageops::FilterType::Nearest)
    };
    let inside = |x: i64, y: i64| x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && m.get_pixel(x as u32, y as u32).0[0] != 0;
    let mut out = image.clone();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if inside(x, y) && [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|(dx, dy)| !inside(x + dx, y + dy)) {
                out.put_pixel(x as u32, y as u32, image::Rgb(colour));
            }
        }
    }
    out
}

/// An image tensor ([3, H, W] or [H, W, 3]; uint8, or float in [0, 1]) as an `RgbImage`.
/// Normalised pixels (e.g. SigLIP's [−1, 1]) must be mapped back to [0, 1] first.
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let s = t.size();
    let hwc = match s.as_slice() {
        [3, _, _] => t.permute([1, 2, 0]),
        [_, _, 3] => t.shallow_clone(),
        _ => return Err(PivotError::invalid(format!("tensor_to_rgb: expected [3, H, W] or [H, W, 3], got {s:?}"))),
    };
    let u8s = if t.kind() == Kind::Uint8 { hwc } else { (hwc.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8) };
    let hs = u8s.size();
    let v: Vec<u8> = Vec::try_from(&u8s.to_device(Device::Cpu).contiguous().reshape([-1]))?;
    RgbImage::from_raw(hs[1] as u32, hs[0] as u32, v).ok_or_else(|| PivotError::invalid("tensor_to_rgb: buffer size mismatch"))
}

/// Share of a non-negative map's energy that falls inside the mask (mask ≠ 0). Maps are resized to the
/// mask when their sizes differ. A uniform map scores the mask's area fraction (chance).
pub fn energy_in_mask(map: &Tensor, mask: &Tensor) -> Result<f64> {
    let ms = mask.size();
    if ms.len() != 2 || map.dim() != 2 {
        return Err(PivotError::invalid(format!("energy_in_mask: expected [H, W] map and mask, got {:?} and {ms:?}", map.size())));
    }
    let m = resize(&map.to_kind(Kind::Double), (ms[0], ms[1])).clamp_min(0.0);
    let inside = mask.to_device(m.device()).ne(0).to_kind(Kind::Double);
    let total = m.sum(Kind::Double).double_value(&[]);
    if total <= 0.0 {
        return Ok(f64::NAN);
    }
    Ok((&m * inside).sum(Kind::Double).double_value(&[]) / total)
}

/// Pointing game: is the map's maximum within `tolerance` pixels (Chebyshev) of the mask?
pub fn pointing_game(map: &Tensor, mask: &Tensor, tolerance: i64) -> Result<bool> {
    let ms = mask.size();
    if ms.len() != 2 || map.dim() != 2 {
        return Err(PivotError::invalid("pointing_game: expected [H, W] map and mask"));
    }
    let m = resize(&map.to_kind(Kind::Float), (ms[0], ms[1]));
    let idx = m.reshape([-1]).argmax(0, false).int64_value(&[]);
    let (y, x) = (idx / ms[1], idx % ms[1]);
    let (y0, y1) = ((y - tolerance).max(0), (y + tolerance).min(ms[0] - 1));
    let (x0, x1) = ((x - tolerance).max(0), (x + tolerance).min(ms[1] - 1));
    let win = mask.narrow(0, y0, y1 - y0 + 1).narrow(1, x0, x1 - x0 + 1);
    Ok(win.ne(0).any().int64_value(&[]) != 0)
}

/// Localisation of a set of maps against object masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalisationScore {
    /// Mean share of map energy inside the mask.
    pub energy: f64,
    /// Fraction of maps whose maximum hits the mask.
    pub pointing: f64,
    /// Mean mask area fraction: what a uniform map would score on `energy`.
    pub chance: f64,
    pub n: usize,
}

/// Averages [`energy_in_mask`] and [`pointing_game`] (tolerance 0) over pairs; maps with no energy are skipped.
pub fn localisation(maps: &[Tensor], masks: &[Tensor]) -> Result<LocalisationScore> {
    if maps.len() != masks.len() || maps.is_empty() {
        return Err(PivotError::invalid(format!("localisation: {} maps for {} masks", maps.len(), masks.len())));
    }
    let (mut e, mut p, mut c, mut n) = (0.0, 0.0, 0.0, 0usize);
    for (map, mask) in maps.iter().zip(masks) {
        let en = energy_in_mask(map, mask)?;
        if en.is_nan() {
            continue;
        }
        e += en;
        p += pointing_game(map, mask, 0)? as u8 as f64;
        c += mask.ne(0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        n += 1;
    }
    let d = n.max(1) as f64;
    Ok(LocalisationScore { energy: e / d, pointing: p / d, chance: c / d, n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_outline_draws_only_the_boundary_at_image_size() {
        let img = RgbImage::from_pixel(12, 12, image::Rgb([10, 10, 10]));
        // A 2x2 block at (1..3, 1..3) of a 4x4 mask becomes the 3..9 block of the 12x12 image.
        let mask = GrayImage::from_fn(4, 4, |x, y| image::Luma([((1..3).contains(&x) && (1..3).contains(&y)) as u8]));
        let out = mask_outline(&img, &mask, [255, 0, 0]);
        let red = |x, y| out.get_pixel(x, y).0 == [255, 0, 0];
        assert!(red(3, 3) && red(8, 3) && red(3, 8) && red(8, 8) && red(5, 3));
        assert!(!red(5, 5) && !red(2, 2) && !red(9, 9) && !red(0, 0));
        assert_eq!(out.pixels().filter(|p| p.0 == [255, 0, 0]).count(), 6 * 6 - 4 * 4);
        // A mask that fills the image is outlined along the image border.
        let full = mask_outline(&img, &GrayImage::from_pixel(12, 12, image::Luma([1])), [0, 255, 0]);
        assert_eq!(full.pixels().filter(|p| p.0 == [0, 255, 0]).count(), 4 * 12 - 4);
        // An empty mask leaves the image as it was.
        assert_eq!(mask_outline(&img, &GrayImage::new(4, 4), [255, 0, 0]), img);
    }
}

/// How a localisation score shows itself: one line of text and a `Metrics` row for `Runs`.
mod display {
    use super::LocalisationScore;
    use crate::plot::Metrics;
    use crate::runtime::{MimeBundle, Rich};
    use std::fmt;

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

    impl Metrics for LocalisationScore {
        fn metrics(&self) -> Vec<(String, f64)> {
            vec![
                ("energy_in_mask".into(), self.energy),
                ("pointing_game".into(), self.pointing),
                ("chance".into(), self.chance),
            ]
        }
    }
}
