//! Bad input from the disk or the caller is a clear error (or a counted skip), never a crash, a
//! silently wrong result or an abort mid-run: invalid UTF-8 in JSON/JSONL, truncated and corrupt
//! images, out-of-range segmentation mask ids, invalid optimiser and probe hyper-parameters,
//! non-finite updates and features. Ends with a seeded mutation fuzz of the JSON/JSONL readers.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use pivot::prelude::*;
use rand::{Rng, SeedableRng};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hardening_input").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_png(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(6, 4, |x, y| Rgb([7, x as u8 * 10, y as u8 * 20])).save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// A JPEG large enough that its entropy-coded scan is most of the file.
fn write_noisy_jpeg(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    RgbImage::from_fn(64, 48, |_, _| Rgb([rng.random(), rng.random(), rng.random()]))
        .save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

fn truncate(path: &Path, fraction: f64) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new().write(true).open(path).unwrap().set_len((len as f64 * fraction) as u64).unwrap();
}

fn record(err: PivotError) -> (usize, String, String) {
    match err {
        PivotError::Record { line, field, message, .. } => (line, field, message),
        other => panic!("expected a Record error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- loaders: UTF-8

#[test]
fn invalid_utf8_names_file_and_line_and_is_skipped_under_skip() {
    let dir = scratch("utf8");
    for name in ["a.png", "b.png", "c.png"] {
        write_png(&dir.join(name));
    }
    // JSONL: line 2 holds a Latin-1 é (0xE9), invalid in UTF-8.
    let jsonl = dir.join("captions.jsonl");
    let mut bytes = b"{\"image\": \"a.png\", \"caption\": \"one\"}\n".to_vec();
    bytes.extend_from_slice(b"{\"image\": \"b.png\", \"caption\": \"caf\xE9\"}\n");
    bytes.extend_from_slice(b"{\"image\": \"c.png\", \"caption\": \"three\"}\n");
    fs::write(&jsonl, &bytes).unwrap();

    let err = CaptionDataset::from_jsonl(&jsonl, &dir).unwrap_err();
    assert!(err.to_string().contains("captions.jsonl"), "{err}");
    let (line, field, message) = record(err);
    assert_eq!((line, field.as_str()), (2, "json"), "{message}");
    assert!(message.contains("UTF-8") && message.contains("0xe9"), "{message}");

    let lax = CaptionDataset::from_jsonl_with(&jsonl, &dir, LoadOptions::skipping()).unwrap();
    assert_eq!(lax.samples.iter().map(|s| s.caption.as_str()).collect::<Vec<_>>(), ["one", "three"]);
    assert_eq!(lax.skipped.count, 1);
    assert_eq!(lax.skipped.reasons[0].line, Some(2));

    // A JSON list: the bad byte sits on line 6, inside the second record (which starts on line 4).
    let list = dir.join("llava.json");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"[\n{\"image\": \"a.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]},\n");
    bytes.extend_from_slice(b"\n{\"image\": \"b.png\",\n \"conversations\": [{\"from\": \"human\", \"value\": \"q\"},\n {\"from\": \"gpt\", \"value\": \"\xFF\"}]},\n");
    bytes.extend_from_slice(b"{\"image\": \"c.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"q2\"}, {\"from\": \"gpt\", \"value\": \"a2\"}]}\n]\n");
    fs::write(&list, &bytes).unwrap();
    let (line, _, message) = record(VqaDataset::from_llava_json(&list, &dir).unwrap_err());
    assert_eq!(line, 6, "{message}");
    let lax = VqaDataset::from_llava_json_with(&list, &dir, LoadOptions::skipping()).unwrap();
    assert_eq!(lax.samples.iter().map(|s| s.answer.as_str()).collect::<Vec<_>>(), ["a", "a2"]);
    assert_eq!(lax.skipped.count, 1);
}

// ---------------------------------------------------------------- loaders: images

#[test]
fn truncated_images_fail_the_load_check_instead_of_the_run() {
    let dir = scratch("truncated");
    write_png(&dir.join("ok.png"));
    write_noisy_jpeg(&dir.join("cut.jpg"));
    truncate(&dir.join("cut.jpg"), 0.6);
    write_noisy_jpeg(&dir.join("whole.jpg"));
    // The premise: the header of the cut JPEG still reads.
    assert_eq!(image::image_dimensions(dir.join("cut.jpg")).unwrap(), (64, 48));

    let json = dir.join("caps.jsonl");
    fs::write(
        &json,
        "{\"image\": \"ok.png\", \"caption\": \"a\"}\n{\"image\": \"cut.jpg\", \"caption\": \"b\"}\n{\"image\": \"whole.jpg\", \"caption\": \"c\"}\n",
    )
    .unwrap();
    let (line, field, message) = record(CaptionDataset::from_jsonl(&json, &dir).unwrap_err());
    assert_eq!((line, field.as_str()), (2, "image"));
    assert!(message.contains("cut.jpg") && message.contains("truncated"), "{message}");

    let lax = CaptionDataset::from_jsonl_with(&json, &dir, LoadOptions::skipping()).unwrap();
    assert_eq!(lax.len(), 2);
    assert_eq!(lax.skipped.count, 1);
    for s in &lax {
        s.image.load().expect("every image that passed the check decodes");
    }

    // A truncated PNG in a class folder is counted too.
    let folder = dir.join("classes");
    write_png(&folder.join("cat/1.png"));
    write_png(&folder.join("cat/2.png"));
    truncate(&folder.join("cat/2.png"), 0.7);
    write_png(&folder.join("dog/1.png"));
    assert!(ImageFolder::open(&folder).is_err());
    let lax = ImageFolder::open_with(&folder, LoadOptions::skipping()).unwrap();
    assert_eq!((lax.len(), lax.skipped.count), (2, 1));
}

#[test]
fn decode_check_catches_corruption_inside_a_complete_file() {
    let dir = scratch("decode");
    let path = dir.join("x.png");
    fs::create_dir_all(&dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    RgbImage::from_fn(32, 32, |_, _| Rgb([rng.random(), rng.random(), rng.random()])).save(&path).unwrap();
    // Overwrite the middle of the compressed pixel data; header and IEND stay intact.
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0xAB);
    fs::write(&path, &bytes).unwrap();
    let json = dir.join("c.jsonl");
    fs::write(&json, "{\"image\": \"x.png\", \"caption\": \"a\"}\n").unwrap();

    assert!(CaptionDataset::from_jsonl(&json, &dir).is_ok(), "header and end are fine");
    let decode = LoadOptions::default().with_image_check(ImageCheck::Decode);
    let (line, field, message) = record(CaptionDataset::from_jsonl_with(&json, &dir, decode).unwrap_err());
    assert_eq!((line, field.as_str()), (1, "image"), "{message}");
    assert!(message.contains("x.png"), "{message}");
    let lax = CaptionDataset::from_jsonl_with(&json, &dir, decode.with_skip_policy(SkipPolicy::Skip)).unwrap();
    assert_eq!((lax.len(), lax.skipped.count), (0, 1));
}

/// `image` written to `dir/img-{i}.png`, as a file source (so training decodes it on use).
fn saved_as_file(image: &ImageSource, dir: &Path, i: usize) -> ImageSource {
    let path = dir.join(format!("img-{i}.png"));
    image.load().unwrap().save(&path).unwrap();
    ImageSource::File(path)
}

/// Overwrites the middle of a PNG's compressed pixel data; its header and IEND stay intact, so
/// the default load-time check (`ImageCheck::Header`) passes it and only decoding fails.
fn corrupt_inside(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0xAB);
    fs::write(path, &bytes).unwrap();
}

#[test]
fn a_corrupt_image_met_in_training_is_skipped_and_named_or_stops_the_run_naming_it() {
    let dir = scratch("on_use");
    let world = ShapesWorld::new(ShapesConfig::default());
    let samples: Vec<VqaSample> = world
        .vqa(Split::Train, 8)
        .samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| VqaSample { image: saved_as_file(&s.image, &dir, i), ..s })
        .collect();
    let bad = dir.join("img-3.png");
    corrupt_inside(&bad);
    let data = VqaDataset::new(samples);
    tch::manual_seed(0);
    let init = Mllm::tiny(Device::Cpu);
    // One epoch of 4 steps uses every row once, the bad one included.
    let cfg = TrainConfig::default().batch_size(2).max_steps(4).quiet();

    // Strict (the default): the run stops at the bad image with an error naming it.
    let err = SftTrainer::new(cfg.clone()).run(&mut init.clone(), &data).unwrap_err();
    assert!(matches!(&err, PivotError::File { path, .. } if path == &bad), "{err:?}");
    assert!(err.to_string().contains("img-3.png"), "{err}");

    // Skip: the run completes without that sample, counts it and names its file in the log.
    let mut m = init.clone();
    let log = SftTrainer::new(cfg.clone().bad_images(SkipPolicy::Skip)).run(&mut m, &data).unwrap();
    assert_eq!(log.len(), 4);
    assert_eq!(log.skipped.count, 1, "{:?}", log.skipped);
    assert_eq!((log.skipped.reasons[0].path.as_path(), log.skipped.reasons[0].field.as_str()), (bad.as_path(), "image"));
    assert!(log.to_text(10).contains("img-3.png"), "{}", log.to_text(10));
    assert!(log.rows.iter().all(|r| r.get("loss").is_some_and(f64::is_finite)));
    // The policy reads from a config file like the other settings (`pivot-train` uses TOML).
    let from_file: TrainConfig = serde_json::from_str(r#"{"bad_images": "skip"}"#).unwrap();
    assert_eq!(from_file.bad_images, SkipPolicy::Skip);
}

/// DPO under `Skip`: a pair whose image fails is left out of the cached reference pass and of
/// the policy pass alike (the same pairs), named in the log; a micro-batch with no pair left is
/// skipped. With lr 0 the policy stays the reference, so a step's `logps/chosen` is that of the
/// pairs it kept and its rewards are 0 only if both passes scored the same pairs.
#[test]
fn dpo_skips_a_pair_with_a_bad_image_in_the_reference_and_the_policy_pass_alike() {
    let dir = scratch("dpo_on_use");
    let world = ShapesWorld::new(ShapesConfig::default());
    let samples: Vec<PreferenceSample> = world
        .preferences(Split::Train, 8)
        .samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| PreferenceSample { image: saved_as_file(&s.image, &dir, i), image_rejected: None, ..s })
        .collect();
    let bad: Vec<PathBuf> = [3, 4, 5].iter().map(|i| dir.join(format!("img-{i}.png"))).collect();
    let intact: Vec<Vec<u8>> = bad.iter().map(|p| fs::read(p).unwrap()).collect();
    bad.iter().for_each(|p| corrupt_inside(p));
    let data = PreferenceDataset::new(samples.clone());
    tch::manual_seed(0);
    let init = Mllm::tiny(Device::Cpu);
    // In order, 2 pairs a step: step 2 keeps pair 2 only, step 3 (pairs 4 and 5) has none left.
    let train = TrainConfig { shuffle: false, ..TrainConfig::default() }.batch_size(2).max_steps(4).lr(0.0).quiet();
    for cached_reference in [true, false] {
        let what = format!("cached_reference {cached_reference}");
        let strict = DpoConfig { cached_reference, train: train.clone(), ..Default::default() };
        let err = DpoTrainer::new(strict).run(&mut init.clone(), &data).unwrap_err();
        assert!(err.to_string().contains("img-3.png"), "{what}: {err}");

        let cfg = DpoConfig { cached_reference, train: train.clone().bad_images(SkipPolicy::Skip), ..Default::default() };
        let log = DpoTrainer::new(cfg).run(&mut init.clone(), &data).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(log.len(), 4, "{what}");
        assert_eq!(log.skipped.count, 3, "{what}: {:?}", log.skipped);
        let named: Vec<&Path> = log.skipped.reasons.iter().map(|r| r.path.as_path()).collect();
        assert_eq!(named, bad.iter().map(PathBuf::as_path).collect::<Vec<_>>(), "{what}");
        assert!(log.skipped.reasons.iter().all(|r| r.field == "image"), "{what}: {:?}", log.skipped);
        assert!(log.to_text(10).contains("img-4.png"), "{what}: {}", log.to_text(10));
        // Step 3 ran no micro-batch: no loss; the others a finite one over the pairs they kept.
        assert_eq!(log.rows[2].get("loss"), None, "{what}");
        for i in [0, 1, 3] {
            assert!(log.rows[i].get("loss").is_some_and(f64::is_finite), "{what}: step {}", i + 1);
            let reward = log.rows[i].get("rewards/chosen").unwrap();
            assert!(reward.abs() < 1e-4, "{what}: step {} rewards/chosen {reward}", i + 1);
        }
        let pair_2 = reference_logps(&init, &samples[2..3], 1).unwrap().double_value(&[0, 0]);
        let step_2 = log.rows[1].get("logps/chosen").unwrap();
        assert!((step_2 - pair_2).abs() < 1e-3 * pair_2.abs().max(1.0), "{what}: step 2 logps/chosen {step_2} vs pair 2 alone {pair_2}");
    }

    // Resumed after step 2, the cached reference comes from the checkpoint, where pairs 4 and 5
    // have NaN rows: they stay out of the policy pass even once their images read again (scored
    // against a NaN reference they would stop the run with a non-finite loss).
    let ckpts = dir.join("checkpoints");
    let skip = DpoConfig { cached_reference: true, train: train.clone().bad_images(SkipPolicy::Skip), ..Default::default() };
    let saving = DpoConfig { train: skip.train.clone().checkpoints(&ckpts, 2), ..skip.clone() };
    DpoTrainer::new(saving).run(&mut init.clone(), &data).unwrap();
    bad.iter().zip(&intact).skip(1).for_each(|(p, bytes)| fs::write(p, bytes).unwrap());
    let log = DpoTrainer::new(skip).resume(&mut init.clone(), &data, ckpts.join("step-000002")).unwrap();
    assert_eq!((log.len(), log.skipped.count), (4, 3), "{:?}", log.skipped);
    assert_eq!(log.skipped.reasons[2].path, bad[2]);
    assert_eq!(log.rows[2].get("loss"), None);
    assert!(log.rows[3].get("loss").is_some_and(f64::is_finite));
}

