//! The embedded ShapesWorld: determinism, splits, labels, masks, texts and preference pairs.

use std::collections::{HashMap, HashSet};

use pivot::prelude::*;

fn world() -> ShapesWorld {
    ShapesWorld::new(ShapesConfig::default().seed(0))
}

/// FNV-1a, written out so that the golden values below do not depend on std's hasher.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn image_hash(source: &ImageSource) -> u64 {
    fnv(source.load().expect("in-memory image").as_raw())
}

#[test]
fn two_constructions_give_identical_samples() {
    let (a, b) = (world(), world());
    assert_eq!(a.vqa(Split::Train, 40), b.vqa(Split::Train, 40));
    assert_eq!(a.preferences(Split::Val, 40), b.preferences(Split::Val, 40));
    assert_eq!(a.captions(Split::Test, 40), b.captions(Split::Test, 40));
    assert_eq!(a.image_text_pairs(Split::Train, 40), b.image_text_pairs(Split::Train, 40));
    assert_eq!(a.classification(Split::Train, 40), b.classification(Split::Train, 40));
    assert_eq!(a.segmentation(Split::Train, 40), b.segmentation(Split::Train, 40));

    let other = ShapesWorld::new(ShapesConfig::default().seed(1));
    assert_ne!(a.classification(Split::Train, 12), other.classification(Split::Train, 12));
}

#[test]
fn sample_i_does_not_depend_on_how_many_were_drawn() {
    let w = world();
    let short = w.preferences(Split::Train, 7);
    let long = w.preferences(Split::Train, 50);
    assert_eq!(short.samples[..], long.samples[..7]);
    assert_eq!(w.classification(Split::Val, 5).samples[..], w.classification(Split::Val, 30).samples[..5]);
    // Large requests render on several threads; the samples are those of single renders.
    let many = w.segmentation(Split::Test, 1100);
    for i in [0, 277, 550, 1099] {
        let single = w.render(Split::Test, i);
        assert_eq!(many[i].mask, single.mask);
        assert_eq!(many[i].image, ImageSource::Memory(single.image));
    }
}

/// Same seed, same bytes on every machine: these hashes were computed once and must never move.
/// A change here means exported data sets and published numbers no longer reproduce.
#[test]
fn images_and_texts_match_golden_hashes() {
    let w = world();
    let images: Vec<u64> = (0..3).map(|i| fnv(w.render(Split::Train, i).image.as_raw())).collect();
    let masks: Vec<u64> = (0..3).map(|i| fnv(w.render(Split::Train, i).mask.as_raw())).collect();
    let prefs = w.preferences(Split::Train, 3);
    let texts: Vec<u64> = prefs.iter().map(|p| fnv(format!("{}|{}|{}", p.question, p.chosen, p.rejected).as_bytes())).collect();
    assert_eq!(images, GOLDEN_IMAGES, "image bytes changed");
    assert_eq!(masks, GOLDEN_MASKS, "mask bytes changed");
    assert_eq!(texts, GOLDEN_TEXTS, "texts changed");
}

const GOLDEN_IMAGES: [u64; 3] = [10660927583053917957, 1380465723845452056, 8911498803761909006];
const GOLDEN_MASKS: [u64; 3] = [14971632410798217601, 1971108335405721941, 4274502464393005091];
const GOLDEN_TEXTS: [u64; 3] = [18419520603394537486, 13122685012199744328, 5768254560209933266];

#[test]
fn splits_share_no_image() {
    let w = world();
    let hashes = |split| -> HashSet<u64> { w.classification(split, 300).iter().map(|s| image_hash(&s.image)).collect() };
    let (train, val, test) = (hashes(Split::Train), hashes(Split::Val), hashes(Split::Test));
    assert_eq!(train.len(), 300, "images repeat inside the train split");
    assert!(train.is_disjoint(&val));
    assert!(train.is_disjoint(&test));
    assert!(val.is_disjoint(&test));
}

