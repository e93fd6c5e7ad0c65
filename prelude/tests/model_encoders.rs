//! PIVOT's other encoder families against their reference libraries on random weights: DINOv2
//! (GELU, SwiGLU, registers), ViT, ViT-MAE and timm's ViT (and a converted MoCo v3 release).
//! Every hidden state, the last hidden state and the pooled output agree to 1e-4 relative error,
//! at the native input size and at another one (position-embedding interpolation). Fixtures come
//! from tests/python/make_encoder_fixtures.py; round trips go through transformers and timm.

mod common;
use common::*;
use pivot::model::{ImageProcessor, ResizeMode, Resample};
use pivot::prelude::*;
use std::process::Command;

const TOL: f64 = 1e-4;

fn encoder_fixture(name: &str) -> std::path::PathBuf {
    let dir = fixtures().join(name);
    assert!(dir.join("reference.safetensors").is_file(), "{} missing: run `make fixtures`", dir.display());
    dir
}

/// Compares our forward with the reference stored under `tag` (`""` for the native size,
/// `interp{i}.` for the others). Returns how many tensors were compared.
fn check_outputs(tower: &VisionTower, r: &Checkpoint, name: &str, tag: &str) -> usize {
    let out = tower.forward(&r.tensor(&format!("{tag}pixel_values")).unwrap()).unwrap();
    assert_eq!(out.hidden_states.len(), tower.num_layers() + 1);
    let mut pairs: Vec<(String, &Tensor, Tensor)> = out
        .hidden_states
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("{tag}hidden_states.{i}"), h, r.tensor(&format!("{tag}hidden_states.{i}")).unwrap()))
        .collect();
    pairs.push((format!("{tag}last_hidden_state"), &out.last_hidden_state, r.tensor(&format!("{tag}last_hidden_state")).unwrap()));
    let key = format!("{tag}pooler_output");
    match (r.contains(&key), &out.pooler_output) {
        (true, Some(p)) => pairs.push((key.clone(), p, r.tensor(&key).unwrap())),
        (false, None) => {}
        (theirs, _) => panic!("{name}: reference has a pooled output: {theirs}, ours: {}", out.pooler_output.is_some()),
    }
    let mut worst: f64 = 0.0;
    for (what, ours, theirs) in &pairs {
        assert_close(&format!("{name} {what}"), ours, theirs, TOL);
        worst = worst.max(rel_err(ours, theirs));
    }
    let size = out.hidden_states[0].size();
    println!("{name} {tag}: {} tensors, {} tokens, worst relative error {worst:.2e}", pairs.len(), size[1]);
    pairs.len()
}

/// Loads a fixture folder and checks every size recorded in its reference.
fn check_family(name: &str, family: VisionFamily) -> VisionTower {
    let dir = encoder_fixture(name);
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    assert_eq!(tower.family(), family, "{name}: family detected from config.json");
    let r = reference_in(&dir);
    check_outputs(&tower, &r, name, "");
    for i in 1..4 {
        if r.contains(&format!("interp{i}.pixel_values")) {
            check_outputs(&tower, &r, name, &format!("interp{i}."));
        }
    }
    tower
}

fn reference_in(dir: &std::path::Path) -> Checkpoint {
    Checkpoint::open(dir.join("reference.safetensors")).unwrap()
}

#[test]
fn dinov2_matches_transformers_at_native_and_interpolated_sizes() {
    let tower = check_family("dinov2", VisionFamily::Dinov2);
    let c = tower.config();
    assert_eq!((c.num_register_tokens, c.use_swiglu_ffn, c.intermediate_size), (0, false, 108));
    // 21×35 input: a 3×5 grid from the 4×4 position embeddings.
    let r = reference_in(&encoder_fixture("dinov2"));
    assert_eq!(r.tensor("interp1.last_hidden_state").unwrap().size(), vec![2, 1 + 15, 36]);
    // BitImageProcessor: shortest edge 32, centre crop 28, bicubic, ImageNet statistics.
    let p = tower.processor();
    assert_eq!((p.size, p.mode, p.resize_shortest, p.resample), (28, ResizeMode::ShortestEdgeCenterCrop, Some(32), Resample::Bicubic));
    assert_eq!(p.mean, [0.485, 0.456, 0.406]);
}

