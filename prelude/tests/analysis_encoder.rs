//! Gradient maps on a whole MLLM, localisation scores, and Platonic alignment of encoders.

use pivot::prelude::*;

fn world() -> ShapesWorld {
    ShapesWorld::new(ShapesConfig::default())
}

fn tiny_mllm(seed: i64) -> Mllm {
    tch::manual_seed(seed);
    Mllm::tiny(Device::Cpu)
}

fn check_map(r: &GradMapResult, grid: i64, size: i64) {
    assert_eq!(r.token_map.size(), vec![grid, grid]);
    assert_eq!(r.map.size(), vec![size, size]);
    for m in [&r.token_map, &r.map] {
        assert!(m.isfinite().all().int64_value(&[]) == 1, "map must be finite");
        let (lo, hi) = (m.min().double_value(&[]), m.max().double_value(&[]));
        assert!(lo >= 0.0 && hi <= 1.0 + 1e-6, "map in [0, 1], got [{lo}, {hi}]");
    }
    assert!((r.token_map.max().double_value(&[]) - 1.0).abs() < 1e-5, "min-max normalised");
    assert!(r.loss.is_finite());
    assert_eq!(r.overlay.dimensions(), (size as u32, size as u32));
    assert_eq!(r.image.dimensions(), (size as u32, size as u32));
}

#[test]
fn pivot_and_grad_cam_maps_on_the_tiny_mllm() {
    let mllm = tiny_mllm(0);
    let prefs = world().preferences(Split::Val, 2);
    let sft = GradMap::pivot(&mllm, &prefs[0], Objective::Sft).unwrap();
    check_map(&sft, 8, 64);
    let dpo = GradMap::pivot(&mllm, &prefs[0], Objective::dpo(0.1)).unwrap();
    check_map(&dpo, 8, 64);
    assert!((dpo.loss - std::f64::consts::LN_2).abs() < 1e-4, "policy as reference: z = 0, loss = ln 2, got {}", dpo.loss);
    // With the policy as reference, DPO's gradient on the chosen copy is σ(−βz)·β·∇ log π(chosen), a
    // scalar times SFT's (sum vs mean of the same token log-probs): after min-max the maps coincide.
    // PIVOT's chosen-copy map tells SFT from DPO only through the weights training produced. The
    // shared-encoding gradient (chosen + rejected) does differ.
    assert!(dpo.token_map.allclose(&sft.token_map, 1e-3, 1e-3, false), "chosen-copy DPO map ∝ SFT map at z = 0");
    let sum = GradMap::default().dpo_copy(DpoCopy::Sum).compute(&mllm, &prefs[0], Objective::dpo(0.1)).unwrap();
    assert!(!sum.token_map.allclose(&sft.token_map, 1e-3, 1e-3, false), "the rejected answer moves the shared map");

    // With a separate reference model and each DPO copy.
    let reference = tiny_mllm(1);
    for copy in [DpoCopy::Chosen, DpoCopy::Rejected, DpoCopy::Sum] {
        let r = GradMap::default().dpo_copy(copy).compute(&mllm, &prefs[1], Objective::dpo_with_reference(0.1, &reference)).unwrap();
        check_map(&r, 8, 64);
    }
    // A custom output size and PIVOT's options.
    let big = GradMap::default().size(96, 96).compute(&mllm, &prefs[0], Objective::Sft).unwrap();
    assert_eq!(big.map.size(), vec![96, 96]);
    assert_eq!(big.overlay.dimensions(), (64, 64), "the overlay is drawn on the image the tower saw");

    // Grad-CAM on a tower layer below the one the projector reads; above it is an error.
    let cam = GradMap::grad_cam(&mllm, &prefs[0], Objective::Sft, 2).unwrap();
    assert_eq!(cam.token_map.size(), vec![8, 8]);
    assert!(cam.map.isfinite().all().int64_value(&[]) == 1);
    assert!(cam.method.contains("layer 2"));
    let cam_dpo = GradMap::grad_cam(&mllm, &prefs[0], Objective::dpo(0.1), -2).unwrap();
    assert_eq!(cam_dpo.map.size(), vec![64, 64]);
    assert!(GradMap::grad_cam(&mllm, &prefs[0], Objective::Sft, -1).is_err());

    // A VQA sample has no rejected answer: SFT works, DPO says what is missing.
    let vqa = world().vqa(Split::Val, 1);
    assert!(GradMap::pivot(&mllm, &vqa[0], Objective::Sft).is_ok());
    let err = GradMap::pivot(&mllm, &vqa[0], Objective::dpo(0.1)).unwrap_err().to_string();
    assert!(err.contains("rejected"), "{err}");

    // The model is untouched: no parameter received a gradient.
    for vs in [mllm.tower.var_store(), mllm.projector.var_store(), mllm.lm.var_store()] {
        for (name, t) in vs.variables() {
            assert!(!t.grad().defined(), "{name} has a gradient");
        }
    }
    // Shows itself: text plus a decodable PNG of image | map | overlay.
    let fig = sft.figure().unwrap().to_image().unwrap();
    assert!(fig.width() >= 3 * 64);
    assert!(sft.mime_bundle().plain_text().contains("pivot"));
}

