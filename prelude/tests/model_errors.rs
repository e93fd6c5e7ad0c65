//! Bad checkpoints and configs give errors that name the file, tensor or field.

mod common;
use common::*;
use pivot::prelude::*;
use std::fs;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = temp_dir("truncated");
    copy_dir(&fixtures().join("siglip"), &dir);
    let file = dir.join("model.safetensors");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(VisionTower::from_pretrained(&dir, Device::Cpu));
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("truncated or corrupt"), "{msg}");
}

#[test]
fn missing_tensor_is_named_with_its_expected_shape() {
    let dir = temp_dir("missing");
    copy_dir(&fixtures().join("siglip"), &dir);
    let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let kept: Vec<(String, Tensor)> = ckpt
        .names()
        .filter(|n| !n.ends_with("encoder.layers.1.mlp.fc2.weight"))
        .map(|n| (n.to_string(), ckpt.tensor(n).unwrap()))
        .collect();
    drop(ckpt);
    pivot::model::weights::write_safetensors(&kept, &dir.join("model.safetensors")).unwrap();
    let err = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap_err();
    match &err {
        PivotError::MissingTensor { name, expected, .. } => {
            assert!(name.ends_with("encoder.layers.1.mlp.fc2.weight"), "{name}");
            assert_eq!(expected, &vec![40, 72]);
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    assert!(err.to_string().contains("encoder.layers.1.mlp.fc2.weight"));
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let dir = temp_dir("shape");
    copy_dir(&fixtures().join("siglip"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 73.into();
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap_err();
    match &err {
        PivotError::ShapeMismatch { name, expected, found, .. } => {
            assert!(name.contains("mlp.fc"), "{name}");
            assert!(expected.contains(&73) && found.contains(&72), "{expected:?} vs {found:?}");
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn bad_config_field_names_file_and_field() {
    let dir = temp_dir("badcfg");
    copy_dir(&fixtures().join("qwen2_tied"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_key_value_heads"] = "two".into();
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_text(LanguageModel::from_pretrained(&dir, Device::Cpu));
    assert!(msg.contains("config.json") && msg.contains("num_key_value_heads"), "{msg}");

    cfg["num_key_value_heads"] = 3.into(); // 4 heads are not divisible into 3 groups
    fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_text(LanguageModel::from_pretrained(&dir, Device::Cpu));
    assert!(msg.contains("num_attention_heads") && msg.contains("not divisible"), "{msg}");

    fs::write(&cfg_path, "{ not json").unwrap();
    let msg = err_text(LanguageModel::from_pretrained(&dir, Device::Cpu));
    assert!(msg.contains("config.json") && msg.contains("invalid JSON"), "{msg}");
}

#[test]
fn unknown_preset_and_unsupported_tower_are_explained() {
    let msg = err_text(VisionConfig::preset("vit-huge"));
    assert!(msg.contains("vit-huge") && msg.contains("siglip2-so400m-patch16-384"), "{msg}");
    let v = serde_json::json!({"model_type": "siglip2_vision_model"});
    let msg = err_text(VisionConfig::from_json(&v, "x/config.json"));
    assert!(msg.contains("NaFlex"), "{msg}");
}

#[test]
fn presets_have_the_published_shapes() {
    let so = VisionConfig::preset("siglip2-so400m-patch16-384").unwrap();
    assert_eq!((so.num_patches(), so.hidden_size, so.num_hidden_layers), (576, 1152, 27));
    let clip = VisionConfig::preset("clip-vit-large-patch14-336").unwrap();
    assert_eq!((clip.num_patches(), clip.num_tokens(), clip.hidden_act), (576, 577, pivot::model::Activation::QuickGelu));
    let q = Qwen2Config::preset("qwen2.5-1.5b").unwrap();
    assert_eq!((q.hidden_size, q.head_dim, q.num_key_value_heads, q.tie_word_embeddings), (1536, 128, 2, true));
}

#[test]
fn chat_labels_cover_only_the_answer_and_its_end_token() {
    let mllm = Mllm::tiny(Device::Cpu);
    let e = mllm.encode_chat("<image>\nWhat colour is the square ?", Some("The square is red .")).unwrap();
    assert_eq!(e.ids.iter().filter(|&&i| i == IMAGE_TOKEN_INDEX).count(), 1);
    let answer = mllm.tokenizer().encode("The square is red .").unwrap();
    let labelled: Vec<i64> = e.labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
    let mut expected = answer.clone();
    expected.push(mllm.tokenizer().im_end);
    assert_eq!(labelled, expected);
    // The labelled tokens sit exactly at the end of the assistant turn.
    let first = e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    assert_eq!(&e.ids[first..first + expected.len()], expected.as_slice());
}

#[test]
fn splicing_masks_image_positions_and_truncates() {
    let mut mllm = Mllm::tiny(Device::Cpu);
    mllm.config.max_length = 70;
    let e = mllm.encode_chat("What colour is the square ?", Some("The square is red .")).unwrap();
    let pixels = Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let out = mllm.forward(&pixels, std::slice::from_ref(&e), &[0]).unwrap();
    assert_eq!(out.hidden.size()[1], 70, "truncated to max_length");
    let k = e.ids.iter().position(|&i| i == IMAGE_TOKEN_INDEX).unwrap() as i64;
    let labels = Vec::<i64>::try_from(out.labels.get(0)).unwrap();
    assert!(labels[k as usize..(k + 64).min(70) as usize].iter().all(|&l| l == IGNORE_INDEX));
    let err = mllm.forward(&pixels, &[e.clone(), e], &[0, 1]).err().expect("image index out of range");
    assert!(err.to_string().contains("only 1 were encoded"), "{err}");
}

#[test]
fn bf16_weights_run_through_the_same_path_with_fp32_log_probs() {
    tch::manual_seed(5);
    let mllm = Mllm::tiny(Device::Cpu);
    let e = mllm.encode_chat("What colour is the square ?", Some("The square is red .")).unwrap();
    let pixels = Tensor::randn([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let f32_logp = mllm.sequence_logps(&mllm.forward(&pixels, std::slice::from_ref(&e), &[0]).unwrap()).unwrap();
    let bf16 = mllm.clone().to_kind(Kind::BFloat16);
    assert_eq!(bf16.tower.kind(), Kind::BFloat16);
    let out = bf16.forward(&pixels, std::slice::from_ref(&e), &[0]).unwrap();
    assert_eq!(out.hidden.kind(), Kind::BFloat16);
    let logp = bf16.sequence_logps(&out).unwrap();
    assert_eq!(logp.kind(), Kind::Float);
    // bf16 keeps ~3 significant digits; the summed log-prob of ~6 tokens stays within a few %.
    assert_close("bf16 vs f32 answer log-prob", &logp, &f32_logp, 0.05);
}