#[test]
fn classes_are_balanced_and_match_the_large_object() {
    let w = world();
    assert_eq!(w.num_classes(), 12);
    let data = w.classification(Split::Train, 240);
    assert_eq!(data.class_names, w.class_names());
    assert_eq!(data.class_counts(), vec![20; 12]);
    // Any prefix is balanced to within one sample per class.
    let counts = w.classification(Split::Val, 125).class_counts();
    assert!(counts.iter().all(|&c| c == 10 || c == 11), "{counts:?}");

    let mut sorted = w.class_names();
    sorted.sort();
    assert_eq!(sorted, w.class_names(), "class names must sort in label order for ImageFolder round trips");

    for i in 0..100 {
        let scene = w.scene(Split::Train, i);
        let main = scene.main_object();
        assert_eq!(main.size, Size::Large);
        let expected = format!("{}_{}", main.colour.group().name(), main.shape.name());
        assert_eq!(w.class_names()[scene.class], expected);
        assert_eq!(scene.class, data.samples[i].label);
    }
}

#[test]
fn labels_are_not_readable_from_background_or_mean_colour() {
    let w = world();
    // The background is drawn independently of the label: every class meets every texture.
    let mut seen = HashSet::new();
    for i in 0..1200 {
        let scene = w.scene(Split::Train, i);
        seen.insert((scene.class, scene.background.texture));
    }
    assert_eq!(seen.len(), 12 * Texture::ALL.len());

    // A nearest-centroid classifier on the mean RGB of the image stays near chance (1/12 ≈ 8 %):
    // the shape half of the label needs spatial structure.
    let features = |split, n| -> Vec<([f64; 3], usize)> {
        w.classification(split, n)
            .iter()
            .map(|s| {
                let image = s.image.load().unwrap();
                let mut sum = [0.0; 3];
                for p in image.pixels() {
                    for c in 0..3 {
                        sum[c] += p[c] as f64;
                    }
                }
                let n = (image.width() * image.height()) as f64;
                (sum.map(|v| v / n), s.label)
            })
            .collect()
    };
    let train = features(Split::Train, 1200);
    let mut centroids = vec![([0.0f64; 3], 0usize); 12];
    for (f, label) in &train {
        let (sum, count) = &mut centroids[*label];
        for (s, v) in sum.iter_mut().zip(f) {
            *s += v;
        }
        *count += 1;
    }
    let centroids: Vec<[f64; 3]> = centroids.iter().map(|(s, n)| s.map(|v| v / *n as f64)).collect();
    let val = features(Split::Val, 600);
    let correct = val
        .iter()
        .filter(|(f, label)| {
            let dist = |c: &[f64; 3]| (0..3).map(|k| (f[k] - c[k]).powi(2)).sum::<f64>();
            let best = (0..12).min_by(|&a, &b| dist(&centroids[a]).total_cmp(&dist(&centroids[b]))).unwrap();
            best == *label
        })
        .count();
    let accuracy = correct as f64 / val.len() as f64;
    assert!(accuracy < 0.25, "mean colour predicts the class too well: {accuracy}");
}

#[test]
fn scenes_have_distinct_visible_objects_with_occlusion() {
    let w = world();
    let mut counts = HashMap::new();
    let mut occluded = 0;
    for i in 0..400 {
        let scene = w.scene(Split::Train, i);
        let n = scene.objects.len();
        assert!((1..=4).contains(&n));
        *counts.entry(n).or_insert(0) += 1;
        assert_eq!(scene.objects.iter().filter(|o| o.size == Size::Large).count(), 1);
        let shapes: HashSet<_> = scene.objects.iter().map(|o| o.shape).collect();
        let colours: HashSet<_> = scene.objects.iter().map(|o| o.colour).collect();
        assert_eq!((shapes.len(), colours.len()), (n, n), "objects must be nameable by shape or colour alone");
        let mut order = scene.draw_order.clone();
        order.sort();
        assert_eq!(order, (0..n).collect::<Vec<_>>());
        for o in &scene.objects {
            assert!(n == 1 || o.visible_fraction >= 0.6, "object {o:?} is mostly hidden");
        }
        if scene.objects.iter().any(|o| o.visible_fraction < 1.0) {
            occluded += 1;
        }
    }
    assert_eq!(counts.len(), 4, "object counts seen: {counts:?}");
    assert!(occluded > 20, "only {occluded} of 400 scenes have any occlusion");

    let small = ShapesWorld::new(ShapesConfig::default().image_size(32).max_objects(1));
    let r = small.render(Split::Train, 3);
    assert_eq!(r.image.dimensions(), (32, 32));
    assert_eq!(r.scene.objects.len(), 1);
}

