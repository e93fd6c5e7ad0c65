//! Our models against `transformers` on random weights: every hidden state and the logits must
//! agree to 1e-4 relative error in f32 (fixtures from tests/python/make_parity_fixtures.py).

mod common;
use common::*;
use pivot::prelude::*;
use std::process::Command;

const TOL: f64 = 1e-4;

fn check_tower(name: &str) -> VisionTower {
    let dir = fixtures().join(name);
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    assert_eq!(tower.kind(), Kind::Float, "weights keep the dtype asked for, not the file's");
    let r = reference(name);
    let out = tower.forward(&r.tensor("pixel_values").unwrap()).unwrap();
    let n = tower.config().num_hidden_layers as usize;
    assert_eq!(out.hidden_states.len(), n + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(&format!("{name} hidden_states.{i}"), h, &r.tensor(&format!("hidden_states.{i}")).unwrap(), TOL);
    }
    assert_close(&format!("{name} last_hidden_state"), &out.last_hidden_state, &r.tensor("last_hidden_state").unwrap(), TOL);
    if r.contains("pooler_output") {
        assert_close(&format!("{name} pooler_output"), out.pooler_output.as_ref().unwrap(), &r.tensor("pooler_output").unwrap(), TOL);
    }
    tower
}

#[test]
fn clip_tower_matches_transformers() {
    let tower = check_tower("clip");
    assert_eq!(tower.config().family, VisionFamily::Clip);
    // LLaVA-1.5 features: hidden_states[-2] without the class token.
    let r = reference("clip");
    let f = tower.features(&r.tensor("pixel_values").unwrap(), FeatureSelect::penultimate()).unwrap();
    let expected = r.tensor("hidden_states.2").unwrap();
    assert_close("clip features", &f, &expected.narrow(1, 1, 25), TOL);
}

#[test]
fn siglip_tower_with_map_head_matches_transformers() {
    let tower = check_tower("siglip");
    assert!(tower.config().use_head);
}

#[test]
fn bf16_checkpoint_loads_into_f32_weights() {
    check_tower("siglip_bf16");
}

fn check_lm(name: &str) -> LanguageModel {
    let lm = LanguageModel::from_pretrained(fixtures().join(name), Device::Cpu).unwrap();
    let r = reference(name);
    let ids = r.tensor("input_ids").unwrap();
    let mask = r.tensor("attention_mask").unwrap();
    let out = lm.forward_embeds(&lm.embed(&ids), &mask, true, None).unwrap();
    let logits = lm.logits(&out.last_hidden);
    let theirs = r.tensor("logits").unwrap();
    // Row 1 is right-padded after 8 tokens: padded positions are not compared.
    assert_close(&format!("{name} logits row 0"), &logits.get(0), &theirs.get(0), TOL);
    assert_close(&format!("{name} logits row 1"), &logits.get(1).narrow(0, 0, 8), &theirs.get(1).narrow(0, 0, 8), TOL);
    assert_eq!(out.hidden_states.len(), lm.num_layers() + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        let t = r.tensor(&format!("hidden_states.{i}")).unwrap();
        assert_close(&format!("{name} hidden_states.{i} row 0"), &h.get(0), &t.get(0), TOL);
        assert_close(&format!("{name} hidden_states.{i} row 1"), &h.get(1).narrow(0, 0, 8), &t.get(1).narrow(0, 0, 8), TOL);
    }
    // Greedy decoding with the KV cache reproduces transformers' generate().
    let prompt = r.tensor("generate_prompt").unwrap();
    let ours = lm
        .generate_from_embeds(&lm.embed(&prompt), &Tensor::ones(prompt.size(), (Kind::Int64, Device::Cpu)), 5, &[])
        .unwrap();
    let theirs: Vec<i64> = Vec::try_from(r.tensor("generate_output").unwrap().get(0)).unwrap();
    assert_eq!(ours[0], theirs, "{name} greedy generation");
    lm
}

#[test]
fn qwen2_untied_gqa3_sharded_matches_transformers() {
    let lm = check_lm("qwen2_untied");
    let c = lm.config();
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.num_attention_heads / c.num_key_value_heads, 3);
    assert_eq!(c.rope_theta, 5000.0, "rope_theta read from transformers-5 `rope_parameters`");
}

#[test]
fn qwen2_tied_matches_transformers() {
    let lm = check_lm("qwen2_tied");
    assert!(lm.config().tie_word_embeddings);
}

#[test]
fn tokenizer_json_matches_transformers_ids() {
    let dir = fixtures().join("tokenizer");
    let tok = Tokenizer::from_file(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let texts = cases["texts"].as_array().unwrap();
    let ids = cases["ids"].as_array().unwrap();
    for (t, i) in texts.iter().zip(ids) {
        let expected: Vec<i64> = i.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(tok.encode(t.as_str().unwrap()).unwrap(), expected, "text {t}");
    }
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(tok.im_start));
}