#[test]
fn dinov2_giant_swiglu_matches_transformers() {
    let tower = check_family("dinov2_swiglu", VisionFamily::Dinov2);
    // SwiGLU width: 2/3 of 4 × 24 = 64, a multiple of 8.
    assert!(tower.config().use_swiglu_ffn);
    assert_eq!(tower.config().intermediate_size, 64);
    assert_eq!(pivot::model::dinov2::swiglu_hidden(1536, 4.0), 4096, "DINOv2-g/14");
}

#[test]
fn dinov2_with_registers_matches_transformers_with_antialiased_interpolation() {
    let tower = check_family("dinov2_reg", VisionFamily::Dinov2);
    assert_eq!(tower.config().num_register_tokens, 3);
    assert_eq!(tower.config().num_prefix_tokens(), 4);
}

#[test]
fn vit_with_pooler_matches_transformers() {
    let tower = check_family("vit", VisionFamily::Vit);
    assert!(tower.config().use_pooler);
    let p = tower.processor();
    assert_eq!((p.size, p.mode, p.mean), (30, ResizeMode::Square, [0.5; 3]));
}

#[test]
fn vit_mae_runs_unmasked_with_patches_in_order() {
    let tower = check_family("vit_mae", VisionFamily::VitMae);
    assert_eq!(tower.config().mask_ratio, Some(0.75), "the released ratio is kept for the saved config");
    assert_eq!(tower.config().num_tokens(), 1 + 16, "every patch, none masked");
}

#[test]
fn timm_vit_matches_timm() {
    let tower = check_family("timm_vit", VisionFamily::Timm);
    let c = tower.config();
    assert_eq!(c.intermediate_size, 68, "int(40 × 1.7)");
    assert_eq!(c.timm.as_ref().unwrap().num_classes, 7);
    // pretrained_cfg: crop_pct 0.9 → shortest edge ⌊30 / 0.9⌋ = 33, then a 30-px centre crop.
    let p = tower.processor();
    assert_eq!((p.size, p.resize_shortest, p.resample, p.mean), (30, Some(33), Resample::Bicubic, [0.5; 3]));
    // timm towers are fixed-size, as timm's own.
    let err = tower.forward(&Tensor::zeros([1, 3, 36, 36], (Kind::Float, Device::Cpu))).err().expect("a 36-px input is refused").to_string();
    assert!(err.contains("30, 30"), "{err}");
}

#[test]
fn converted_moco_v3_release_matches_timm() {
    let dir = encoder_fixture("moco_v3/converted");
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    assert_eq!(tower.family(), VisionFamily::Timm);
    check_outputs(&tower, &reference_in(&dir), "moco_v3", "");
    // MoCo v3's evaluation transform: resize 256 → crop 224 (scaled: ⌊24 / 0.875⌋ = 27), bilinear.
    let p = tower.processor();
    assert_eq!((p.size, p.resize_shortest, p.resample), (24, Some(27), Resample::Bilinear));
    let ckpt = Checkpoint::open(&dir).unwrap();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    assert!(names.iter().all(|n| !n.starts_with("head.") && !n.starts_with("module.")), "{names:?}");
}

#[test]
fn pivot_feature_selection_per_family() {
    // DINOv2: PIVOT's wrapper feeds last_hidden_state without the class token (and registers).
    let dir = encoder_fixture("dinov2_reg");
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    let r = reference_in(&dir);
    let pixels = r.tensor("pixel_values").unwrap();
    let select = FeatureSelect::pivot(tower.config());
    assert_eq!((select.layer, select.final_norm, select.drop_class_token), (-1, true, true));
    let last = r.tensor("last_hidden_state").unwrap();
    assert_close("dinov2 patch tokens", &tower.features(&pixels, select).unwrap(), &last.narrow(1, 4, 25), TOL);
    let with_regs = FeatureSelect { keep_register_tokens: true, ..select };
    assert_close("dinov2 registers + patches", &tower.features(&pixels, with_regs).unwrap(), &last.narrow(1, 1, 28), TOL);
    let all = FeatureSelect { drop_class_token: false, ..select };
    assert_close("dinov2 all tokens", &tower.features(&pixels, all).unwrap(), &last, TOL);
    assert_eq!(tower.feature_token_count(with_regs), 28);

    // PIVOT's `-interp<N>`: patch tokens resampled bilinearly (reference: torch, in the fixture).
    let dino = encoder_fixture("dinov2");
    let tower = VisionTower::from_pretrained(&dino, Device::Cpu).unwrap();
    let r = reference_in(&dino);
    let select = FeatureSelect::pivot(tower.config()).resampled(9);
    let ours = tower.features(&r.tensor("pixel_values").unwrap(), select).unwrap();
    assert_close("dinov2 interp9", &ours, &r.tensor("pivot_patch_interp9").unwrap(), TOL);
    assert_eq!(tower.feature_token_count(select), 9);
    assert!(tower.features(&r.tensor("pixel_values").unwrap(), select.resampled(8)).is_err(), "8 is not a square");

    // timm (MAE, supervised, MoCo): forward_features without the class token.
    let dir = encoder_fixture("timm_vit");
    let tower = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap();
    let r = reference_in(&dir);
    let f = tower.features(&r.tensor("pixel_values").unwrap(), FeatureSelect::pivot(tower.config())).unwrap();
    assert_close("timm forward_features[:, 1:]", &f, &r.tensor("last_hidden_state").unwrap().narrow(1, 1, 25), TOL);

    // CLIP/SigLIP keep LLaVA's choice.
    assert_eq!(FeatureSelect::pivot(&VisionConfig::tiny()), FeatureSelect::penultimate());
}

