//! Real-format loaders: the world's export read back, and every loader against broken input.

use std::fs;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use pivot::prelude::*;

/// A fresh folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("data_formats").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_png(path: &Path, seed: u8) -> RgbImage {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let image = RgbImage::from_fn(6, 4, |x, y| Rgb([seed, x as u8 * 10, y as u8 * 20]));
    image.save_with_format(path, image::ImageFormat::Png).unwrap();
    image
}

fn write_garbage(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"<html>404 not found</html>").unwrap();
}

fn write(path: &Path, text: &str) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The (line, field, message) of a `Record` error; anything else fails the test.
fn record(err: PivotError) -> (usize, String, String) {
    match err {
        PivotError::Record { line, field, message, .. } => (line, field, message),
        other => panic!("expected a Record error, got {other:?}"),
    }
}

fn pixels(source: &ImageSource) -> RgbImage {
    source.load().unwrap()
}

#[test]
fn export_reads_back_identically_through_the_real_loaders() {
    let world = ShapesWorld::new(ShapesConfig::default().seed(7).export_counts(24, 12, 6));
    let dir = scratch("export");
    let export = world.export(&dir).unwrap();
    assert_eq!(export.class_names, world.class_names());
    assert!(dir.join("manifest.json").is_file());

    for split in Split::ALL {
        let n = export.count(split);
        let root = &export.root;

        let captions = CaptionDataset::from_llava_json(export.captions_json(split), root).unwrap();
        let expected = world.captions(split, n);
        assert_eq!(captions.len(), n);
        for (a, b) in captions.iter().zip(&expected) {
            assert_eq!(a.caption, b.caption);
            assert_eq!(pixels(&a.image), pixels(&b.image));
        }

        let pairs = CaptionDataset::from_jsonl(export.pairs_jsonl(split), root).unwrap();
        let expected = world.image_text_pairs(split, n);
        assert_eq!(pairs.len(), n);
        for (a, b) in pairs.iter().zip(&expected) {
            assert_eq!(a.caption, b.caption);
            assert_eq!(pixels(&a.image), pixels(&b.image));
        }

        let vqa = VqaDataset::from_llava_json(export.vqa_json(split), root).unwrap();
        let expected = world.vqa(split, n);
        assert_eq!(vqa.len(), n);
        for (a, b) in vqa.iter().zip(&expected) {
            assert_eq!((&a.question, &a.answer, &a.category), (&b.question, &b.answer, &b.category));
            assert_eq!(pixels(&a.image), pixels(&b.image));
        }

        let expected = world.preferences(split, n);
        for loaded in [
            PreferenceDataset::from_jsonl(export.preferences_jsonl(split), root).unwrap(),
            PreferenceDataset::from_json(export.dpo_json(split), root).unwrap(),
        ] {
            assert_eq!(loaded.len(), n);
            for (a, b) in loaded.iter().zip(&expected) {
                assert_eq!(
                    (&a.question, &a.chosen, &a.rejected, &a.category),
                    (&b.question, &b.chosen, &b.rejected, &b.category)
                );
                assert_eq!(pixels(&a.image), pixels(&b.image));
            }
            assert!(loaded.skipped.is_empty());
        }

        let folder = ImageFolder::open(export.classes_dir(split)).unwrap();
        let expected = world.classification(split, n);
        assert_eq!(folder.class_names, expected.class_names);
        assert_eq!(folder.len(), n);
        assert_eq!(folder.class_counts(), expected.class_counts());
        for sample in folder.iter() {
            let path = sample.image.path().unwrap();
            let index: usize = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            assert_eq!(sample.label, expected[index].label);
            assert_eq!(pixels(&sample.image), pixels(&expected[index].image));
        }

        let seg = SegDataset::from_folders(
            export.images_dir(split),
            export.masks_dir(split),
            MaskEncoding::Identity,
            export.seg_class_names.clone(),
            LoadOptions::default(),
        )
        .unwrap();
        let expected = world.segmentation(split, n);
        assert_eq!((seg.class_names.clone(), seg.ignore_index), (expected.class_names.clone(), expected.ignore_index));
        assert_eq!(seg.len(), n);
        for (a, b) in seg.iter().zip(&expected) {
            assert_eq!(a.mask, b.mask);
            assert_eq!(pixels(&a.image), pixels(&b.image));
        }
    }

    // A smaller export into the same folder leaves no stale images behind.
    let smaller = ShapesWorld::new(ShapesConfig::default().seed(7).export_counts(5, 2, 2));
    let export = smaller.export(&dir).unwrap();
    assert_eq!(ImageFolder::open(export.classes_dir(Split::Train)).unwrap().len(), 5);
    assert_eq!(fs::read_dir(export.images_dir(Split::Train)).unwrap().count(), 5);
}

