//! Rasterisation of `ShapesWorld` scenes.
//!
//! Only integer arithmetic and IEEE +, −, ×, ÷ are used (no sin/cos/exp, whose last bit differs
//! between C libraries), so a scene renders to the same bytes on every machine.

use image::{GrayImage, Luma, Rgb, RgbImage};

use super::rng::{Stream, WorldRng, WorldSeed};
use super::scene::{Scene, Shape, Texture};
use super::Split;

// Unit five-pointed star, apex up (y grows downwards): outer radius 1, inner radius 0.5.
// cos/sin of multiples of 18° written out so that no platform libm is involved.
const STAR: [(f64, f64); 10] = [
    (0.0, -1.0),
    (0.293_892_626_146_236_6, -0.404_508_497_187_473_7),
    (0.951_056_516_295_153_5, -0.309_016_994_374_947_4),
    (0.475_528_258_147_576_8, 0.154_508_497_187_473_7),
    (0.587_785_252_292_473_1, 0.809_016_994_374_947_4),
    (0.0, 0.5),
    (-0.587_785_252_292_473_1, 0.809_016_994_374_947_4),
    (-0.475_528_258_147_576_8, 0.154_508_497_187_473_7),
    (-0.951_056_516_295_153_5, -0.309_016_994_374_947_4),
    (-0.293_892_626_146_236_6, -0.404_508_497_187_473_7),
];

// Equilateral triangle inscribed in the unit circle, apex up.
const TRIANGLE: [(f64, f64); 3] = [(0.0, -1.0), (0.866_025_403_784_438_6, 0.5), (-0.866_025_403_784_438_6, 0.5)];

/// Even–odd rule point-in-polygon test.
fn in_polygon(u: f64, v: f64, polygon: &[(f64, f64)]) -> bool {
    let mut inside = false;
    let mut j = polygon.len() - 1;
    for i in 0..polygon.len() {
        let (xi, yi) = polygon[i];
        let (xj, yj) = polygon[j];
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Whether the point (u, v), in units of the shape's radius around its centre, is inside.
pub(super) fn shape_contains(shape: Shape, u: f64, v: f64) -> bool {
    match shape {
        Shape::Circle => u * u + v * v <= 1.0,
        Shape::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
        Shape::Diamond => u.abs() + v.abs() <= 1.0,
        Shape::Triangle => in_polygon(u, v, &TRIANGLE),
        Shape::Star => in_polygon(u, v, &STAR),
        Shape::Cross => (u.abs() <= 1.0 && v.abs() <= 0.34) || (u.abs() <= 0.34 && v.abs() <= 1.0),
    }
}

/// Which object (index into `scene.objects`) is visible at each pixel, `None` for background.
/// Later objects in draw order cover earlier ones.
pub(super) fn owner_map(size: u32, objects: &[(Shape, f64, f64, f64)], draw_order: &[usize]) -> Vec<Option<usize>> {
    let n = size as usize;
    let mut owners = vec![None; n * n];
    for &index in draw_order {
        let (shape, cx, cy, radius) = objects[index];
        // Only the bounding square of the shape needs testing.
        let x0 = ((cx - radius).floor().max(0.0)) as usize;
        let y0 = ((cy - radius).floor().max(0.0)) as usize;
        let x1 = ((cx + radius).ceil() as usize + 1).min(n);
        let y1 = ((cy + radius).ceil() as usize + 1).min(n);
        for y in y0..y1 {
            for x in x0..x1 {
                let u = (x as f64 + 0.5 - cx) / radius;
                let v = (y as f64 + 0.5 - cy) / radius;
                if shape_contains(shape, u, v) {
                    owners[y * n + x] = Some(index);
                }
            }
        }
    }
    owners
}

/// The scene's image and class mask (0 = background, 1 + shape index for objects).
pub(super) fn render(scene: &Scene, seed: WorldSeed, split: Split, index: u64) -> (RgbImage, GrayImage) {
    let size = scene.image_size;
    let n = size as usize;
    let owners = owner_map(size, &scene.geometry(), &scene.draw_order);
    let background = background(scene, seed, split, index);
    let mut image = RgbImage::new(size, size);
    let mut mask = GrayImage::new(size, size);
    for y in 0..n {
        for x in 0..n {
            let (rgb, class) = match owners[y * n + x] {
                Some(object) => {
                    let object = &scene.objects[object];
                    (object.colour.rgb(), object.shape.mask_value())
                }
                None => (background[y * n + x], 0),
            };
            image.put_pixel(x as u32, y as u32, Rgb(rgb));
            mask.put_pixel(x as u32, y as u32, Luma([class]));
        }
    }
    (image, mask)
}

/// Textured background. Texture is a luminance offset added equally to the three channels of a
/// desaturated base colour, so no background pixel can take a (saturated) object colour and a
/// colour alone tells object from background — the shape category still needs the context.
fn background(scene: &Scene, seed: WorldSeed, split: Split, index: u64) -> Vec<[u8; 3]> {
    let bg = &scene.background;
    let n = scene.image_size as usize;
    let mut rng = WorldRng::new(seed, split, index, Stream::Texture);
    let amplitude = bg.amplitude;
    let cells = n.div_ceil(bg.period as usize);
    let noise: Vec<i32> = (0..cells * cells).map(|_| rng.int_range(-amplitude, amplitude)).collect();
    let mut pixels = Vec::with_capacity(n * n);
    for y in 0..n {
        for x in 0..n {
            let p = bg.period as usize;
            let offset = match bg.texture {
                Texture::Noise => noise[(y / p) * cells + x / p],
                Texture::Stripes => {
                    let t = match bg.orientation {
                        0 => y,
                        1 => x,
                        2 => x + y,
                        _ => x + n - y,
                    };
                    if t % p < p / 2 { amplitude } else { -amplitude }
                }
                Texture::Checker => {
                    if (x / p + y / p).is_multiple_of(2) { amplitude } else { -amplitude }
                }
            };
            // A little grain everywhere, so flat regions are not a giveaway of the texture type.
            let grain = rng.int_range(-4, 4);
            let pixel = bg.base.map(|c| (c as i32 + offset + grain).clamp(0, 255) as u8);
            pixels.push(pixel);
        }
    }
    pixels
}