#[test]
fn pivot_tower_names_resolve_to_presets_and_features() {
    let (cfg, select) = VisionConfig::from_pivot_name("facebook/dinov2-giant-res378-interp576").unwrap();
    assert_eq!((cfg.family, cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size), (VisionFamily::Dinov2, 1536, 40, 518));
    assert_eq!((cfg.input_size(), cfg.grid()), (378, 27));
    assert_eq!(select.resample_tokens, Some(576));
    let (mae, s) = VisionConfig::from_pivot_name("mae-vit-h-14").unwrap();
    assert_eq!((mae.family, mae.hidden_size, mae.num_hidden_layers, mae.patch_size), (VisionFamily::Timm, 1280, 32, 14));
    assert!(s.final_norm && s.layer == -1);
    let (sup, _) = VisionConfig::from_pivot_name("supervised-vit-h-14-in21k").unwrap();
    assert_eq!((sup.hidden_size, sup.processor.unwrap().mean), (1280, [0.5; 3]));
    let (moco, _) = VisionConfig::from_pivot_name("moco-vit-b-16").unwrap();
    assert_eq!((moco.hidden_size, moco.num_hidden_layers, moco.patch_size), (768, 12, 16));
    assert_eq!(moco.processor.unwrap().resize_shortest, Some(256));
    assert!(VisionConfig::from_pivot_name("facebook/dinov2-giant-res378-interpX").is_err());
    // A config saved before the new families existed still reads, as the tower it was.
    let old = serde_json::json!({"name": "tiny", "family": "Siglip", "hidden_size": 96, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "num_channels": 3,
        "layer_norm_eps": 1e-6, "hidden_act": "GeluTanh", "use_head": false, "projection_dim": null});
    assert_eq!(serde_json::from_value::<VisionConfig>(old).unwrap(), VisionConfig::tiny());
    for name in ["dinov2-giant", "mae-vit-huge-patch14", "vit-huge-patch14-in21k", "moco-vit-base-patch16", "vit-base-patch16-224", "vit-mae-huge"] {
        let cfg = VisionConfig::preset(name).unwrap();
        // The presets' configs parse back through their libraries' config.json.
        let back = VisionConfig::from_json(&cfg.to_hf_json(), name).unwrap();
        assert_eq!((back.family, back.hidden_size, back.intermediate_size, back.num_hidden_layers), (cfg.family, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers), "{name}");
    }
}