#[test]
fn llava_json_gives_one_sample_per_turn_pair_without_placeholder() {
    let dir = scratch("llava_ok");
    write_png(&dir.join("img/a.png"), 1);
    write_png(&dir.join("img/b.png"), 2);
    let json = write(
        &dir.join("llava.json"),
        r#"[
  {"id": "1", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "Red."}
  ]},
  {"id": "2", "image": "b.png", "category": "colour", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "user", "value": "Describe.\n<image>"},
    {"from": "assistant", "value": "A dog."}
  ]}
]"#,
    );
    let vqa = VqaDataset::from_llava_json(&json, dir.join("img")).unwrap();
    let qa: Vec<(&str, &str, &str)> =
        vqa.iter().map(|s| (s.question.as_str(), s.answer.as_str(), s.category.as_str())).collect();
    assert_eq!(qa, vec![("What is it?", "A cat.", ""), ("And its colour?", "Red.", ""), ("Describe.", "A dog.", "colour")]);
    assert_eq!(vqa[0].image, ImageSource::File(dir.join("img/a.png")));
    assert_eq!(vqa[2].image.load().unwrap().get_pixel(0, 0), &Rgb([2, 0, 0]));

    let captions = CaptionDataset::from_llava_json(&json, dir.join("img")).unwrap();
    assert_eq!(captions.iter().map(|c| c.caption.as_str()).collect::<Vec<_>>(), vec!["A cat.", "A dog."]);

    let limited = VqaDataset::from_llava_json_with(&json, dir.join("img"), LoadOptions::default().with_limit(2)).unwrap();
    assert_eq!(limited.len(), 2);
}

/// Two good records around one bad one; returns the JSON path. The bad record starts on line 3.
fn llava_with_bad_record(dir: &Path, bad: &str) -> PathBuf {
    write_png(&dir.join("ok.png"), 3);
    let good = r#"{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}"#;
    write(&dir.join("data.json"), &format!("[\n{good},\n{bad},\n{good}\n]\n"))
}