#[test]
fn pivot_layout_mllm_matches_hand_written_llava_splicing() {
    let dir = fixtures().join("pivot_mllm");
    let mllm = Mllm::from_pretrained(&dir, Device::Cpu).unwrap();
    // The stored tower lacks its last layer (PIVOT); the projector reads the last stored one.
    assert_eq!(mllm.tower.num_layers(), 2);
    assert_eq!(mllm.config.select_layer, -1);
    let r = reference("pivot_mllm");
    let pixels = r.tensor("pixel_values").unwrap();
    let image_tokens = mllm.encode_images(&pixels).unwrap();
    assert_close("projected image tokens", &image_tokens, &r.tensor("image_tokens").unwrap(), TOL);

    let flat: Vec<Vec<i64>> = Vec::try_from(r.tensor("seq_ids").unwrap()).unwrap();
    let seqs: Vec<Encoded> = flat
        .iter()
        .map(|row| {
            let ids: Vec<i64> = row.iter().copied().filter(|&i| i != -1).collect();
            Encoded { labels: vec![IGNORE_INDEX; ids.len()], ids }
        })
        .collect();
    let out = mllm.forward(&pixels, &seqs, &[0, 1]).unwrap();
    let mask = r.tensor("attention_mask").unwrap();
    assert_eq!(Vec::<i64>::try_from(out.attention_mask.flatten(0, -1)).unwrap(), Vec::<i64>::try_from(mask.flatten(0, -1)).unwrap());
    let logits = mllm.logits(&out);
    let theirs = r.tensor("logits").unwrap();
    let len1 = mask.get(1).sum(Kind::Int64).int64_value(&[]);
    assert_close("mllm logits row 0", &logits.get(0), &theirs.get(0), TOL);
    assert_close("mllm logits row 1", &logits.get(1).narrow(0, 0, len1), &theirs.get(1).narrow(0, 0, len1), TOL);
}

fn run_python_check(kind: &str, dir: &std::path::Path) {
    let out = Command::new(python())
        .arg(python_script("check_roundtrip.py"))
        .arg(kind)
        .arg(dir)
        .output()
        .expect("running the transformers round-trip check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "transformers round trip failed for {}:\n{text}", dir.display());
    assert!(text.contains("ROUNDTRIP OK"), "unexpected checker output:\n{text}");
}

/// Saves `tower` with our outputs on fixed pixels beside it, then lets `transformers` load it
/// (no missing / unexpected keys, no warnings) and reproduce those outputs.
fn tower_round_trip(tower: &VisionTower, tag: &str) {
    let dir = temp_dir(tag);
    tower.save_pretrained(&dir).unwrap();
    tch::manual_seed(7);
    let s = tower.config().image_size;
    let pixels = Tensor::randn([2, 3, s, s], (Kind::Float, Device::Cpu));
    let out = tower.forward(&pixels).unwrap();
    let mut tensors = vec![("pixel_values".to_string(), pixels), ("last_hidden_state".to_string(), out.last_hidden_state)];
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        tensors.push((format!("hidden_states.{i}"), h));
    }
    if let Some(p) = out.pooler_output {
        tensors.push(("pooler_output".into(), p));
    }
    pivot::model::weights::write_safetensors(&tensors, &dir.join("ours.safetensors")).unwrap();
    run_python_check("vision", &dir);
    let again = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    assert_eq!(again.config().hidden_size, tower.config().hidden_size);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn saved_towers_load_in_transformers_and_reproduce_our_outputs() {
    tower_round_trip(&VisionTower::from_pretrained(fixtures().join("clip"), Device::Cpu).unwrap(), "clip");
    tower_round_trip(&VisionTower::from_pretrained(fixtures().join("siglip"), Device::Cpu).unwrap(), "siglip");
    tch::manual_seed(3);
    tower_round_trip(&VisionTower::new(VisionConfig::tiny(), Device::Cpu), "tiny");
}

#[test]
fn saved_language_model_loads_in_transformers() {
    let lm = LanguageModel::from_pretrained(fixtures().join("qwen2_untied"), Device::Cpu).unwrap();
    let dir = temp_dir("qwen2");
    lm.save_pretrained(&dir).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 13, 21, 8, 3]).view([1, 6]);
    let mask = Tensor::ones([1, 6], (Kind::Int64, Device::Cpu));
    let logits = lm.forward(&ids, &mask).unwrap();
    pivot::model::weights::write_safetensors(
        &[("input_ids".into(), ids), ("attention_mask".into(), mask), ("logits".into(), logits)],
        &dir.join("ours.safetensors"),
    )
    .unwrap();
    run_python_check("qwen2", &dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mllm_save_and_load_round_trip_in_pivot_layout() {
    tch::manual_seed(11);
    let mllm = Mllm::tiny(Device::Cpu);
    let dir = temp_dir("mllm");
    mllm.save_pretrained(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.contains("model.mm_projector.0.weight"));
    assert!(ckpt.contains("model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"));
    assert!(
        !ckpt.contains("model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"),
        "the layer after the feature layer is not stored (PIVOT layout)"
    );
    let back = Mllm::from_pretrained(&dir, Device::Cpu).unwrap();
    let pixels = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let seq = mllm.encode_chat("What colour is the square?", Some("The square is red.")).unwrap();
    let a = mllm.sequence_logps(&mllm.forward(&pixels, std::slice::from_ref(&seq), &[0]).unwrap()).unwrap();
    let b = back.sequence_logps(&back.forward(&pixels, std::slice::from_ref(&seq), &[0]).unwrap()).unwrap();
    assert_close("reloaded answer log-prob", &b, &a, 1e-6);
    assert_eq!(back.provenance, mllm.provenance);
    let _ = std::fs::remove_dir_all(dir);
}