/// Tower made position-only: blocks are identities (all weights 0) and the patch embedding is 0,
/// so token j = position embedding j. Tokens outside `region` get a huge embedding, so every
/// RMSNorm the LM applies to them divides their influence by ~1000: the loss depends (up to 1e-3)
/// only on the region's tokens, and the map must peak there.
fn region_mllm(region: &[(i64, i64)]) -> Mllm {
    let mut mllm = tiny_mllm(3);
    tch::no_grad(|| {
        let vars = mllm.tower.var_store_mut().variables();
        for (name, t) in &vars {
            if name.starts_with("vision_model.encoder.") || name.starts_with("vision_model.embeddings.patch_embedding") {
                let _ = t.shallow_clone().zero_();
            }
        }
        let pos = &vars["vision_model.embeddings.position_embedding.weight"];
        let huge = Tensor::randn(pos.size(), (Kind::Float, Device::Cpu)) * 1000.0;
        pos.shallow_clone().copy_(&huge);
        for &(r, c) in region {
            pos.get(r * 8 + c).copy_(&(Tensor::randn([96], (Kind::Float, Device::Cpu)) * 0.5));
        }
    });
    mllm
}

#[test]
fn pivot_map_peaks_where_the_loss_depends_on_the_image() {
    let region = [(3, 3), (3, 4), (4, 3), (4, 4), (4, 5)];
    let mllm = region_mllm(&region);
    let mask = Tensor::zeros([8, 8], (Kind::Uint8, Device::Cpu));
    for &(r, c) in &region {
        let _ = mask.get(r).get(c).fill_(1);
    }
    let big_mask = mask.view([1, 1, 8, 8]).upsample_nearest2d([64, 64], None, None).view([64, 64]);
    let prefs = world().preferences(Split::Val, 3);
    for p in prefs.iter() {
        for obj in [Objective::Sft, Objective::dpo(0.1)] {
            let r = GradMap::pivot(&mllm, p, obj).unwrap();
            let e = energy_in_mask(&r.token_map, &mask).unwrap();
            let (pr, pc) = r.peak();
            println!("{:?}: energy in region {e:.4}, peak ({pr}, {pc})", obj);
            assert!(e > 0.95, "{obj:?}: energy in region {e}");
            assert!(region.contains(&(pr, pc)), "{obj:?}: peak ({pr}, {pc}) outside the region");
            assert!(pointing_game(&r.map, &big_mask, 0).unwrap());
        }
    }
}

