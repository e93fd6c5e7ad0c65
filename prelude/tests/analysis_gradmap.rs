//! Gradient maps and localisation scores on constructed inputs.

use pivot::prelude::*;

const GRID: i64 = 8;

/// A toy "tower": 8×8 patch embedding (positive weights, no bias) of a 64×64 image giving an 8×8
/// token grid, and an objective that reads only the tokens of one region, so by construction the
/// output depends on that region alone. Returns (tokens, d objective / d tokens).
fn toy_tower(region: &[(i64, i64)]) -> (Tensor, Tensor) {
    tch::manual_seed(0);
    let img = Tensor::rand([1, 3, GRID * 8, GRID * 8], (Kind::Float, Device::Cpu)) * 0.1;
    // A bright object on the region's patches; the rest of the image is dim clutter.
    for &(r, c) in region {
        let _ = img.narrow(2, r * 8, 8).narrow(3, c * 8, 8).fill_(1.0);
    }
    let w = Tensor::rand([16, 3, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let tokens = img.conv2d(&w, None::<Tensor>, [8, 8], [0, 0], [1, 1], 1).flatten(2, 3).transpose(1, 2).squeeze_dim(0);
    let v = Tensor::rand([16], (Kind::Float, Device::Cpu));
    let idx: Vec<i64> = region.iter().map(|&(r, c)| r * GRID + c).collect();
    let y = tokens.index_select(0, &Tensor::from_slice(&idx)).matmul(&v).pow_tensor_scalar(2).sum(Kind::Float);
    let g = Tensor::run_backward(&[y], &[&tokens], false, false).pop().unwrap();
    (tokens.detach(), g)
}

fn region_mask(region: &[(i64, i64)], size: i64) -> Tensor {
    let m = Tensor::zeros([size, size], (Kind::Uint8, Device::Cpu));
    let cell = size / GRID;
    for &(r, c) in region {
        let _ = m.narrow(0, r * cell, cell).narrow(1, c * cell, cell).fill_(1);
    }
    m
}

#[test]
fn pivot_map_peaks_in_the_region_the_output_depends_on() {
    let region = [(3, 3), (3, 4), (4, 3), (4, 4), (4, 5)];
    let (_, g) = toy_tower(&region);
    let opts = GradMapOptions { size: (64, 64), ..Default::default() };
    let map = pivot_map(&g, (GRID, GRID), &opts).unwrap();
    assert_eq!(map.size(), vec![64, 64]);
    assert!(map.min().double_value(&[]) >= 0.0 && map.max().double_value(&[]) <= 1.0 + 1e-6);
    let mask = region_mask(&region, 64);
    let e = energy_in_mask(&map, &mask).unwrap();
    println!("PIVOT map energy in region {e:.3} (area {:.3})", 5.0 / 64.0);
    assert!(e > 0.6, "energy in region {e}");
    assert!(pointing_game(&map, &mask, 0).unwrap());
    // At token resolution the map is exactly zero outside the region.
    let tok = pivot_map(&g, (GRID, GRID), &GradMapOptions { size: (GRID, GRID), ..opts }).unwrap();
    assert_eq!(energy_in_mask(&tok, &region_mask(&region, GRID)).unwrap(), 1.0);
    // Same seed → same map; L2 norm also peaks in the region.
    assert!(pivot_map(&g, (GRID, GRID), &opts).unwrap().equal(&map));
    let l2 = pivot_map(&g, (GRID, GRID), &GradMapOptions { norm: TokenNorm::L2, ..opts }).unwrap();
    assert!(pointing_game(&l2, &mask, 0).unwrap());
    assert!(pivot_map(&g, (4, 4), &opts).is_err());
}

#[test]
fn grad_cam_peaks_in_the_region() {
    let region = [(1, 5), (2, 5), (2, 6)];
    let (tokens, g) = toy_tower(&region);
    // Prepend a CLS-like prefix token that must be ignored.
    let acts = Tensor::cat(&[Tensor::full([1, 16], 100.0, (Kind::Float, Device::Cpu)), tokens], 0);
    let grads = Tensor::cat(&[Tensor::full([1, 16], -100.0, (Kind::Float, Device::Cpu)), g], 0);
    let cam = grad_cam(&acts, &grads, 1, (GRID, GRID), (64, 64)).unwrap();
    let mask = region_mask(&region, 64);
    let e = energy_in_mask(&cam, &mask).unwrap();
    println!("Grad-CAM energy in region {e:.3} (area {:.3})", 3.0 / 64.0);
    assert!(e > 0.3, "{e}");
    assert!(pointing_game(&cam, &mask, 0).unwrap());
    // Normalised at token resolution (bilinear resizing then only lowers the peak slightly).
    let tok = grad_cam(&acts, &grads, 1, (GRID, GRID), (GRID, GRID)).unwrap();
    assert!((tok.max().double_value(&[]) - 1.0).abs() < 1e-5 && tok.min().double_value(&[]) == 0.0);
    assert!(grad_cam(&acts, &grads, 0, (GRID, GRID), (64, 64)).is_err());
}

#[test]
fn border_fix_copies_inner_cells() {
    let m = Tensor::arange(36, (Kind::Float, Device::Cpu)).view([6, 6]);
    let f = border_fix(&m, 7);
    // Interior untouched.
    assert!(f.narrow(0, 1, 4).narrow(1, 1, 4).equal(&m.narrow(0, 1, 4).narrow(1, 1, 4)));
    // Top-row cells come from rows 1 or 2 of the same column (for the non-corner columns).
    for j in 1..5 {
        let v = f.double_value(&[0, j]);
        assert!(v == m.double_value(&[1, j]) || v == m.double_value(&[2, j]), "top[{j}] = {v}");
        let v = f.double_value(&[5, j]);
        assert!(v == m.double_value(&[4, j]) || v == m.double_value(&[3, j]), "bottom[{j}] = {v}");
    }
    for i in 0..6 {
        let v = f.double_value(&[i, 0]);
        assert!(v == f.double_value(&[i, 1]) || v == f.double_value(&[i, 2]));
    }
    assert!(border_fix(&m, 7).equal(&f));
    // A large border artefact disappears.
    let spiky = m.copy();
    let _ = spiky.narrow(0, 0, 1).fill_(1e6);
    assert!(border_fix(&spiky, 0).max().double_value(&[]) < 100.0);
}

#[test]
fn localisation_score_perfect_and_uniform() {
    let mask = region_mask(&[(0, 0), (3, 3)], 32); // 2 of 64 cells → area 1/32
    let perfect = mask.to_kind(Kind::Float);
    let uniform = Tensor::ones([32, 32], (Kind::Float, Device::Cpu));
    let s = localisation(&[perfect.shallow_clone(), perfect], &[mask.shallow_clone(), mask.shallow_clone()]).unwrap();
    assert_eq!((s.energy, s.pointing, s.n), (1.0, 1.0, 2));
    assert!((s.chance - 1.0 / 32.0).abs() < 1e-12);
    let u = localisation(&[uniform], &[mask]).unwrap();
    assert!((u.energy - 1.0 / 32.0).abs() < 1e-9, "uniform map scores chance: {}", u.energy);
    assert!((u.energy - u.chance).abs() < 1e-9);
}

#[test]
fn overlay_and_colormap() {
    assert_eq!(jet(0.0), [0, 0, 128]);
    assert_eq!(jet(1.0), [128, 0, 0]);
    assert_eq!(jet(0.5)[1], 255);
    let img = image::RgbImage::from_pixel(40, 30, image::Rgb([200, 100, 50]));
    let map = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    let o = overlay(&img, &map);
    assert_eq!(o.dimensions(), (40, 30));
    // 0.6·jet(0) + 0.4·0.7·pixel.
    let p = o.get_pixel(5, 5).0;
    assert_eq!(p, [(0.4f64 * 0.7 * 200.0).round() as u8, (0.4f64 * 0.7 * 100.0).round() as u8, (0.6f64 * 128.0 + 0.4 * 0.7 * 50.0).round() as u8]);
    let t = Tensor::ones([3, 8, 6], (Kind::Float, Device::Cpu)) * 0.5;
    let im = tensor_to_rgb(&t).unwrap();
    assert_eq!(im.dimensions(), (6, 8));
    assert_eq!(im.get_pixel(0, 0).0, [128, 128, 128]);
}
