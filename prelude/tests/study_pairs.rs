//! The study's data as an experiment needs it (issue 14): stage parts that share no scene,
//! counterfactual preference pairs that text alone cannot answer, image-counterfactual pairs
//! (`image_rejected`) that DPO and the choice evaluation score with the rejected image, and the
//! blank-image control. About 10 s on one core (a tiny MLLM, a few hundred 64-px scenes).

use pivot::prelude::*;
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

/// Tests that seed the global torch generator take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn world(part: StudyPart) -> ShapesWorld {
    ShapesWorld::new(ShapesConfig::default().seed(0)).part(part)
}

fn pixels(source: &ImageSource) -> Vec<u8> {
    source.load().unwrap().into_raw()
}

#[test]
fn study_parts_share_no_scene_and_the_world_without_a_part_is_unchanged() {
    let base = ShapesWorld::new(ShapesConfig::default().seed(0));
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut total = 0;
    for part in StudyPart::ALL {
        for sample in world(part).classification(Split::Train, 40).samples {
            seen.insert(pixels(&sample.image));
            total += 1;
        }
    }
    assert_eq!(seen.len(), total, "two study parts drew the same image");
    // Today's stage 2 trained on stage 1's rows: with parts, the two share none.
    let s1: HashSet<Vec<u8>> = world(StudyPart::Stage1).vqa(Split::Train, 40).samples.iter().map(|s| pixels(&s.image)).collect();
    let s2 = world(StudyPart::Stage2).balanced_preferences(Split::Train, 40).unwrap();
    assert!(s2.samples.iter().all(|s| !s1.contains(&pixels(&s.image))));
    // A world without a part draws what it always drew.
    let plain = base.classification(Split::Train, 3);
    let again = ShapesWorld::new(ShapesConfig { part: None, ..ShapesConfig::default() }).classification(Split::Train, 3);
    assert_eq!(plain, again);
    assert_ne!(pixels(&plain.samples[0].image), pixels(&world(StudyPart::Eval).classification(Split::Train, 1).samples[0].image));
}

fn differing_words(a: &str, b: &str) -> Vec<(String, String)> {
    let (x, y) = (tiny_words(a), tiny_words(b));
    assert_eq!(x.len(), y.len(), "{a:?} vs {b:?}");
    x.iter().zip(&y).filter(|(p, q)| p != q).map(|(p, q)| (p.to_string(), q.to_string())).collect()
}

#[test]
fn balanced_pairs_differ_in_one_plausible_fact_and_come_in_mirrored_twos() {
    let pairs = world(StudyPart::Stage2).balanced_preferences(Split::Train, 300).unwrap();
    assert_eq!(pairs.len(), 300);
    let counts = pairs.category_counts();
    for c in VQA_CATEGORIES {
        assert!(counts.get(c).copied().unwrap_or(0) >= 10, "category {c} is nearly missing: {counts:?}");
    }
    let numbers = ["zero", "one", "two", "three", "four", "five"];
    for (k, two) in pairs.samples.chunks(2).enumerate() {
        let (a, b) = (&two[0], &two[1]);
        assert_eq!(a.question, b.question, "pair {k}");
        assert_eq!((a.chosen.as_str(), a.rejected.as_str()), (b.rejected.as_str(), b.chosen.as_str()), "pair {k} is not mirrored");
        assert_ne!(pixels(&a.image), pixels(&b.image), "pair {k}: the mirror row shows the same image");
        assert!(a.image_rejected.is_none());
        for s in two {
            let diff = differing_words(&s.chosen, &s.rejected);
            assert_eq!(diff.len(), 1, "{:?} vs {:?} differ in {} words", s.chosen, s.rejected, diff.len());
            let (right, wrong) = &diff[0];
            match s.category.as_str() {
                // The wrong colour is another object's: its exact RGB is in the image (the
                // background is desaturated and never takes an object colour).
                "colour" => {
                    let colour = Colour::ALL.iter().find(|c| c.name() == wrong).expect("a colour word");
                    let image = s.image.load().unwrap();
                    assert!(image.pixels().any(|p| p.0 == colour.rgb()), "{wrong} is not in the image of {:?}", s.question);
                }
                "count" => {
                    let (i, j) = (numbers.iter().position(|n| n == right).unwrap(), numbers.iter().position(|n| n == wrong).unwrap());
                    assert_eq!(i.abs_diff(j), 1, "count {right} vs {wrong} is not off by one");
                }
                "shape" => assert!(Shape::ALL.iter().any(|x| x.name() == wrong)),
                "size" => assert!(["small", "large"].contains(&wrong.as_str())),
                "position" => assert!(["left", "right", "above", "below"].contains(&wrong.as_str())),
                other => panic!("unknown category {other}"),
            }
            for text in [&s.question, &s.chosen] {
                for w in tiny_words(text) {
                    assert!(TINY_VOCABULARY.contains(&w), "{w:?} of {text:?} is not in the tiny vocabulary");
                }
            }
        }
    }
    // Row 2k and 2k+1 depend on k only.
    let fewer = world(StudyPart::Stage2).balanced_preferences(Split::Train, 7).unwrap();
    assert_eq!(fewer.samples[..], pairs.samples[..7]);
    assert!(ShapesWorld::new(ShapesConfig::default().max_objects(1)).balanced_preferences(Split::Train, 4).is_err());
}