// ---------------------------------------------------------------- segmentation mask ids

/// Tokens [n, 4, 8] on a 2×2 grid and masks [n, 4, 4] (patch 2) with ids in 0..4 and some 255.
fn seg_data(n: i64) -> (Tensor, Tensor) {
    tch::manual_seed(0);
    let masks = Tensor::randint(4, [n, 4, 4], (Kind::Uint8, Device::Cpu));
    let _ = masks.get(0).get(0).get(0).fill_(255);
    (Tensor::randn([n, 4, 8], (Kind::Float, Device::Cpu)), masks)
}

#[test]
fn both_segmentation_probes_name_the_sample_and_the_bad_mask_id() {
    let (xt, mt) = seg_data(8);
    let (xv, mv) = seg_data(4);
    let bad = mt.copy();
    let _ = bad.get(5).get(2).get(3).fill_(7);
    let patch = PatchSegProbe { epochs: 1, warmup_steps: 0, head: SegHead::Linear, ..PatchSegProbe::new(4) };
    let dense = DenseSegProbe { epochs: 1, warmup_steps: 0, ..DenseSegProbe::new(4) };
    patch.fit_tokens(&xt, &mt, &xv, &mv).expect("ids 0..4 and 255 are fine");
    dense.fit_tokens(&xt, &mt, &xv, &mv).expect("ids 0..4 and 255 are fine");

    let e = patch.fit_tokens(&xt, &bad, &xv, &mv).unwrap_err().to_string();
    assert!(e.contains("PatchSegProbe train") && e.contains("sample 5") && e.contains("mask id 7"), "{e}");
    let e = dense.fit_tokens(&xt, &mt, &xv, &bad.narrow(0, 2, 4)).unwrap_err().to_string();
    assert!(e.contains("DenseSegProbe val") && e.contains("sample 3") && e.contains("mask id 7"), "{e}");

    let e = DenseSegProbe { lr: f64::NAN, ..dense.clone() }.fit_tokens(&xt, &mt, &xv, &mv).unwrap_err();
    assert!(matches!(&e, PivotError::Config { field, .. } if field == "lr"), "{e}");
    let e = PatchSegProbe { weight_decay: -1.0, ..patch.clone() }.fit_tokens(&xt, &mt, &xv, &mv).unwrap_err();
    assert!(matches!(&e, PivotError::Config { field, .. } if field == "weight_decay"), "{e}");
}

