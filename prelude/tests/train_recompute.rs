//! Activation checkpointing (recompute in backward) of the tower's and the LM's layers trains
//! exactly as without it: SFT and DPO steps on the tiny MLLM end with bitwise-equal weights and
//! losses, with recomputation of the tower alone (SFT) or of tower and LM (DPO); DINOv2 and ViT
//! towers (HF and timm layouts) give bitwise-equal gradients with and without it.

use pivot::model::{FeatureSelect, VisionConfig, VisionTower};
use pivot::prelude::*;

fn weights(m: &Mllm) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (p, vs) in [("t.", m.tower.var_store()), ("p.", m.projector.var_store()), ("l.", m.lm.var_store())] {
        v.extend(vs.variables().into_iter().map(|(n, t)| (format!("{p}{n}"), t.detach().copy())));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_identical(what: &str, a: &Mllm, b: &Mllm) {
    for ((n, x), (_, y)) in weights(a).iter().zip(weights(b)) {
        assert!(x.equal(&y), "{what}: {n} differs (max |Δ| {:e})", (x - &y).abs().max().double_value(&[]));
    }
}

fn losses(log: &TrainLog) -> Vec<f64> {
    log.rows.iter().map(|r| r.get("loss").unwrap()).collect()
}

#[test]
fn sft_and_dpo_steps_equal_with_and_without_recompute() {
    let world = ShapesWorld::new(ShapesConfig::default());
    let vqa = world.vqa(Split::Train, 8);
    let pairs = world.preferences(Split::Train, 8);
    tch::manual_seed(5);
    let init = Mllm::tiny(Device::Cpu);
    let cfg = TrainConfig { lr: 1e-3, warmup_ratio: 0.0, ..TrainConfig::default() }.batch_size(4).max_steps(2).quiet();

    let mut plain = init.clone();
    let plain_log = SftTrainer::new(cfg.clone()).run(&mut plain, &vqa).unwrap();
    // The tower alone here (a switch per module); both under DPO below. About 10 s of CPU.
    for (tower, lm) in [(true, false)] {
        let mut m = init.clone();
        let log = SftTrainer::new(TrainConfig { recompute_tower: tower, recompute_lm: lm, ..cfg.clone() }).run(&mut m, &vqa).unwrap();
        assert_eq!(losses(&log), losses(&plain_log));
        assert_identical(&format!("SFT, recompute tower {tower} LM {lm}"), &m, &plain);
        assert!(!m.tower.recomputes() && !m.lm.recomputes(), "the run leaves the model as it found it");
    }

    let dpo = |recompute: bool| {
        let mut m = init.clone();
        let c = DpoConfig { train: TrainConfig { recompute_tower: recompute, recompute_lm: recompute, ..cfg.clone() }, ..DpoConfig::default() };
        let log = DpoTrainer::new(c).run(&mut m, &pairs).unwrap();
        (m, losses(&log))
    };
    let ((a, la), (b, lb)) = (dpo(false), dpo(true));
    assert_eq!(la, lb);
    assert_identical("DPO", &a, &b);
    assert!(weights(&a).iter().zip(weights(&init)).any(|((_, x), (_, y))| !x.equal(&y)), "DPO did not train");
}

/// Every gradient of a backward through the tower's features (weights by name, then the pixels).
fn tower_gradients(tower: &VisionTower, pixels: &Tensor, probe: &Tensor) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = tower.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.push(("pixels".into(), pixels.shallow_clone()));
    for (_, t) in &vars {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let features = tower.features(pixels, FeatureSelect::pivot(tower.config())).unwrap();
    (features * probe).sum(Kind::Float).backward();
    // Tensors the features do not reach (ViT's pooler, DINOv2's mask token) have none: zeros.
    vars.into_iter().map(|(n, t)| (n, if t.grad().defined() { t.grad().copy() } else { t.zeros_like() })).collect()
}

/// DINOv2 (registers, SwiGLU and layer scale; and the plain GELU one), HF ViT and ViT-MAE, and a
/// timm-layout ViT, each tiny and random: with every encoder layer recomputed in backward the
/// gradients of every weight and of the pixels are bitwise those of the plain backward.
#[test]
fn dinov2_and_vit_towers_recompute_with_identical_gradients() {
    let shape = serde_json::json!({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32, "patch_size": 8});
    let hf = |model_type: &str| {
        let mut v = shape.clone();
        v["model_type"] = model_type.into();
        v["mlp_ratio"] = 2.into();
        VisionConfig::from_json(&v, &format!("tiny {model_type}")).unwrap()
    };
    let timm = serde_json::json!({"architecture": "vit_base_patch16_224", "num_classes": 0,
        "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0}});
    let configs = [VisionConfig::tiny_dinov2(), hf("dinov2"), hf("vit"), hf("vit_mae"), VisionConfig::from_json(&timm, "tiny timm").unwrap()];
    for cfg in configs {
        tch::manual_seed(0);
        let tower = VisionTower::new(cfg.clone(), Device::Cpu);
        let size = cfg.input_size();
        let pixels = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let tokens = tower.feature_token_count(FeatureSelect::pivot(&cfg));
        let probe = Tensor::randn([2, tokens, cfg.hidden_size], (Kind::Float, Device::Cpu));
        let plain = tower_gradients(&tower, &pixels, &probe);
        tower.set_recompute(true);
        assert!(tower.recomputes(), "{}: the switch did not stick", cfg.name);
        let recomputed = tower_gradients(&tower, &pixels, &probe);
        tower.set_recompute(false);
        let mut reached = 0;
        for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
            assert!(a.equal(b), "{} ({:?}): the gradient of {name} differs with recompute", cfg.name, cfg.family);
            reached += (a.abs().sum(Kind::Float).double_value(&[]) > 0.0) as usize;
        }
        // The layers' weights and the pixels get gradients (not a comparison of zeros).
        assert!(reached > 3 * 8, "{}: only {reached} of {} tensors have a gradient", cfg.name, plain.len());
    }
}
