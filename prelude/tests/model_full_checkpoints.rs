//! Full CLIP / SigLIP checkpoints, published with both towers (openai/clip-vit-*, google/siglip*):
//! `VisionTower::from_pretrained` takes the vision tower out of them (`vision_config`, the
//! `vision_model.` keys; the text tower's keys are left) and matches transformers' `vision_model`
//! on the same pixels, every hidden state at 1e-4 (fixtures: tests/python/make_study_fixtures.py,
//! written by `make fixtures` under $PIVOT_FIXTURES/study). Costs well under a second.

mod common;
use common::*;
use pivot::prelude::*;

fn check_full(name: &str) -> VisionTower {
    let dir = fixtures().join("study").join(name);
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    let r = Checkpoint::open(dir.join("reference.safetensors")).expect("reference outputs");
    let out = tower.forward(&r.tensor("pixel_values").unwrap()).unwrap();
    assert_eq!(out.hidden_states.len(), tower.config().num_hidden_layers as usize + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(&format!("{name} hidden_states.{i}"), h, &r.tensor(&format!("hidden_states.{i}")).unwrap(), 1e-4);
    }
    assert_close(&format!("{name} last_hidden_state"), &out.last_hidden_state, &r.tensor("last_hidden_state").unwrap(), 1e-4);
    tower
}

#[test]
fn full_siglip_model_gives_its_vision_tower() {
    let tower = check_full("siglip");
    assert_eq!(tower.config().family, VisionFamily::Siglip);
    assert_eq!(tower.config().hidden_size, 32, "the vision tower's width, not the text tower's");
}

#[test]
fn full_clip_model_gives_its_vision_tower() {
    let tower = check_full("clip");
    assert_eq!(tower.config().family, VisionFamily::Clip);
}