// ---------------------------------------------------------------- optimiser

fn tiny_weights(m: &Mllm) -> Vec<Tensor> {
    [m.tower.var_store(), m.projector.var_store(), m.lm.var_store()]
        .iter()
        .flat_map(|vs| {
            let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.into_iter().map(|(_, t)| t.detach().copy())
        })
        .collect()
}

#[test]
fn adamw_refuses_invalid_hyper_parameters_before_touching_the_model() {
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 4);
    let base = TrainConfig::default().batch_size(2).max_steps(1).quiet();
    let cases: [(&str, TrainConfig); 6] = [
        ("eps", TrainConfig { eps: 0.0, ..base.clone() }),
        ("eps", TrainConfig { eps: f64::NAN, ..base.clone() }),
        ("betas.0", TrainConfig { betas: (1.0, 0.999), ..base.clone() }),
        ("betas.1", TrainConfig { betas: (0.9, -0.5), ..base.clone() }),
        ("weight_decay", TrainConfig { weight_decay: -0.1, ..base.clone() }),
        ("weight_decay", TrainConfig { weight_decay: f64::INFINITY, ..base.clone() }),
    ];
    for (expected, cfg) in cases {
        tch::manual_seed(0);
        let mut m = Mllm::tiny(Device::Cpu);
        let before = tiny_weights(&m);
        let err = SftTrainer::new(cfg).run(&mut m, &data).unwrap_err();
        assert!(matches!(&err, PivotError::Config { field, .. } if field == expected), "{expected}: {err:?}");
        for (a, b) in before.iter().zip(tiny_weights(&m)) {
            assert!(a.equal(&b), "{expected}: the model changed");
        }
    }
}