#[test]
fn llava_json_errors_name_file_line_and_field() {
    let dir = scratch("llava_bad");
    let conv = r#""conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]"#;
    let cases = [
        (r#"{"image": "ok.png"}"#.to_string(), "conversations", "missing"),
        (format!(r#"{{"image": "missing.png", {conv}}}"#), "image", "missing.png"),
        (format!(r#"{{"image": "garbage.png", {conv}}}"#), "image", "not a readable"),
        (format!(r#"{{{conv}}}"#), "image", "missing"),
        (
            r#"{"image": "ok.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": 5}]}"#.to_string(),
            "conversations[1].value",
            "expected a string",
        ),
        (
            r#"{"image": "ok.png", "conversations": [{"from": "gpt", "value": "A."}]}"#.to_string(),
            "conversations[0].from",
            "without a human turn",
        ),
        (r#"{"image": "ok.png", "conversations": [{"from": "human" "value": "Q?"}]}"#.to_string(), "json", "malformed"),
        (format!(r#"{{"image": ["ok.png", "ok.png"], {conv}}}"#), "image", "2 images"),
    ];
    write_garbage(&dir.join("garbage.png"));
    for (bad, field, needle) in cases {
        let json = llava_with_bad_record(&dir, &bad);
        let err = VqaDataset::from_llava_json(&json, &dir).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("{}:3:", json.display())), "{text}");
        let (line, got_field, message) = record(err);
        assert_eq!((line, got_field.as_str()), (3, field), "{bad}");
        assert!(message.contains(needle), "{bad}: {message}");

        // Under the skip policy the two good records survive and the bad one is reported.
        let skipped = VqaDataset::from_llava_json_with(&json, &dir, LoadOptions::skipping()).unwrap();
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped.skipped.count, 1);
        assert_eq!(skipped.skipped.reasons[0].line, Some(3));
        assert_eq!(skipped.skipped.reasons[0].field, field);
    }
}

#[test]
fn json_list_syntax_error_reports_the_line_inside_a_record() {
    let dir = scratch("llava_syntax");
    write_png(&dir.join("ok.png"), 3);
    let json = write(
        &dir.join("data.json"),
        "[\n  {\n    \"image\": \"ok.png\",\n    \"conversations\": [\n      {\"from\": \"human\", \"value\": \"Q\"}\n      {\"from\": \"gpt\", \"value\": \"A\"}\n    ]\n  }\n]\n",
    );
    let (line, field, _) = record(VqaDataset::from_llava_json(&json, &dir).unwrap_err());
    assert_eq!((line, field.as_str()), (6, "json"));

    let truncated = write(&dir.join("cut.json"), "[\n {\"image\": \"ok.png\",\n  \"conversations\": [\n");
    let (line, field, message) = record(VqaDataset::from_llava_json_with(&truncated, &dir, LoadOptions::skipping()).unwrap_err());
    assert_eq!((line, field.as_str()), (2, "json"));
    assert!(message.contains("never close"), "{message}");

    let not_a_list = write(&dir.join("obj.json"), "\n\n{\"image\": 1}");
    // A single object is read as one JSON line; its bad field is still named.
    let (line, field, _) = record(VqaDataset::from_llava_json(&not_a_list, &dir).unwrap_err());
    assert_eq!((line, field.as_str()), (3, "conversations"));
}

#[test]
fn preference_jsonl_accepts_rlaifv_mmpr_and_pivot_dpo_rows() {
    let dir = scratch("prefs_ok");
    write_png(&dir.join("images/x.png"), 9);
    write_png(&dir.join("images/y.png"), 7);
    let jsonl = write(
        &dir.join("prefs.jsonl"),
        concat!(
            r#"{"image": "x.png", "question": "Q1?", "chosen": "C1", "rejected": "R1"}"#,
            "\n\n",
            r#"{"image": ["x.png"], "prompt": "<image>\nQ2?", "chosen": "C2", "rejected": "R2", "answer": "C2", "id": 7}"#,
            "\n",
            r#"{"image": "x.png", "query": "Q3?", "chosen": "C3", "rejected": "R3", "category": "count"}"#,
            "\n"
        ),
    );
    let prefs = PreferenceDataset::from_jsonl(&jsonl, dir.join("images")).unwrap();
    let rows: Vec<_> = prefs
        .iter()
        .map(|p| (p.question.as_str(), p.chosen.as_str(), p.rejected.as_str(), p.category.as_str()))
        .collect();
    assert_eq!(rows, vec![("Q1?", "C1", "R1", ""), ("Q2?", "C2", "R2", ""), ("Q3?", "C3", "R3", "count")]);

    let dpo = write(
        &dir.join("dpo.json"),
        r#"[{"id": "a-b-12345", "prompt": "<image>\nWhat colour?", "chosen": "Red.", "rejected": "Blue.",
             "image": "x.png", "image_rejected": "y.png"}]"#,
    );
    let prefs = PreferenceDataset::from_json(&dpo, dir.join("images")).unwrap();
    assert_eq!((prefs[0].question.as_str(), prefs[0].chosen.as_str()), ("What colour?", "Red."));
    assert_eq!(prefs.to_sft()[0].answer, "Red.");
    // PIVOT's image-counterfactual rows: the rejected answer is scored with `image_rejected`.
    assert_eq!(prefs[0].image_rejected.as_ref().and_then(|i| i.path()), Some(dir.join("images/y.png").as_path()));
    assert_eq!(prefs.image_counterfactual_count(), 1);
    let missing = write(
        &dir.join("dpo_missing.json"),
        r#"[{"prompt": "<image>\nQ?", "chosen": "A.", "rejected": "B.", "image": "x.png", "image_rejected": "gone.png"}]"#,
    );
    let (line, field, _) = record(PreferenceDataset::from_json(&missing, dir.join("images")).unwrap_err());
    assert_eq!((line, field.as_str()), (1, "image_rejected"));
}

#[test]
fn preference_errors_name_line_and_field_and_skip_counts_them() {
    let dir = scratch("prefs_bad");
    write_png(&dir.join("x.png"), 9);
    write_garbage(&dir.join("bad.png"));
    let good = r#"{"image": "x.png", "question": "Q?", "chosen": "C", "rejected": "R"}"#;
    let lines = [
        good,
        r#"{"image": "x.png", "question": "Q?", "rejected": "R"}"#,
        r#"{"image": "x.png", "question": "Q?", "chosen": "C", "rejected": "R""#,
        r#"{"image": "x.png", "chosen": "C", "rejected": "R"}"#,
        r#"{"image": "x.png", "question": "Q?", "chosen": "C", "rejected": 5}"#,
        r#"{"image": "gone.png", "question": "Q?", "chosen": "C", "rejected": "R"}"#,
        r#"{"image": "bad.png", "question": "Q?", "chosen": "C", "rejected": "R"}"#,
        r#"["not", "an", "object"]"#,
        good,
    ];
    let path = write(&dir.join("p.jsonl"), &(lines.join("\n") + "\n"));

    let (line, field, message) = record(PreferenceDataset::from_jsonl(&path, &dir).unwrap_err());
    assert_eq!((line, field.as_str(), message.as_str()), (2, "chosen", "missing"));

    let report = PreferenceDataset::from_jsonl_with(&path, &dir, LoadOptions::skipping()).unwrap();
    assert_eq!(report.len(), 2);
    assert_eq!(report.skipped.count, 7);
    let reasons: Vec<(Option<usize>, &str)> =
        report.skipped.reasons.iter().map(|r| (r.line, r.field.as_str())).collect();
    assert_eq!(
        reasons,
        vec![
            (Some(2), "chosen"),
            (Some(3), "json"),
            (Some(4), "question"),
            (Some(5), "rejected"),
            (Some(6), "image"),
            (Some(7), "image"),
            (Some(8), "json"),
        ]
    );
    let messages: Vec<&str> = report.skipped.reasons.iter().map(|r| r.message.as_str()).collect();
    assert!(messages[2].contains("`prompt`"), "{}", messages[2]);
    assert!(messages[3].contains("found a number"), "{}", messages[3]);
    assert!(messages[4].contains("gone.png") && messages[4].contains("does not exist"), "{}", messages[4]);
    assert!(messages[5].contains("bad.png"), "{}", messages[5]);
    assert!(report.skipped.to_string().contains("skipped 7 record(s)"));

    let limited = PreferenceDataset::from_jsonl_with(&path, &dir, LoadOptions::skipping().with_limit(1)).unwrap();
    assert_eq!(limited.len(), 1);

    // With only an existence check, unreadable bytes pass loading and fail on decode, naming the file.
    let lax = LoadOptions::skipping().with_image_check(ImageCheck::Exists);
    let report = PreferenceDataset::from_jsonl_with(&path, &dir, lax).unwrap();
    assert_eq!(report.len(), 3);
    let err = report[1].image.load().unwrap_err();
    assert!(matches!(&err, PivotError::File { path, .. } if path.ends_with("bad.png")), "{err:?}");
}

#[test]
fn caption_jsonl_errors_and_aliases() {
    let dir = scratch("captions");
    write_png(&dir.join("a.png"), 4);
    let path = write(
        &dir.join("c.jsonl"),
        concat!(
            r#"{"image": "a.png", "caption": "a red circle"}"#,
            "\n",
            r#"{"image": "a.png", "text": "a blue star"}"#,
            "\n",
            r#"{"image": "a.png", "title": "no caption"}"#,
            "\n"
        ),
    );
    let (line, field, message) = record(CaptionDataset::from_jsonl(&path, &dir).unwrap_err());
    assert_eq!((line, field.as_str()), (3, "caption"));
    assert!(message.contains("`text`"), "{message}");
    let captions = CaptionDataset::from_jsonl_with(&path, &dir, LoadOptions::skipping()).unwrap();
    assert_eq!(captions.iter().map(|c| c.caption.as_str()).collect::<Vec<_>>(), vec!["a red circle", "a blue star"]);
    assert_eq!(captions.skipped.count, 1);

    let missing = CaptionDataset::from_jsonl(dir.join("nope.jsonl"), &dir).unwrap_err();
    assert!(matches!(&missing, PivotError::File { path, .. } if path.ends_with("nope.jsonl")), "{missing:?}");
}

#[test]
fn image_folder_sorts_classes_and_reports_bad_images() {
    let dir = scratch("folder");
    let root = dir.join("train");
    let cat = write_png(&root.join("a_cat/1.png"), 10);
    write_png(&root.join("a_cat/nested/2.png"), 11);
    write_png(&root.join("b_dog/3.JPEG"), 12);
    RgbImage::from_pixel(8, 8, Rgb([200, 10, 10])).save_with_format(root.join("b_dog/4.jpg"), image::ImageFormat::Jpeg).unwrap();
    write(&root.join("b_dog/notes.txt"), "not an image");
    write_png(&root.join("b_dog/.hidden.png"), 13);
    fs::create_dir_all(root.join("c_empty")).unwrap();

    let folder = ImageFolder::open(&root).unwrap();
    assert_eq!(folder.class_names, vec!["a_cat", "b_dog", "c_empty"]);
    assert_eq!(folder.iter().map(|s| s.label).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
    assert_eq!(folder.class_counts(), vec![2, 2, 0]);
    assert_eq!(folder[0].image.load().unwrap(), cat);
    assert_eq!(folder[3].image.load().unwrap().dimensions(), (8, 8));
    let per_class = ImageFolder::open_with(&root, LoadOptions::default().with_limit(1)).unwrap();
    assert_eq!(per_class.class_counts(), vec![1, 1, 0]);
    let dataset: ClassificationDataset = per_class.into_dataset();
    assert_eq!(dataset.len(), 2);

    write_garbage(&root.join("b_dog/5.png"));
    let err = ImageFolder::open(&root).unwrap_err();
    assert!(matches!(&err, PivotError::File { path, .. } if path.ends_with("b_dog/5.png")), "{err:?}");
    let skipping = ImageFolder::open_with(&root, LoadOptions::skipping()).unwrap();
    assert_eq!((skipping.len(), skipping.skipped.count), (4, 1));
    assert_eq!(skipping.skipped.reasons[0].field, "image");

    assert!(ImageFolder::open(dir.join("absent")).is_err());
    fs::create_dir_all(dir.join("flat")).unwrap();
    write_png(&dir.join("flat/x.png"), 1);
    let err = ImageFolder::open(dir.join("flat")).unwrap_err();
    assert!(err.to_string().contains("no class folders"), "{err}");
}

fn write_mask(path: &Path, values: &[u8], width: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let height = values.len() as u32 / width;
    GrayImage::from_fn(width, height, |x, y| Luma([values[(y * width + x) as usize]])).save(path).unwrap();
}

fn write_jpeg(path: &Path, width: u32, height: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(width, height, Rgb([90, 120, 30])).save_with_format(path, image::ImageFormat::Jpeg).unwrap();
}

#[test]
fn ade20k_reduces_zero_label_and_reports_broken_pairs() {
    let root = scratch("ade").join("ADEChallengeData2016");
    write_jpeg(&root.join("images/validation/ADE_val_00000001.jpg"), 2, 2);
    write_mask(&root.join("annotations/validation/ADE_val_00000001.png"), &[0, 1, 150, 7], 2);
    let ade = SegDataset::ade20k(&root, Split::Val).unwrap();
    assert_eq!(ade.class_names.len(), 150);
    assert_eq!((ade.class_names[0].as_str(), ade.class_names[149].as_str()), ("wall", "flag"));
    assert_eq!(ade.ignore_index, 255);
    assert_eq!(ade.len(), 1);
    assert_eq!(ade[0].mask.as_raw(), &vec![255, 0, 149, 6]);
    assert!(matches!(SegDataset::ade20k(&root, Split::Test), Err(PivotError::Invalid(_))));
    assert!(SegDataset::ade20k(&root, Split::Train).is_err(), "training folder does not exist");

    // An image without annotation, an RGB annotation and a size mismatch.
    write_jpeg(&root.join("images/validation/ADE_val_00000002.jpg"), 2, 2);
    let err = SegDataset::ade20k(&root, Split::Val).unwrap_err();
    assert!(matches!(&err, PivotError::File { path, .. } if path.ends_with("ADE_val_00000002.png")), "{err:?}");
    RgbImage::new(2, 2).save(root.join("annotations/validation/ADE_val_00000002.png")).unwrap();
    let err = SegDataset::ade20k(&root, Split::Val).unwrap_err();
    assert!(err.to_string().contains("single-channel"), "{err}");
    write_mask(&root.join("annotations/validation/ADE_val_00000002.png"), &[1, 1, 1], 3);
    let err = SegDataset::ade20k(&root, Split::Val).unwrap_err();
    assert!(err.to_string().contains("3x1") && err.to_string().contains("2x2"), "{err}");

    let skipping = SegDataset::ade20k_with(&root, Split::Val, LoadOptions::skipping()).unwrap();
    assert_eq!((skipping.len(), skipping.skipped.count), (1, 1));
    assert_eq!(skipping.skipped.reasons[0].field, "annotation");
}

#[test]
fn coco_stuff_shifts_labels_so_unlabeled_is_zero() {
    let root = scratch("coco");
    write_jpeg(&root.join("images/val2017/000000000139.jpg"), 2, 2);
    write_mask(&root.join("annotations/val2017/000000000139.png"), &[255, 0, 181, 100], 2);
    let coco = SegDataset::coco_stuff(&root, Split::Val).unwrap();
    assert_eq!(coco.class_names.len(), 183);
    assert_eq!(
        (coco.class_names[0].as_str(), coco.class_names[1].as_str(), coco.class_names[182].as_str()),
        ("unlabeled", "person", "wood")
    );
    assert_eq!(coco[0].mask.as_raw(), &vec![0, 1, 182, 101]);
    assert_eq!(coco[0].image.load().unwrap().dimensions(), (2, 2));
    assert!(matches!(SegDataset::coco_stuff(&root, Split::Test), Err(PivotError::Invalid(_))));
}

#[test]
fn image_source_errors_name_the_file() {
    let err = ImageSource::File(PathBuf::from("/nonexistent/pic.png")).load().unwrap_err();
    assert!(err.to_string().contains("/nonexistent/pic.png"), "{err}");
}