#[test]
fn bad_timm_and_dinov2_folders_name_the_problem() {
    let dir = temp_dir("bad-timm");
    let cfg = serde_json::json!({"architecture": "vit_base_patch16_224", "model_args": {"reg_tokens": 4}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model_args.reg_tokens") && err.contains("config.json"), "{err}");
    let cfg = serde_json::json!({"architecture": "eva02_large_patch14_448"});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("architecture") && err.contains("eva02"), "{err}");

    // A DINOv2 folder whose weights lack a layer-scale vector.
    let src = encoder_fixture("dinov2");
    let ckpt = Checkpoint::open(&src).unwrap();
    let kept: Vec<(String, Tensor)> = ckpt
        .names()
        .filter(|n| *n != "encoder.layer.1.layer_scale2.lambda1")
        .map(|n| (n.to_string(), ckpt.tensor(n).unwrap()))
        .collect();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    pivot::model::weights::write_safetensors(&kept, &dir.join("model.safetensors")).unwrap();
    let err = VisionTower::from_pretrained(&dir, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("encoder.layer.1.layer_scale2.lambda1"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Saves `tower` and our outputs on fixed pixels of side `size` beside it (ours.safetensors).
fn save_with_outputs(tower: &VisionTower, tag: &str, size: i64) -> (std::path::PathBuf, Tensor) {
    let dir = temp_dir(tag);
    tower.save_pretrained(&dir).unwrap();
    tch::manual_seed(7);
    let pixels = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
    let out = tower.forward(&pixels).unwrap();
    let mut tensors = vec![("pixel_values".to_string(), pixels.shallow_clone()), ("last_hidden_state".to_string(), out.last_hidden_state)];
    tensors.extend(out.hidden_states.into_iter().enumerate().map(|(i, h)| (format!("hidden_states.{i}"), h)));
    if let Some(p) = out.pooler_output {
        tensors.push(("pooler_output".into(), p));
    }
    pivot::model::weights::write_safetensors(&tensors, &dir.join("ours.safetensors")).unwrap();
    (dir, pixels)
}

/// Every family saved by us loads in its own library — transformers (DINOv2 with and without
/// registers, ViT, ViT-MAE) or timm (`local-dir:`) — with no missing or unexpected key, and
/// reproduces our hidden states and pooled outputs (one Python start-up for all); then loads
/// back here with the same processor and outputs.
#[test]
fn saved_encoders_load_in_transformers_and_timm() {
    let mut towers: Vec<(String, VisionTower, i64)> = [("dinov2", 21), ("dinov2_swiglu", 28), ("dinov2_reg", 28), ("vit", 30), ("vit_mae", 28), ("timm_vit", 30), ("moco_v3/converted", 24)]
        .into_iter()
        .map(|(name, size)| (name.replace('/', "-"), VisionTower::from_pretrained(encoder_fixture(name), Device::Cpu).unwrap(), size))
        .collect();
    tch::manual_seed(3);
    towers.push(("tiny-dinov2".into(), VisionTower::new(VisionConfig::tiny_dinov2(), Device::Cpu), 64));
    let saved: Vec<(std::path::PathBuf, Tensor)> = towers.iter().map(|(tag, t, size)| save_with_outputs(t, tag, *size)).collect();
    let out = Command::new(python())
        .arg(python_script("check_roundtrip.py"))
        .arg("vision")
        .args(saved.iter().map(|(d, _)| d))
        .output()
        .expect("running the round-trip check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "round trip failed:\n{text}");
    assert_eq!(text.matches("ROUNDTRIP OK").count(), towers.len(), "{text}");
    for ((tag, tower, _), (dir, pixels)) in towers.iter().zip(&saved) {
        let again = VisionTower::from_pretrained(dir, Device::Cpu).unwrap();
        assert_eq!(again.config().family, tower.config().family, "{tag}");
        assert_eq!(again.processor(), tower.processor(), "{tag}: the processor round-trips");
        let a = again.forward(pixels).unwrap().last_hidden_state;
        assert_close(&format!("{tag} reloaded"), &a, &tower.forward(pixels).unwrap().last_hidden_state, 1e-6);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn mllm_with_a_dinov2_tower_trains_probes_maps_and_aligns() {
    tch::manual_seed(0);
    let tower = VisionTower::new(VisionConfig::tiny_dinov2(), Device::Cpu);
    let config = MllmConfig::for_tower(tower.config()).with_select(FeatureSelect::pivot(tower.config()).resampled(16));
    let mut mllm = Mllm::new(tower, LanguageModel::tiny(Device::Cpu), config);
    assert_eq!(mllm.image_token_count(), 16, "8×8 patches resampled to 4×4, class and registers dropped");
    let world = ShapesWorld::new(ShapesConfig::default());
    let before: Vec<(String, Tensor)> = mllm.tower.var_store().variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    let cfg = DpoConfig { train: TrainConfig { lr: 1e-3, warmup_ratio: 0.0, ..TrainConfig::default() }.batch_size(2).max_steps(1).quiet(), ..Default::default() };
    let log = DpoTrainer::new(cfg).run(&mut mllm, &world.preferences(Split::Train, 2)).unwrap();
    assert_eq!(log.len(), 1);
    assert!((log.get("loss")[0] - std::f64::consts::LN_2).abs() < 1e-4, "policy = reference at step 0");
    let after = mllm.tower.var_store().variables();
    let moved = before.iter().filter(|(n, t)| !t.equal(&after[n])).count();
    assert!(moved > 0, "one DPO step moves the DINOv2 tower");

    // Gradient maps on the resampled token grid and on the tower's own.
    let prefs = world.preferences(Split::Val, 1);
    let map = GradMap::pivot(&mllm, &prefs[0], Objective::dpo(0.1)).unwrap();
    assert_eq!(map.token_map.size(), vec![4, 4]);
    let cam = GradMap::grad_cam(&mllm, &prefs[0], Objective::Sft, 2).unwrap();
    assert_eq!(cam.token_map.size(), vec![8, 8]);

    // Save and load in the PIVOT layout: the DINOv2 keys under model.vision_tower.vision_tower.
    let dir = temp_dir("dino-mllm");
    mllm.save_pretrained(&dir).unwrap();
    assert!(Checkpoint::open(&dir).unwrap().contains("model.vision_tower.vision_tower.embeddings.register_tokens"));
    let back = Mllm::from_pretrained(&dir, Device::Cpu).unwrap();
    let pixels = mllm.preprocess(&[world.vqa(Split::Val, 1)[0].image.load().unwrap()]).unwrap();
    assert_close("reloaded image tokens", &back.encode_images(&pixels).unwrap(), &mllm.encode_images(&pixels).unwrap(), 1e-6);
    let _ = std::fs::remove_dir_all(&dir);

    // The detached encoder: a linear probe (class + register tokens left out of the mean) and
    // Platonic alignment.
    let enc = mllm.encoder();
    let cache = temp_dir("dino-probe");
    let ex = FeatureExtractor::default().cache_dir(&cache).batch_size(16).quiet();
    let (train, val) = (world.classification(Split::Train, 24), world.classification(Split::Val, 12));
    let probe = LinearProbe { search: CSearch::Grid(vec![1.0]), ..Default::default() };
    let lp = probe.on(FeatureSpec::default().extractor(ex.clone())).fit(&enc, &train, &val).unwrap();
    assert_eq!((lp.num_features, lp.pooling), (96, Pooling::ClassToken));
    let pairs = world.image_text_pairs(Split::Val, 12);
    let al = Alignment::mutual_knn(3).extractor(ex).score_encoders(&enc, &enc, &pairs).unwrap();
    assert!(al.best > 0.999, "self-alignment {}", al.best);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn image_processor_reads_hf_and_timm_configs() {
    let bit = serde_json::json!({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
                                 "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]});
    assert_eq!(ImageProcessor::from_hf_json(&bit, "p.json").unwrap(), ImageProcessor::imagenet(224, 256));
    let bad = serde_json::json!({"size": {"height": 224, "width": 200}});
    assert!(ImageProcessor::from_hf_json(&bad, "p.json").unwrap_err().to_string().contains("`size`"));
    let timm = serde_json::json!({"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear"});
    let p = ImageProcessor::from_timm_json(&timm, 224, "c.json").unwrap();
    assert_eq!((p.resize_shortest, p.resample), (Some(256), Resample::Bilinear));
    // The saved pretrained_cfg gives the same processor back.
    assert_eq!(ImageProcessor::from_timm_json(&p.to_timm_json(3), 224, "c.json").unwrap(), p);
    // A 300×200 image: shortest edge → 256 (384×256), centre crop 224.
    let img = image::RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
    assert_eq!(p.resize(&img).dimensions(), (224, 224));
}

#[test]
fn transplant_keeps_every_feature_choice_of_the_donor() {
    // A DINOv2 donor read with PIVOT's `-interp16`: the fresh MLLM must read the same 16 tokens,
    // normed, without class and registers, not CLIP's default penultimate layer.
    let tower = VisionTower::new(VisionConfig::tiny_dinov2(), Device::Cpu);
    let select = FeatureSelect::pivot(tower.config()).resampled(16);
    let donor = Mllm::new(tower, LanguageModel::tiny(Device::Cpu), MllmConfig::default().with_select(select));
    let fresh = transplant(donor.encoder(), LanguageModel::tiny(Device::Cpu), MllmConfig::default());
    assert_eq!(fresh.config, MllmConfig::default().with_select(select));
    assert_eq!(fresh.image_token_count(), 16);
}