#[test]
fn an_update_that_overflows_is_reported_at_its_own_step() {
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 4);
    // Finite in f64, infinite once an fp32 weight moves by it.
    let cfg = TrainConfig { lr: 1e300, warmup_ratio: 0.0, max_grad_norm: None, ..TrainConfig::default() }
        .batch_size(2)
        .max_steps(1)
        .quiet();
    tch::manual_seed(0);
    let mut m = Mllm::tiny(Device::Cpu);
    let err = SftTrainer::new(cfg).run(&mut m, &data).unwrap_err().to_string();
    assert!(err.contains("AdamW update 1") && err.contains("non-finite"), "{err}");
}

// ---------------------------------------------------------------- SGD linear probe

fn blobs(n: i64, seed: i64) -> FeatureSet {
    tch::manual_seed(seed);
    let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
    let centres = Tensor::eye(3, (Kind::Float, Device::Cpu)) * 4.0;
    let x = centres.index_select(0, &y).constant_pad_nd([0, 5]) + Tensor::randn([n, 8], (Kind::Float, Device::Cpu)) * 0.3;
    FeatureSet::new(x, y)
}

#[test]
fn sgd_probe_checks_features_hyper_parameters_and_diverged_heads() {
    let (train, val) = (blobs(60, 1), blobs(30, 2));
    let probe = SgdLinearProbe { epochs: 3, batch_size: 16, ..SgdLinearProbe::default() };

    let nan_x = train.x.copy();
    let _ = nan_x.get(3).get(1).fill_(f64::NAN);
    let e = probe.fit_features(&FeatureSet::new(nan_x, train.y.copy()), &val).unwrap_err().to_string();
    assert!(e.contains("SgdLinearProbe train") && e.contains("row 3"), "{e}");

    for (field, bad) in [
        ("lrs", SgdLinearProbe { lrs: vec![1e-2, f64::NAN], ..probe.clone() }),
        ("lrs", SgdLinearProbe { lrs: vec![0.0], ..probe.clone() }),
        ("momentum", SgdLinearProbe { momentum: 1.0, ..probe.clone() }),
        ("weight_decay", SgdLinearProbe { weight_decay: -1e-4, ..probe.clone() }),
    ] {
        let e = bad.fit_features(&train, &val).unwrap_err();
        assert!(matches!(&e, PivotError::Config { field: f, .. } if f == field), "{field}: {e:?}");
    }

    // On unstandardised features of scale 100, a learning rate at f32's limit overflows its head's
    // weights at the first step (then NaN); that head is reported as diverged and never chosen.
    let (train, val) = (FeatureSet::new(&train.x * 100.0, train.y.copy()), FeatureSet::new(&val.x * 100.0, val.y.copy()));
    let raw = SgdLinearProbe { standardize: false, ..probe };
    let r = SgdLinearProbe { lrs: vec![1e-3, 3e38], ..raw.clone() }.fit_features(&train, &val).unwrap();
    assert_eq!(r.lr, Some(1e-3));
    assert_eq!((r.sweep[1].top1, r.sweep[1].loss), (0.0, f64::INFINITY));
    assert!(r.top1 > 0.9, "the sane head separates the blobs: {}", r.top1);
    let e = SgdLinearProbe { lrs: vec![3e38], ..raw }.fit_features(&train, &val).unwrap_err();
    assert!(matches!(e, PivotError::NonFinite { .. }), "{e:?}");
}