#[test]
fn masks_agree_with_pixels_boxes_and_scenes() {
    let w = world();
    let palette: HashMap<[u8; 3], Colour> = Colour::ALL.iter().map(|&c| (c.rgb(), c)).collect();
    let seg = w.segmentation(Split::Train, 60);
    assert_eq!(seg.class_names, vec!["background", "circle", "cross", "diamond", "square", "star", "triangle"]);
    assert_eq!(seg.ignore_index, 255);
    for (i, sample) in seg.iter().enumerate() {
        let rendered = w.render(Split::Train, i);
        assert_eq!(sample.mask, rendered.mask);
        let image = sample.image.load().unwrap();
        assert_eq!(image.dimensions(), sample.mask.dimensions());
        let mut pixels_per_object = vec![0usize; rendered.scene.objects.len()];
        for (x, y, m) in sample.mask.enumerate_pixels() {
            let rgb = image.get_pixel(x, y).0;
            let m = m[0];
            if m == 0 {
                assert!(!palette.contains_key(&rgb), "background pixel ({x},{y}) has an object colour");
                continue;
            }
            // The object of that shape is there, with that colour, inside its box.
            let (k, object) = rendered
                .scene
                .objects
                .iter()
                .enumerate()
                .find(|(_, o)| o.shape.mask_value() == m)
                .unwrap_or_else(|| panic!("mask value {m} at ({x},{y}) names no object of the scene"));
            assert_eq!(palette.get(&rgb), Some(&object.colour), "pixel ({x},{y})");
            let b = object.bbox;
            assert!(b.x0 <= x && x < b.x1 && b.y0 <= y && y < b.y1, "pixel ({x},{y}) outside box {b:?}");
            pixels_per_object[k] += 1;
        }
        for (object, count) in rendered.scene.objects.iter().zip(pixels_per_object) {
            assert_eq!(object.visible_pixels, count);
        }
    }
}

#[test]
fn tiny_words_splits_whitespace_and_punctuation() {
    assert_eq!(tiny_words("The circle is red ."), vec!["The", "circle", "is", "red", "."]);
    assert_eq!(tiny_words("  red,blue?\n'x'- "), vec!["red", ",", "blue", "?", "'", "x", "'", "-"]);
    assert!(tiny_words(" \t\n").is_empty());
}

#[test]
fn every_world_text_is_in_the_tiny_vocabulary() {
    let w = world();
    let vocab: HashSet<&str> = TINY_VOCABULARY.iter().copied().collect();
    assert_eq!(vocab.len(), TINY_VOCABULARY.len(), "TINY_VOCABULARY lists a word twice");
    let mut texts: Vec<String> = vec![CAPTION_PROMPT.to_string()];
    for split in Split::ALL {
        texts.extend(w.captions(split, 200).into_iter().map(|s| s.caption));
        texts.extend(w.image_text_pairs(split, 200).into_iter().map(|s| s.caption));
        for p in w.preferences(split, 300) {
            texts.extend([p.question, p.chosen, p.rejected]);
        }
    }
    let mut unknown = HashSet::new();
    for text in &texts {
        for word in tiny_words(text) {
            if !vocab.contains(word) {
                unknown.insert(word.to_string());
            }
        }
    }
    assert!(unknown.is_empty(), "words missing from TINY_VOCABULARY: {unknown:?}");
}

fn fact_words(category: &str) -> Vec<&'static str> {
    match category {
        "colour" => Colour::ALL.iter().map(|c| c.name()).collect(),
        "shape" => Shape::ALL.iter().map(|s| s.name()).collect(),
        "count" => vec!["zero", "one", "two", "three", "four", "five"],
        "position" => vec!["left", "right", "above", "below"],
        "size" => vec!["small", "large"],
        other => panic!("unknown category {other}"),
    }
}

