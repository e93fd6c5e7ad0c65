//! Tower pretraining (issue 14): deterministic for a seed on the CPU, cached in a folder with a
//! manifest of its settings (a changed setting trains afresh), and the tags it learns are the
//! scene's; the patch objective's targets are the mask's majority class per patch, its loss joins
//! the tags' and trains, and its weight is a setting of the cache. One test: the run seeds the
//! global torch generator. Nine runs of 3 or 4 steps on 8 scenes without the patch objective, six
//! of 3 or 12 steps with it (two in its shape-only form).

use pivot::prelude::*;

fn state(encoder: &VisionEncoder) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        encoder.tower().var_store().variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn pretraining_is_deterministic_cached_and_retrained_when_a_setting_changes() {
    // The tags alone; the patch objective (on by default) is tested from the same start below.
    let settings =
        TowerPretrain { scenes: 8, val_scenes: 4, steps: 3, batch_size: 4, patch_weight: 0.0, ..TowerPretrain::default() }.quiet();
    let first = settings.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert_eq!(first.log.len(), 3);
    assert!((0.0..=1.0).contains(&first.val_tag_accuracy));
    let other_seed = settings.clone().seed(1).run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert!(!same(&state(&first.encoder), &state(&other_seed.encoder)));
    // The tower moved from its initialisation: pretraining trained it, not only the head.
    tch::manual_seed(0);
    let init = VisionTower::new(VisionConfig::tiny(), Device::Cpu);
    let init: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = init.var_store().variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert!(!same(&state(&first.encoder), &init));

    let dir = std::env::temp_dir().join(format!("pivot-test-pretrain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The second run of the same settings (here through the cache folder) is the first, bit for bit.
    let trained = settings.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap();
    assert!(!trained.from_cache);
    assert_eq!(first.log.get("loss"), trained.log.get("loss"), "same seed, different losses");
    assert!(same(&state(&trained.encoder), &state(&first.encoder)), "same seed, different weights");
    assert_eq!(first.val_tag_accuracy, trained.val_tag_accuracy);
    let loaded = settings.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap();
    assert!(loaded.from_cache);
    assert!(same(&state(&loaded.encoder), &state(&first.encoder)));
    // The log comes back from JSON (serde_json's float parsing may differ in the last bit).
    assert_eq!(loaded.log.len(), trained.log.len());
    assert!(loaded.log.get("loss").iter().zip(trained.log.get("loss")).all(|(a, b)| (a - b).abs() < 1e-12));
    assert_eq!(loaded.val_tag_accuracy, trained.val_tag_accuracy);
    assert_eq!(loaded.encoder.select(), trained.encoder.select());
    // The live flag is not a setting of the result; the step count is.
    let mut live = settings.clone();
    live.live = true;
    assert!(live.quiet().load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    let longer = settings.clone().steps(4).load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap();
    assert!(!longer.from_cache);
    assert_eq!(longer.log.len(), 4);
    assert!(settings.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).map(|t| !t.from_cache).unwrap());
    // An MLLM around it reads the tower's weights.
    let mllm = loaded.mllm(LanguageModel::tiny(Device::Cpu)).unwrap();
    assert!(same(&state(&mllm.encoder()), &state(&loaded.encoder)));
    let _ = std::fs::remove_dir_all(&dir);

    // The tags are the scene's.
    let world = ShapesWorld::new(ShapesConfig::default()).part(StudyPart::Pretrain);
    let scene = world.scene(Split::Train, 3);
    let tags = pretrain_tags(&scene);
    let names = pretrain_tag_names();
    assert_eq!(tags.len(), names.len());
    for (name, tag) in names.iter().zip(&tags) {
        let expected = match name.split_once(':').unwrap() {
            ("colour", c) => scene.objects.iter().any(|o| o.colour.name() == c),
            ("shape", s) => scene.objects.iter().any(|o| o.shape.name() == s),
            ("large", s) => scene.main_object().shape.name() == s,
            ("large_group", g) => scene.main_object().colour.group().name() == g,
            ("background", t) => scene.background.texture.adjective() == t,
            ("objects", k) => scene.objects.len() == k.parse::<usize>().unwrap(),
            other => panic!("unknown tag {other:?}"),
        };
        assert_eq!(*tag == 1.0, expected, "tag {name}");
    }
    assert!(TowerPretrain { batch_size: 64, scenes: 32, ..TowerPretrain::default() }.run(VisionConfig::tiny(), Device::Cpu).is_err());
    // Every one-hot group has exactly one true tag per scene, and a top-1 score after a run.
    for group in ONE_HOT_GROUPS {
        let on = names.iter().zip(&tags).filter(|(n, t)| n.split_once(':').unwrap().0 == group && **t == 1.0).count();
        assert_eq!(on, 1, "group {group}");
    }
    assert_eq!(first.val_group_top1.iter().map(|(g, _)| g.as_str()).collect::<Vec<_>>(), ONE_HOT_GROUPS);
    assert!(first.val_group_top1.iter().all(|(_, a)| (0.0..=1.0).contains(a)));
    // The categorical objective is another loss from the same start (step 1's loss differs), and
    // another setting of the cache.
    let categorical = TowerPretrain { categorical_groups: true, ..settings.clone() };
    let cat = categorical.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert_ne!(cat.log.get("loss")[0], first.log.get("loss")[0]);
    assert!(cat.log.get("loss").iter().all(|l| l.is_finite() && *l > 0.0));
    let dir = std::env::temp_dir().join(format!("pivot-test-pretrain-cat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!settings.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    assert!(!categorical.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    let again = categorical.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap();
    assert!(again.from_cache);
    assert!(again.val_group_top1.iter().zip(&cat.val_group_top1).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-12));
    let _ = std::fs::remove_dir_all(&dir);

    // The patch objective's targets: per cell of the grid (row-major), the class covering most
    // of its pixels, ties to the lower class; the class is the mask value, plus 6 for the large
    // object's shape.
    let mask = image::GrayImage::from_fn(4, 4, |x, y| image::Luma([match (x, y) {
        (0..=1, 0..=1) => if x == 0 { 3 } else { 0 }, // cell (0, 0): two 3s, two 0s: a tie
        (2..=3, 0..=1) => if (x, y) == (2, 0) { 0 } else { 5 }, // cell (0, 1): three 5s
        (0..=1, _) => 6,
        _ => if y == 3 { 2 } else { 1 }, // cell (1, 1): two 1s, two 2s: a tie
    }]));
    assert_eq!(patch_targets(&mask, 2, None), vec![0, 5, 6, 1]);
    assert_eq!(patch_targets(&mask, 4, None), mask.pixels().map(|p| p.0[0] as i64).collect::<Vec<_>>());
    assert_eq!(Shape::Star.mask_value(), 5);
    assert_eq!(patch_targets(&mask, 2, Some(Shape::Star)), vec![0, 11, 6, 1]);
    // Cell (1, 1)'s tie is now 2 against 7 (the large circle): the lower class wins.
    assert_eq!(patch_targets(&mask, 2, Some(Shape::Circle)), vec![0, 5, 6, 2]);
    let rendered = world.render(Split::Train, 3);
    let grid = VisionConfig::tiny().grid() as usize;
    let large = rendered.scene.main_object().shape;
    let targets = patch_targets(&rendered.mask, grid, Some(large));
    assert_eq!(targets.len(), grid * grid);
    assert!(targets.iter().all(|t| (0..PATCH_CLASSES).contains(t)));
    assert!(targets.contains(&(large.mask_value() as i64 + 6)), "the large object covers a patch");
    assert!(!targets.contains(&(large.mask_value() as i64)), "the large object's shape counted as small");
    // Its loss joins the tags' (step 1 differs from the same start without it), is logged, and
    // trains: over 12 steps on 8 scenes the patch loss falls.
    let patches = TowerPretrain { patch_weight: 1.0, ..settings.clone() };
    let with = patches.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert_ne!(with.log.get("loss")[0], first.log.get("loss")[0]);
    assert_eq!(with.log.get("patch_loss").len(), 3);
    assert!(first.log.get("patch_loss").is_empty());
    assert_eq!(with.val_group_top1.last().map(|(g, _)| g.as_str()), Some("patches"));
    assert!((0.0..=1.0).contains(&with.val_group_top1.last().unwrap().1));
    let shape_only = TowerPretrain { patch_shape_only: true, ..patches.clone() }.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert_ne!(shape_only.log.get("patch_loss")[0], with.log.get("patch_loss")[0]);
    let again = patches.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    assert_eq!(with.log.get("loss"), again.log.get("loss"), "same seed, different losses with patches");
    assert!(same(&state(&with.encoder), &state(&again.encoder)));
    let long = TowerPretrain { steps: 12, warmup_ratio: 0.0, ..patches.clone() }.run(VisionConfig::tiny(), Device::Cpu).unwrap();
    let patch_loss = long.log.get("patch_loss");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&patch_loss[9..]) < 0.8 * mean(&patch_loss[..3]), "patch loss did not fall: {patch_loss:?}");
    // Its weight is a setting of the cache; at 0 it is left out of the manifest, so that caches
    // made before it existed stay valid.
    let dir = std::env::temp_dir().join(format!("pivot-test-pretrain-patch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings_in = |dir: &std::path::Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["manifest"]["settings"].clone()
    };
    assert!(!settings.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    assert!(settings_in(&dir).get("patch_weight").is_none());
    assert!(!patches.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    assert_eq!(settings_in(&dir)["patch_weight"], 1.0);
    assert!(settings_in(&dir).get("patch_shape_only").is_none());
    assert!(patches.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    let shape_only = TowerPretrain { patch_shape_only: true, ..patches.clone() };
    assert!(!shape_only.load_or_run(VisionConfig::tiny(), &dir, Device::Cpu).unwrap().from_cache);
    assert_eq!(settings_in(&dir)["patch_shape_only"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