// ---------------------------------------------------------------- fuzz: JSON / JSONL readers

/// One random edit of `bytes`: flip, insert or delete bytes, duplicate or drop a range, truncate.
pub fn mutate(rng: &mut impl Rng, bytes: &mut Vec<u8>) {
    const INTERESTING: &[u8] = b"{}[]\",:\\\n\r \x00\xff\xe9\xc3\x80";
    let len = bytes.len().max(1);
    match rng.random_range(0..7) {
        0 => {
            let i = rng.random_range(0..len).min(bytes.len().saturating_sub(1));
            if let Some(b) = bytes.get_mut(i) {
                *b ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let i = rng.random_range(0..=bytes.len());
            bytes.insert(i, INTERESTING[rng.random_range(0..INTERESTING.len())]);
        }
        2 => {
            let i = rng.random_range(0..=bytes.len());
            bytes.insert(i, rng.random());
        }
        3 if !bytes.is_empty() => {
            let i = rng.random_range(0..bytes.len());
            let n = rng.random_range(1..=16).min(bytes.len() - i);
            bytes.drain(i..i + n);
        }
        4 if !bytes.is_empty() => {
            let i = rng.random_range(0..bytes.len());
            let n = rng.random_range(1..=64).min(bytes.len() - i);
            let chunk = bytes[i..i + n].to_vec();
            let at = rng.random_range(0..=bytes.len());
            bytes.splice(at..at, chunk);
        }
        5 => bytes.truncate(rng.random_range(0..=bytes.len())),
        _ => {
            let i = rng.random_range(0..len).min(bytes.len().saturating_sub(1));
            if let Some(b) = bytes.get_mut(i) {
                *b = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
        }
    }
}

/// The errors a loader may give for a broken file: a record error inside the file, or a file error
/// naming it.
fn names_the_file(err: &PivotError, file: &Path, lines: usize) -> bool {
    match err {
        PivotError::Record { path, line, .. } => path == file && (1..=lines + 1).contains(line),
        PivotError::File { path, .. } => path == file,
        _ => false,
    }
}

/// Fixed budget: 2000 mutants × 4 readers × 2 policies (under a second).
#[test]
fn fuzz_json_and_jsonl_readers_never_panic_and_always_name_the_file() {
    let dir = scratch("fuzz-json");
    write_png(&dir.join("a.png"));
    let seeds: [(&str, &str); 3] = [
        (
            "llava.json",
            "[\n {\"id\": 1, \"image\": \"a.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nWhat?\"}, {\"from\": \"gpt\", \"value\": \"A \\\"red\\\" disc.\"}]},\n {\"image\": [\"a.png\"], \"category\": \"c\", \"conversations\": [{\"from\": \"system\", \"value\": \"s\"}, {\"from\": \"user\", \"value\": \"q\"}, {\"from\": \"assistant\", \"value\": \"é\"}]}\n]\n",
        ),
        (
            "prefs.jsonl",
            "{\"image\": \"a.png\", \"question\": \"q\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n{\"image\": \"a.png\", \"prompt\": \"<image>\\nq\", \"chosen\": \"ü\", \"rejected\": \"n\", \"category\": \"x\"}\n\n",
        ),
        ("caps.jsonl", "{\"image\": \"a.png\", \"caption\": \"a cat\"}\r\n{\"image\": \"a.png\", \"text\": \"[a] {b}\"}\n"),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5EED);
    let file = dir.join("mutant");
    let options = [
        LoadOptions::default().with_image_check(ImageCheck::Exists),
        LoadOptions::skipping().with_image_check(ImageCheck::Exists),
    ];
    for iteration in 0..2000 {
        let (_, seed) = seeds[iteration % seeds.len()];
        let mut bytes = seed.as_bytes().to_vec();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut bytes);
        }
        fs::write(&file, &bytes).unwrap();
        let lines = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
        for options in options {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let results: [std::result::Result<usize, PivotError>; 4] = [
                    VqaDataset::from_llava_json_with(&file, &dir, options).map(|d| d.len() + d.skipped.count),
                    CaptionDataset::from_llava_json_with(&file, &dir, options).map(|d| d.len() + d.skipped.count),
                    CaptionDataset::from_jsonl_with(&file, &dir, options).map(|d| d.len() + d.skipped.count),
                    PreferenceDataset::from_jsonl_with(&file, &dir, options).map(|d| d.len() + d.skipped.count),
                ];
                results
            }));
            let Ok(results) = outcome else {
                let keep = dir.join(format!("panic-{iteration}"));
                fs::copy(&file, &keep).unwrap();
                panic!("a reader panicked on mutant {iteration} (kept as {})", keep.display());
            };
            for r in results {
                if let Err(e) = r {
                    assert!(names_the_file(&e, &file, lines), "mutant {iteration}: {e:?}\n{}", String::from_utf8_lossy(&bytes));
                }
            }
        }
    }
}