#[test]
fn a_text_only_baseline_is_at_chance_on_balanced_pairs_and_not_on_the_old_pairs() {
    let train = world(StudyPart::Stage2).balanced_preferences(Split::Train, 400).unwrap();
    let test = world(StudyPart::Eval).balanced_preferences(Split::Test, 400).unwrap();
    assert_eq!(text_only_accuracy(&train, &test), 0.5);
    // Even fitted on the very rows it is scored on.
    assert_eq!(text_only_accuracy(&test, &test), 0.5);
    // The old pairs leak: their answer words are not balanced (no "five" is ever right for "how
    // many shapes", no "four" for "small shapes"), which the same baseline finds.
    let old = ShapesWorld::new(ShapesConfig::default().seed(0));
    let (old_train, old_test) = (old.preferences(Split::Train, 400), old.preferences(Split::Val, 400));
    let leak = text_only_accuracy(&old_train, &old_test);
    assert!(leak > 0.52, "the baseline found no leak in the old pairs ({leak:.3})");
    let old_count = |d: &PreferenceDataset| PreferenceDataset::new(d.samples.iter().filter(|s| s.category == "count").cloned().collect());
    let count_leak = text_only_accuracy(&old_count(&old_train), &old_count(&old_test));
    assert!(count_leak > 0.6, "count questions of the old pairs: {count_leak:.3}");
}

#[test]
fn image_counterfactuals_keep_the_text_and_change_one_object() {
    let text = world(StudyPart::Stage2).balanced_preferences(Split::Train, 60).unwrap();
    let image = world(StudyPart::Stage2).image_preferences(Split::Train, 60).unwrap();
    assert_eq!(image.image_counterfactual_count(), 60);
    for (t, s) in text.samples.iter().zip(&image.samples) {
        assert_eq!(s.chosen, s.rejected);
        assert_eq!((&t.question, &t.chosen), (&s.question, &s.chosen));
        assert_eq!(pixels(&t.image), pixels(&s.image));
        let (a, b) = (s.image.load().unwrap(), s.rejected_image().load().unwrap());
        let changed = a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count();
        let area = (a.width() * a.height()) as usize;
        // One object changed (at most a large one, recoloured or moved: its old and new place).
        assert!(changed > 0 && changed < area / 3, "{changed} of {area} pixels changed for {:?}", s.question);
    }
}

#[test]
fn dpo_scores_the_rejected_answer_with_image_rejected() {
    let _g = serial();
    tch::manual_seed(0);
    let m = Mllm::tiny(Device::Cpu);
    let data = world(StudyPart::Stage2).image_preferences(Split::Train, 4).unwrap();
    let refs = reference_logps(&m, &data.samples, 3).unwrap();
    let logp = |image: &ImageSource, question: &str, answer: &str| {
        let px = m.preprocess(&[image.load().unwrap()]).unwrap();
        let seq = m.encode_chat(question, Some(answer)).unwrap();
        tch::no_grad(|| m.sequence_logps(&m.forward(&px, &[seq], &[0]).unwrap()).unwrap().double_value(&[0]))
    };
    for (i, s) in data.samples.iter().enumerate() {
        let chosen = logp(&s.image, &s.question, &s.chosen);
        let rejected = logp(s.rejected_image(), &s.question, &s.rejected);
        let same_image = logp(&s.image, &s.question, &s.rejected);
        assert!((refs.double_value(&[i as i64, 0]) - chosen).abs() < 1e-4, "row {i} chosen");
        assert!((refs.double_value(&[i as i64, 1]) - rejected).abs() < 1e-4, "row {i} rejected");
        assert!((rejected - same_image).abs() > 1e-7, "row {i}: the rejected image changes nothing");
    }
    // Chosen and rejected texts are the same: only the rejected image gives DPO a gradient.
    for double_encoding in [false, true] {
        let mut policy = m.deep_clone().unwrap();
        let cfg = DpoConfig { double_encoding, train: TrainConfig::default().batch_size(2).max_steps(1).quiet(), ..Default::default() };
        let log = DpoTrainer::new(cfg).run(&mut policy, &data).unwrap();
        let row = log.last().unwrap();
        assert!((row.get("loss").unwrap() - std::f64::consts::LN_2).abs() < 1e-5);
        assert!(row.get("grad_norm").unwrap() > 0.0, "no gradient from image-counterfactual pairs (double_encoding {double_encoding})");
    }
}

#[test]
fn the_blank_image_control_is_at_chance_on_mirrored_pairs() {
    let _g = serial();
    tch::manual_seed(1);
    let m = Mllm::tiny(Device::Cpu);
    let pairs = world(StudyPart::Eval).balanced_preferences(Split::Test, 24).unwrap();
    let r = ChoiceEval::default().quiet().image_use(&m, &pairs).unwrap();
    assert_eq!(r.with_image.total, 24);
    // With blank images the two rows of a mirror pair are the same input with the answers
    // swapped: exactly one of them is right.
    assert_eq!(r.blank.accuracy(), 0.5);
    assert!((r.gain() - (r.with_image.accuracy() - 0.5)).abs() < 1e-12);
    let with = ChoiceEval::default().quiet().run(&m, &pairs).unwrap();
    assert_eq!(with, r.with_image);
    assert!(r.to_string().contains("blank"));
    // Image-counterfactual pairs: the rejected side reads the changed image.
    let image = world(StudyPart::Eval).image_preferences(Split::Test, 6).unwrap();
    let c = ChoiceEval::default().quiet().run(&m, &image).unwrap();
    assert!(c.mean_margin != 0.0, "the choice evaluation scored the rejected text with the chosen image");
}
