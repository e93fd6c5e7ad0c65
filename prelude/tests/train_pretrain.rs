//! Tower pretraining (issue 14): deterministic for a seed on the CPU, cached in a folder with a
//! manifest of its settings (a changed setting trains afresh), and the tags it learns are the
//! scene's. One test: the run seeds the global torch generator. Eight runs of 3 or 4 steps on 8
//! scenes.

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
    let settings = TowerPretrain { scenes: 8, val_scenes: 4, steps: 3, batch_size: 4, ..TowerPretrain::default() }.quiet();
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
}