#[test]
fn rejected_answers_hallucinate_exactly_one_fact_of_the_category() {
    let w = world();
    let prefs = w.preferences(Split::Train, 1000);
    let counts = prefs.category_counts();
    assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), vec!["colour", "count", "position", "shape", "size"]);
    assert!(counts.values().all(|&c| c >= 100), "unbalanced categories: {counts:?}");
    for p in prefs.iter() {
        let (chosen, rejected) = (tiny_words(&p.chosen), tiny_words(&p.rejected));
        assert_eq!(chosen.len(), rejected.len(), "{p:?}");
        let diffs: Vec<(&str, &str)> =
            chosen.iter().zip(&rejected).filter(|(a, b)| a != b).map(|(a, b)| (*a, *b)).collect();
        assert_eq!(diffs.len(), 1, "{p:?}");
        let facts = fact_words(&p.category);
        assert!(facts.contains(&diffs[0].0) && facts.contains(&diffs[0].1), "{p:?}");
    }
    // The SFT data is the chosen side of the same rows.
    assert_eq!(prefs.to_sft(), w.vqa(Split::Train, 1000));
}

#[test]
fn answers_are_true_of_the_scene() {
    let w = world();
    let vqa = w.vqa(Split::Val, 400);
    let mut checked = HashMap::new();
    for (i, s) in vqa.iter().enumerate() {
        let scene = w.scene(Split::Val, i);
        let words = tiny_words(&s.answer);
        let named = |kind: &str| -> Option<&SceneObject> {
            scene.objects.iter().find(|o| {
                let name = if kind == "shape" { o.shape.name() } else { o.colour.name() };
                tiny_words(&s.question).contains(&name)
            })
        };
        match s.category.as_str() {
            "colour" => {
                let object = named("shape").expect("question names a shape of the scene");
                assert!(words.contains(&object.colour.name()), "{s:?}");
            }
            "shape" => {
                let object = named("colour").expect("question names a colour of the scene");
                assert!(words.contains(&object.shape.name()), "{s:?}");
            }
            "count" if s.question.contains("small") => {
                let small = scene.objects.iter().filter(|o| o.size == Size::Small).count();
                assert!(words.contains(&["zero", "one", "two", "three", "four"][small]), "{s:?}");
            }
            "count" => {
                let n = scene.objects.len();
                assert!(words.contains(&["zero", "one", "two", "three", "four"][n]), "{s:?}");
            }
            "size" => {
                let object = named("shape").unwrap();
                assert!(words.contains(&object.size.name()), "{s:?}");
            }
            "position" => {
                // "The <a> is to the left of the <b> ." / "The <a> is above the <b> ."
                let object = |colour: &str| scene.objects.iter().find(|o| o.colour.name() == colour).unwrap();
                let a = object(words[1]);
                let b = object(words[words.len() - 3]);
                let relation = words.iter().find(|w| ["left", "right", "above", "below"].contains(w)).unwrap();
                let holds = match *relation {
                    "left" => a.cx < b.cx,
                    "right" => a.cx > b.cx,
                    "above" => a.cy < b.cy,
                    _ => a.cy > b.cy,
                };
                assert!(holds, "{s:?}");
            }
            other => panic!("unknown category {other}"),
        }
        *checked.entry(s.category.clone()).or_insert(0) += 1;
    }
    assert_eq!(checked.len(), 5);
}

#[test]
fn descriptions_mention_every_object() {
    let w = world();
    for (i, pair) in w.image_text_pairs(Split::Test, 50).iter().enumerate() {
        let scene = w.scene(Split::Test, i);
        for o in &scene.objects {
            let phrase = format!("{} {} {}", o.size.name(), o.colour.name(), o.shape.name());
            assert!(pair.caption.contains(&phrase), "{phrase} missing from {}", pair.caption);
        }
        assert!(pair.caption.contains(scene.background.texture.adjective()));
    }
}

#[test]
fn captions_join_stage_1_as_describe_rows() {
    let w = world();
    let caps = w.captions(Split::Train, 6);
    let rows = caps.to_vqa(CAPTION_PROMPT);
    assert_eq!(rows.len(), caps.len());
    for (r, c) in rows.iter().zip(caps.iter()) {
        assert_eq!((r.question.as_str(), r.answer.as_str(), r.category.as_str()), (CAPTION_PROMPT, c.caption.as_str(), "describe"));
        assert_eq!(image_hash(&r.image), image_hash(&c.image));
    }
    let vqa = w.part(StudyPart::Stage1).balanced_preferences(Split::Train, 4).unwrap().to_sft();
    let both = vqa.concat(&rows);
    assert_eq!(both.samples, [vqa.samples.clone(), rows.samples.clone()].concat());
    assert_eq!(both.category_counts()["describe"], 6);
}