#[test]
fn localisation_scores_over_a_world_set() {
    let w = world();
    let set = shapes_localisation_set(&w, Split::Val, 6, MaskTarget::AnswerObjects);
    let all = shapes_localisation_set(&w, Split::Val, 6, MaskTarget::AllObjects);
    let main = shapes_localisation_set(&w, Split::Val, 6, MaskTarget::MainObject);
    assert_eq!(set.len(), 6);
    for ((a, b), m) in set.iter().zip(&all).zip(&main) {
        let count = |g: &image::GrayImage| g.pixels().filter(|p| p.0[0] != 0).count();
        assert!(count(&a.mask) > 0 && count(&a.mask) <= count(&b.mask));
        assert!(count(&m.mask) > 0 && count(&m.mask) <= count(&b.mask));
        assert!(a.mask.pixels().zip(b.mask.pixels()).all(|(x, y)| x.0[0] <= y.0[0]), "answer objects ⊆ all objects");
    }
    // A colour or shape question names exactly one object.
    let prefs = w.preferences(Split::Val, 6);
    let named = prefs.iter().zip(&set).zip(&all).find(|((p, _), _)| p.category == "colour" || p.category == "shape");
    if let Some(((_, a), b)) = named {
        let count = |g: &image::GrayImage| g.pixels().filter(|p| p.0[0] != 0).count();
        assert!(count(&a.mask) <= count(&b.mask));
    }

    let mllm = tiny_mllm(4);
    for obj in [Objective::Sft, Objective::dpo(0.1)] {
        let s = localisation_score(&mllm, &set, obj).unwrap();
        println!("{obj:?}: {s}");
        assert_eq!(s.n, 6);
        assert!((0.0..=1.0).contains(&s.energy) && (0.0..=1.0).contains(&s.pointing));
        assert!(s.chance > 0.0 && s.chance < 1.0);
    }
    let row = localisation_row(&GradMap::new(MapMethod::GradCam { layer: -2 }), &mllm, &set[..2], Objective::Sft).unwrap();
    assert_eq!(row.score.n, 2);
    let runs = Runs::from([&row]);
    assert!(runs.df().column("energy_in_mask").is_ok());

    // The constructed model localises its region perfectly when the region is the mask.
    let region = [(3, 3), (3, 4), (4, 3), (4, 4)];
    let model = region_mllm(&region);
    let mask = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([region.contains(&((y / 8) as i64, (x / 8) as i64)) as u8]));
    let samples: Vec<LocalisationSample> = set.iter().map(|s| LocalisationSample { input: s.input.clone(), mask: mask.clone() }).collect();
    let s = localisation_score(&model, &samples[..3], Objective::Sft).unwrap();
    // Token-level energy is ~1; bilinear upsampling spreads some of it across the region's edge.
    assert!(s.energy > 0.7 && s.pointing == 1.0, "{s}");
    assert!((s.chance - 4.0 / 64.0).abs() < 1e-9);
}

fn shuffle(n: usize, seed: u64) -> Tensor {
    let mut v: Vec<i64> = (0..n as i64).collect();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, ((s >> 33) as usize) % (i + 1));
    }
    Tensor::from_slice(&v)
}

