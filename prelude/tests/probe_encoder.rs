//! Probes on encoders: feature cache, linear probes and segmentation probes end to end on the
//! embedded world with the tiny tower.

use image::{GrayImage, RgbImage};
use pivot::prelude::*;
use std::path::PathBuf;

fn temp_dir(name: &str) -> PathBuf {
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let d = std::env::temp_dir().join(format!("pivot-test-{name}-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_encoder(seed: i64, stage: Stage) -> VisionEncoder {
    tch::manual_seed(seed);
    let tower = VisionTower::new(VisionConfig::tiny(), Device::Cpu).frozen();
    VisionEncoder::new(tower, Provenance::new(stage, "tiny", "tiny-lm"), FeatureSelect::penultimate())
}

fn extractor(dir: &PathBuf) -> FeatureExtractor {
    FeatureExtractor::default().cache_dir(dir).batch_size(16).quiet()
}

#[test]
fn feature_cache_hits_and_is_invalidated_by_a_weight_change() {
    let dir = temp_dir("cache");
    let world = ShapesWorld::new(ShapesConfig::default());
    let data = world.classification(Split::Train, 40);
    let enc = tiny_encoder(0, Stage::Random);
    let ex = extractor(&dir);

    let first = ex.extract(&enc, &data, -2, Pooling::MeanPatch).unwrap();
    assert!(!first.from_cache);
    assert_eq!(first.x.size(), vec![40, 96]);
    assert_eq!(first.layer, Some(3));
    let path = first.cache_path.clone().unwrap();
    assert!(path.is_file());
    // Batching does not change the numbers: one batch of 40 equals batches of 16.
    let direct = enc.features(&enc.tower().processor().preprocess(&(0..40).map(|i| data[i].image.load().unwrap()).collect::<Vec<_>>()).unwrap(), -2, Pooling::MeanPatch).unwrap();
    assert!(first.x.allclose(&direct, 1e-5, 1e-6, false));

    let again = ex.extract(&enc, &data, 3, Pooling::MeanPatch).unwrap(); // −2 and 3 are the same layer
    assert!(again.from_cache);
    assert_eq!(again.cache_path.as_ref(), Some(&path));
    assert!(again.x.equal(&first.x), "a cache hit returns identical tensors");

    // Same weights in a fresh store, same provenance → same entry.
    let copy = enc.clone();
    assert!(ex.extract(&copy, &data, -2, Pooling::MeanPatch).unwrap().from_cache);
    // Another layer, pooling or data set → another entry.
    assert!(!ex.extract(&enc, &data, -1, Pooling::MeanPatch).unwrap().from_cache);
    assert!(!ex.extract(&enc, &data, -2, Pooling::PatchTokens).unwrap().from_cache);
    assert!(!ex.extract(&enc, &data.take(39), -2, Pooling::MeanPatch).unwrap().from_cache);

    // Equal provenance, one weight changed: the cache must miss and the features must change.
    let mut changed = enc.clone().into_tower();
    tch::no_grad(|| {
        let vars = changed.var_store_mut().variables();
        let w = &vars["vision_model.embeddings.patch_embedding.weight"];
        let _ = w.get(0).get(0).get(0).get(0).f_add_scalar_(0.5).unwrap();
    });
    let changed = VisionEncoder::new(changed, enc.provenance().clone(), enc.select());
    assert_eq!(changed.label(), enc.label());
    let c = ex.extract(&changed, &data, -2, Pooling::MeanPatch).unwrap();
    assert!(!c.from_cache, "a changed tower weight must invalidate the cache");
    assert_ne!(c.cache_path, first.cache_path);
    assert!(!c.x.allclose(&first.x, 1e-6, 1e-7, false));

    // All-layer features: [N, L+1, D], consistent with single-layer extraction.
    let all = ex.extract_all_layers(&enc, &data, Pooling::MeanPatch).unwrap();
    assert_eq!(all.x.size(), vec![40, 5, 96]);
    assert!(all.x.select(1, 3).allclose(&first.x, 1e-5, 1e-6, false));
    assert!(ex.extract_all_layers(&enc, &data, Pooling::Tokens).is_err());

    // Atomic writes leave no temporary files behind.
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(name.ends_with(".safetensors"), "stray file {name}");
    }
    // The cache off never writes.
    let off = FeatureExtractor::default().no_cache().quiet().extract(&enc, &data, -2, Pooling::MeanPatch).unwrap();
    assert!(!off.from_cache && off.cache_path.is_none() && off.x.equal(&first.x));
    std::fs::remove_dir_all(&dir).ok();
}

/// Solid colours per class, with small pixel noise: any injective-enough tower separates them.
fn colour_classes(n: usize, seed: u64) -> ClassificationDataset {
    let names: Vec<String> = (0..12).map(|k| format!("c{k}")).collect();
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let samples = (0..n)
        .map(|i| {
            let k = i % 12;
            let base = [(k * 20) as u8, (255 - k * 17) as u8, ((k * 53) % 256) as u8];
            let img = RgbImage::from_fn(64, 64, |_, _| {
                image::Rgb(base.map(|c| (c as i32 + (next() % 5) as i32 - 2).clamp(0, 255) as u8))
            });
            ClassSample { image: ImageSource::from(img), label: k }
        })
        .collect();
    ClassificationDataset::new(samples, names)
}

#[test]
fn linear_probe_on_an_encoder_end_to_end() {
    let dir = temp_dir("linear");
    let world = ShapesWorld::new(ShapesConfig::default());
    let (train, val) = (world.classification(Split::Train, 240), world.classification(Split::Val, 60));
    let enc = tiny_encoder(1, Stage::Custom("random".into()));
    let spec = FeatureSpec::default().extractor(extractor(&dir));
    let t0 = std::time::Instant::now();
    // A coarse C grid keeps the test fast; the CLIP binary search is covered by the core tests.
    let probe = LinearProbe {
        search: CSearch::Grid(vec![0.01, 0.1, 1.0]),
        lbfgs: LbfgsOptions { max_iter: 150, max_eval: 300, ..Default::default() },
        ..Default::default()
    };
    let lp = probe.clone().on(spec.clone()).fit(&enc, &train, &val).unwrap();
    println!("logreg on world: {:.1}s", t0.elapsed().as_secs_f64());
    println!("{lp}");
    assert_eq!((lp.n_train, lp.n_val), (240, 60));
    assert_eq!(lp.layer, Some(3), "default layer = the layer the MLLM consumed (−2)");
    assert_eq!(lp.pooling, Pooling::MeanPatch, "SigLIP default pooling");
    assert_eq!(lp.num_features, 96);
    assert_eq!(lp.class_names, world.class_names());
    assert!(lp.top1 > 1.5 / 12.0, "random tower features still beat chance: top-1 {}", lp.top1);
    assert_eq!(lp.encoder(), enc.label());

    // A data set whose images encode the label: the probe must be (near) perfect.
    let (ctr, cva) = (colour_classes(120, 1), colour_classes(48, 2));
    let t0 = std::time::Instant::now();
    let perfect = probe.clone().on(spec.clone()).fit(&enc, &ctr, &cva).unwrap();
    println!("logreg on colours: {:.1}s", t0.elapsed().as_secs_f64());
    let t0 = std::time::Instant::now();
    assert!(perfect.top1 > 0.99, "top-1 {}", perfect.top1);
    let sgd = SgdLinearProbe { epochs: 60, batch_size: 32, ..Default::default() }.on(spec.clone()).fit(&enc, &ctr, &cva).unwrap();
    assert_eq!(sgd.method, "sgd-linear");
    assert_eq!((sgd.n_train, sgd.n_val), (120, 48));
    assert!(sgd.top1 > 0.9, "SGD top-1 {}", sgd.top1);
    println!("sgd: {:.1}s", t0.elapsed().as_secs_f64());

    // Explicit layer/pooling; token pooling is refused with a clear error.
    let l1 = LinearProbe::default().with_c(1.0).on(spec.clone().layer(1)).fit(&enc, &ctr, &cva).unwrap();
    assert_eq!(l1.layer, Some(1));
    assert!(LinearProbe::default().on(spec.clone().pooling(Pooling::PatchTokens)).fit(&enc, &ctr, &cva).is_err());
    assert!(LinearProbe::default().on(spec.clone().pooling(Pooling::ClassToken)).fit(&enc, &ctr, &cva).is_err());
    assert!(LinearProbe::default().on(spec.clone()).fit(&enc, &ctr, &cva.take(0)).is_err());

    // Runs rows keyed by provenance.
    let runs = Runs::from([&lp, &perfect]);
    assert_eq!(runs.len(), 2);
    let enc_col = runs.df().column("encoder").unwrap();
    assert_eq!(enc_col.str().unwrap().get(0), Some(enc.label().as_str()));
    assert!(runs.df().column("top1").is_ok());
    let bundle = lp.mime_bundle();
    assert!(bundle.plain_text().contains("top-1") && bundle.plain_text().contains(&enc.label()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn seg_probes_on_an_encoder_end_to_end() {
    let dir = temp_dir("seg");
    // 96-pixel images: masks must be resized (nearest) to the tower's 64.
    let world = ShapesWorld::new(ShapesConfig::default().image_size(96));
    let (mut train, mut val) = (world.segmentation(Split::Train, 48), world.segmentation(Split::Val, 12));
    // Mark a band of pixels as ignored in every mask: it must drop out of training and metrics.
    for s in train.samples.iter_mut().chain(val.samples.iter_mut()) {
        for y in 0..6 {
            for x in 0..96 {
                s.mask.put_pixel(x, y, image::Luma([255]));
            }
        }
    }
    let enc = tiny_encoder(2, Stage::Random);
    let proc = enc.tower().processor();
    let m = mask_tensor(&val, &proc).unwrap();
    assert_eq!(m.size(), vec![12, 64, 64]);
    let ids: Vec<u8> = Vec::try_from(&m.reshape([-1])).unwrap();
    assert!(ids.iter().all(|&v| v <= 6 || v == 255), "nearest resizing keeps class ids");
    let small = preprocess_mask(&GrayImage::from_fn(96, 96, |x, _| image::Luma([(x / 48) as u8])), &proc);
    assert_eq!(small.dimensions(), (64, 64));
    assert_eq!((small.get_pixel(0, 0).0[0], small.get_pixel(63, 0).0[0]), (0, 1));

    let mut dense = SegProbe::dense().extractor(extractor(&dir)).show(3);
    if let SegMethod::Dense(d) = &mut dense.method {
        d.epochs = 4;
        d.warmup_steps = 2;
    }
    let r = dense.fit(&enc, &train, &val).unwrap();
    println!("{r}");
    let SegResult::Dense(d) = &r.result else { panic!("dense result expected") };
    assert_eq!((d.n_train, d.n_val), (48, 12));
    assert!(d.miou.is_finite() && d.miou > 0.0 && d.miou <= 1.0);
    assert!(d.pixel_accuracy > 0.0 && d.pixel_accuracy <= 1.0);
    assert_eq!(d.iou_per_class.len(), 7);
    let valid = ids.iter().filter(|&&v| v != 255).count() as u64;
    assert_eq!(d.confusion.counts.iter().sum::<u64>(), valid, "ignored pixels are not scored");
    assert_eq!(r.layer, 3);
    let fig = r.figure.as_ref().expect("prediction vs truth picture").to_image().unwrap();
    assert!(fig.width() >= 3 * 64 && fig.height() >= 3 * 64);
    assert!(r.mime_bundle().plain_text().contains("mIoU"));

    let mut patch = SegProbe::patch_seg().extractor(extractor(&dir));
    if let SegMethod::PatchSeg(p) = &mut patch.method {
        p.epochs = 2;
        p.warmup_steps = 2;
        p.head = SegHead::Linear;
    }
    let r = patch.fit(&enc, &train, &val).unwrap();
    let SegResult::PatchSeg(p) = &r.result else { panic!("patch-seg result expected") };
    assert_eq!((p.n_train, p.n_val, p.num_classes), (48, 12, 7));
    assert!(p.best.macro_recall.is_finite() && p.best.micro_accuracy.is_finite());
    assert_eq!(p.epochs.len(), 2);
    let runs = Runs::from([&r]);
    assert!(runs.df().column("macro_recall").is_ok());
    std::fs::remove_dir_all(&dir).ok();
}