#[test]
fn platonic_alignment_of_encoders() {
    let dir = std::env::temp_dir().join(format!("pivot-test-align-{}", std::process::id()));
    let ex = FeatureExtractor::default().cache_dir(&dir).quiet();
    let w = world();
    let pairs = w.image_text_pairs(Split::Val, 48);
    let mllm = tiny_mllm(5);
    let enc = mllm.encoder();

    // An encoder against itself: identical neighbourhoods on the diagonal.
    let al = Alignment::mutual_knn(5).extractor(ex.clone());
    let same = al.score_encoders(&enc, &enc, &pairs).unwrap();
    assert_eq!((same.scores.len(), same.scores[0].len()), (5, 5));
    assert!(same.best > 0.999, "self-alignment {}", same.best);
    for i in 0..5 {
        assert!(same.scores[i][i] > 0.999);
    }
    // Shuffling the pairing destroys it.
    let v = al.vision_features(&enc, &pairs).unwrap();
    assert_eq!(v.size(), vec![48, 5, 96]);
    // Seeded Fisher–Yates shuffles of our own: the tests of this file share libtorch's global RNG
    // across threads, so randperm would not be reproducible.
    let perms: Vec<Tensor> = (1..=5u64).map(|seed| shuffle(48, seed)).collect();
    let perm = &perms[0];
    let shuffled = al.score_features(&v, &v.index_select(0, perm)).unwrap();
    println!("self {:.3} vs shuffled {:.3}", same.best, shuffled.best);
    assert!(shuffled.best < 0.5 * same.best);

    // Vision layers × LM hidden states on image-caption pairs.
    let t = language_features(&mllm.lm, &pairs.samples.iter().map(|s| s.caption.as_str()).collect::<Vec<_>>(), 7).unwrap();
    assert_eq!(t.size(), vec![48, 5, 128]);
    // Batching (and hence padding) does not change the per-caption means.
    let t1 = language_features(&mllm.lm, &[pairs[3].caption.as_str()], 1).unwrap();
    assert!(t1.get(0).allclose(&t.get(3), 1e-4, 1e-5, false));
    let grid = al.score(&enc, &mllm.lm, &pairs).unwrap();
    assert_eq!((grid.scores.len(), grid.scores[0].len()), (5, 5));
    assert!(grid.best > 0.0 && grid.best <= 1.0);
    let flat: Vec<f64> = grid.scores.iter().flatten().copied().collect();
    assert_eq!(grid.best, flat.iter().cloned().fold(f64::MIN, f64::max));
    assert_eq!(grid.scores[grid.argmax.0][grid.argmax.1], grid.best);
    let tv = al.score_features(&v, &t).unwrap();
    assert!((tv.best - grid.best).abs() < 1e-12);

    // Image–caption pairs whose two sides share a neighbourhood structure by construction: solid
    // colour images captioned with the colour's name. Aligned pairs agree on their neighbours; a
    // shuffled pairing does not.
    let colours = [Colour::Red, Colour::Blue, Colour::Green, Colour::Yellow, Colour::Purple, Colour::Cyan];
    let samples: Vec<CaptionSample> = (0..48)
        .map(|i| {
            let c = colours[i % 6];
            let img = image::RgbImage::from_fn(64, 64, |x, y| {
                image::Rgb(c.rgb().map(|v| (v as i32 + ((x * 7 + y * 13 + i as u32) % 9) as i32 - 4).clamp(0, 255) as u8))
            });
            CaptionSample { image: ImageSource::from(img), caption: c.name().to_string() }
        })
        .collect();
    let cpairs = CaptionDataset::new(samples);
    let aligned = al.score(&enc, &mllm.lm, &cpairs).unwrap();
    let cv = al.vision_features(&enc, &cpairs).unwrap();
    let ct = language_features(&mllm.lm, &cpairs.samples.iter().map(|s| s.caption.as_str()).collect::<Vec<_>>(), 16).unwrap();
    let shuffled: Vec<f64> = perms.iter().map(|p| al.score_features(&cv, &ct.index_select(0, p)).unwrap().best).collect();
    println!("colour pairs: aligned {:.3} vs shuffled {shuffled:.3?}", aligned.best);
    assert!(aligned.best > 0.5, "aligned {}", aligned.best);
    assert!(shuffled.iter().all(|&s| s < aligned.best - 0.2), "aligned {} vs shuffled {shuffled:?}", aligned.best);
    for a in [Alignment::cka(), Alignment::unbiased_cka(), Alignment::cknna(5)] {
        let g = a.extractor(ex.clone()).score_features(&v, &t).unwrap();
        assert!(g.best.is_finite());
    }
    let png = grid.heatmap().unwrap().to_image().unwrap();
    assert!(png.width() > 100);
    assert!(Alignment::mutual_knn(60).score(&enc, &mllm.lm, &pairs).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
