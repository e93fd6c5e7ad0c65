#!/usr/bin/env python3
"""Generates the study notebooks: the single source of truth for notebooks/*.ipynb.

    python notebooks/build.py           # (re)write every notebook, outputs empty
    python notebooks/build.py --check   # exit 1 if a committed notebook differs from this script

Every notebook runs on the "Rust (PIVOT)" kernel (`use pivot::prelude::*;` already ran). Its first
code cell is tagged `parameters`: sizes, steps, seeds, device, output folder and checkpoint paths as
`let` bindings. `pivot-kernel run NB.ipynb -p steps=200` (or papermill) adds a cell tagged
`injected-parameters` right after it, so the same notebook runs at CI size on a CPU and at full size
on a GPU with real checkpoints. Values derived from parameters are computed in later cells, so an
override reaches them. The last cell of every notebook asserts the notebook's key outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "pivot", "display_name": "Rust (PIVOT)", "language": "rust"}
LANGUAGE_INFO = {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"}


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    header = (
        "// Parameters: `pivot-kernel run NB.ipynb -p name=value` or papermill override these.\n"
        "// Paths are `String`s (a top-level `&str` cannot be kept between cells): -p 'out_dir=String::from(\"/x\")'.\n"
    )
    return code(header + text.strip("\n").replace("\n\n", "\n"), "parameters")


# Shared text of the parameters every notebook has.
COMMON = """
let seed: u64 = 0;
let device = Device::Cpu;          // `cuda_if_available()` on a GPU machine
let out_dir = String::from("out/notebooks");   // checkpoints, CSVs, figures (relative to the kernel's cwd)
"""

# A base MLLM: from `base_path` (default `{out_dir}/base`, written by 02) if it holds one, else
# built here with a short stage 1 and saved there, so 03 and 04 also run on their own.
LOAD_BASE = """
let base_dir: String = if base_path.is_empty() { format!("{out_dir}/base") } else { base_path.clone() };
let base: Mllm = if std::path::Path::new(&base_dir).join("config.json").exists() {
    println!("loading the base MLLM from {base_dir}");
    Mllm::from_pretrained(&base_dir, device)?
} else {
    println!("no base MLLM in {base_dir}: running a short stage 1 (what 02_base_mllm does)");
    let mut m = Mllm::tiny(device);
    let mut st = Stage1::default().seed(seed);
    st.projector = st.projector.max_steps(fallback_steps).batch_size(batch_size).lr(1e-3).quiet();
    st.full = st.full.max_steps(fallback_steps).batch_size(batch_size).lr(1e-3).quiet();
    st.run(&mut m, &world.captions(Split::Train, n_train), &world.vqa(Split::Train, n_train))?;
    m.save_pretrained(&base_dir)?;
    m
};
println!("{}", base.summary());
"""


def nb01():
    return [
        md("""
# 01 · Quick start: a vision tower, a language model and one MLLM forward pass

The study ("RL makes MLLMs see better than SFT", Song et al. 2025) trains a LLaVA-style MLLM:
a **vision tower** (CLIP / SigLIP) turns an image into patch features, an `mlp2x_gelu` **projector**
maps the penultimate layer's patch features into the LM's embedding space, and a **Qwen2** LM reads them
in place of an `<image>` placeholder. PIVOT's question is what post-training (SFT vs DPO) does to the tower.

This notebook builds the pieces (tiny random presets by default, or real HF folders through
`tower_path` / `lm_path`), looks at the tower's features and runs one forward pass of the assembled MLLM.
"""),
        params(COMMON + """
let tower_path = String::new();    // HF CLIP / SigLIP / SigLIP2 folder; "" = tiny random tower
let lm_path = String::new();       // Qwen2 / Qwen2.5 folder; "" = tiny random LM
"""),
        md("""
## The embedded data world

`ShapesWorld` renders scenes of coloured shapes procedurally (offline, deterministic) and derives
every data set of the study from them: captions, VQA, preference pairs, classes and masks.
"""),
        code("""
let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));
let sample: VqaSample = world.vqa(Split::Train, 1).samples[0].clone();
println!("Q: {}\\nA: {}   [category: {}]", sample.question, sample.answer, sample.category);
// (`RgbImage` is not nameable in a cell, so images are loaded where used, not kept in variables.)
let scene: Figure = Figure::from_image("a ShapesWorld scene", &sample.image.load()?)?;
scene
"""),
        md("""
## The vision tower and its features

`features(.., FeatureSelect::penultimate())` is what the projector reads: hidden state −2, patch tokens only.
The heat map shows the feature norm of each patch.
"""),
        code("""
let tower: VisionTower = if tower_path.is_empty() { VisionTower::new(VisionConfig::tiny(), device) } else { VisionTower::from_pretrained(&tower_path, device)? };
println!("{}", tower.summary());
let pixels: Tensor = tower.processor().preprocess(&[sample.image.load()?])?.to_device(device);
let vision_out: VisionOutput = tower.forward(&pixels)?;
let feats: Tensor = tower.features(&pixels, FeatureSelect::penultimate())?;
println!("pixels {:?}", pixels.size());
println!("hidden states: {} of {:?}", vision_out.hidden_states.len(), vision_out.hidden_states[0].size());
println!("penultimate patch features {:?}", feats.size());
let grid: usize = tower.config().grid() as usize;
let norms: Vec<f64> = Vec::<f64>::try_from(feats.get(0).square().sum_dim_intlist(1, false, Kind::Double).sqrt().to_device(Device::Cpu))?;
let rows: Vec<Vec<f64>> = norms.chunks(grid).map(|r| r.to_vec()).collect();
let norm_map: Figure = heatmap("patch feature norm (layer -2)", "patch x", "patch y", &rows, None)?;
norm_map
"""),
        md("""
## The MLLM: splice, forward, log-probabilities, greedy answer

`encode_chat` writes the ChatML prompt of PIVOT's `qwen_1_5` template with one image placeholder; only
the answer tokens carry labels. `forward` encodes the image, projects it and splices the image tokens in.
"""),
        code("""
let lm: LanguageModel = if lm_path.is_empty() { LanguageModel::tiny(device) } else { LanguageModel::from_pretrained(&lm_path, device)? };
println!("{}", lm.summary());
let mllm: Mllm = Mllm::new(tower, lm, MllmConfig::default());
println!("{}", mllm.summary());
let seq: Encoded = mllm.encode_chat(&sample.question, Some(&sample.answer))?;
let fwd: MllmOutput = mllm.forward(&pixels, &[seq.clone()], &[0])?;
let logits: Tensor = mllm.logits(&fwd);
let answer_logp: f64 = mllm.sequence_logps(&fwd)?.double_value(&[0]);
let greedy: String = mllm.answer(&sample.image.load()?, &sample.question, 12)?;
println!("tokens {} (image tokens {}), projected image tokens {:?}, logits {:?}", seq.ids.len(), mllm.image_token_count(), fwd.image_tokens.size(), logits.size());
println!("log p(reference answer) = {answer_logp:.3}; greedy answer of the untrained model: {greedy:?}");
"""),
        md("## Checks"),
        code("""
let n_tok: i64 = mllm.image_token_count();
let d_tower: i64 = mllm.tower.config().hidden_size;
let d_lm: i64 = mllm.lm.config().hidden_size;
assert_eq!(pixels.size()[0], 1);
assert_eq!(vision_out.hidden_states.len(), mllm.tower.num_layers() + 1);
assert_eq!(feats.size(), vec![1, n_tok, d_tower]);
assert_eq!(norms.len() as i64, n_tok);
assert!(norms.iter().all(|v| v.is_finite() && *v > 0.0));
assert_eq!(fwd.image_tokens.size(), vec![1, n_tok, d_lm]);
let t: i64 = fwd.hidden.size()[1];
assert_eq!(t, seq.ids.len() as i64 - 1 + n_tok);
assert_eq!(logits.size(), vec![1, t, mllm.lm.config().vocab_size]);
assert!(answer_logp.is_finite() && answer_logp < 0.0, "log-prob {answer_logp}");
"quick start: all checks passed"
"""),
    ]


def nb02():
    return [
        md("""
# 02 · The base MLLM: stage 1 on the embedded world

SFT and DPO must start from the **same** MLLM. PIVOT makes it with the LLaVA recipe (stage 1):

1. **projector alignment**: only the projector trains, on image captions (`plain` template);
2. **full training**: tower (at a lower lr), projector and LM train on instruction (VQA) data.

Here both steps run on `ShapesWorld` captions and VQA. The result is saved in the PIVOT /
LLaVA-OneVision layout to `{out_dir}/base`, where 03 and 04 load it.
At CI size this is a handful of steps; raise `proj_steps` / `full_steps` / `n_*` for a real run.
"""),
        params(COMMON + """
let n_captions: usize = 64;
let n_vqa: usize = 64;
let n_eval: usize = 24;
let proj_steps: usize = 6;
let full_steps: usize = 6;
let batch_size: usize = 8;
let proj_lr: f64 = 1e-3;
let full_lr: f64 = 1e-3;           // PIVOT uses 1e-5 on a pretrained LM; the tiny LM starts from random
let base_path = String::new();     // where to save; "" = {out_dir}/base
"""),
        code("""
let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));
let caps: CaptionDataset = world.captions(Split::Train, n_captions);
let vqa: VqaDataset = world.vqa(Split::Train, n_vqa);
let vqa_val: VqaDataset = world.vqa(Split::Val, n_eval);
let base_dir: String = if base_path.is_empty() { format!("{out_dir}/base") } else { base_path.clone() };
std::fs::create_dir_all(&out_dir)?;
println!("caption: {:?}", caps.samples[0].caption);
println!("VQA categories: {:?}", vqa.category_counts());
"""),
        md("## Stage 1 (live curve while it trains)"),
        code("""
let mut base: Mllm = Mllm::tiny(device);
let mut stage1: Stage1 = Stage1::default().seed(seed);
stage1.projector = stage1.projector.max_steps(proj_steps).batch_size(batch_size).lr(proj_lr);
stage1.full = stage1.full.max_steps(full_steps).batch_size(batch_size).lr(full_lr);
stage1.full.tower_lr = Some(full_lr / 5.0);
let s1: Stage1Log = stage1.run(&mut base, &caps, &vqa)?;
s1
"""),
        md("## VQA accuracy of the base model, by question category"),
        code("""
let base_eval: VqaReport = VqaEval { limit: Some(n_eval), ..Default::default() }.run(&base, &vqa_val)?;
base_eval
"""),
        md("## Save, reload, compare"),
        code("""
base.save_pretrained(&base_dir)?;
s1.projector.save_csv(format!("{out_dir}/stage1_projector.csv"))?;
s1.full.save_csv(format!("{out_dir}/stage1_full.csv"))?;
let reloaded: Mllm = Mllm::from_pretrained(&base_dir, device)?;
let (logp_saved, logp_loaded): (f64, f64) = {
    let s = vqa_val.samples[0].clone();
    let px = base.preprocess(&[s.image.load()?])?;
    let enc = base.encode_chat(&s.question, Some(&s.answer))?;
    let a = base.sequence_logps(&base.forward(&px, &[enc.clone()], &[0])?)?.double_value(&[0]);
    let b = reloaded.sequence_logps(&reloaded.forward(&px, &[enc], &[0])?)?.double_value(&[0]);
    (a, b)
};
println!("saved to {base_dir}; log p(answer): in memory {logp_saved:.5}, reloaded {logp_loaded:.5}");
println!("{}", reloaded.summary());
"""),
        md("## Checks"),
        code("""
assert_eq!(s1.projector.len(), proj_steps);
assert_eq!(s1.full.len(), full_steps);
let losses: Vec<f64> = s1.projector.get("loss").into_iter().chain(s1.full.get("loss")).collect();
assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "losses {losses:?}");
assert!(s1.projector.mean_last("loss", 2) < s1.projector.mean_first("loss", 2), "projector alignment did not lower the loss");
assert_eq!(base_eval.total, n_eval.min(vqa_val.len()));
assert!((0.0..=1.0).contains(&base_eval.accuracy()));
assert!(base_eval.by_category.keys().all(|c| VQA_CATEGORIES.contains(&c.as_str())));
for f in ["config.json", "model.safetensors", "tokenizer.json"] {
    assert!(std::path::Path::new(&base_dir).join(f).is_file(), "{base_dir}/{f} missing");
}
assert!(std::path::Path::new(&format!("{out_dir}/stage1_full.csv")).is_file());
assert!((logp_saved - logp_loaded).abs() <= 1e-4 * logp_saved.abs().max(1.0), "reload changed the model");
assert_eq!(reloaded.provenance.stage, Stage::Base);
"base MLLM: all checks passed"
"""),
    ]


def nb03():
    return [
        md("""
# 03 · SFT vs DPO from the same base

The heart of the paper: starting from one base MLLM, train one copy with **SFT** (cross-entropy on the
reference answer) and one with **DPO** (preference pairs: the chosen answer vs a rejected one that
hallucinates one visual fact), with the vision tower **trainable** in both. The paper's claim is that the
DPO-trained tower ends up seeing better; later notebooks measure the towers. Here we train, watch the live
curves, read TRL's DPO metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`) and compare VQA accuracy by question category.

The base comes from `{out_dir}/base` (02); if it is not there, a short stage 1 builds it.
"""),
        params(COMMON + """
let n_train: usize = 64;
let n_eval: usize = 24;
let sft_steps: usize = 6;
let dpo_steps: usize = 6;
let batch_size: usize = 8;
let sft_lr: f64 = 1e-4;            // PIVOT: 5e-6 (pretrained 0.5B+ models, global batch 256)
let dpo_lr: f64 = 1e-4;            // PIVOT: 1e-6
let beta: f64 = 0.1;
let base_path = String::new();     // "" = {out_dir}/base
let fallback_steps: usize = 4;     // stage-1 steps per part if no base is on disk
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + LOAD_BASE),
        md("## SFT: cross-entropy on the reference answers"),
        code("""
let vqa: VqaDataset = world.vqa(Split::Train, n_train);
let mut sft: Mllm = base.clone();
let sft_log: TrainLog = SftTrainer::new(TrainConfig::default().max_steps(sft_steps).batch_size(batch_size).lr(sft_lr).seed(seed)).run(&mut sft, &vqa)?;
sft_log
"""),
        md("""
## DPO: chosen vs hallucinated answers

Sigmoid DPO (TRL's default) against a frozen copy of the base as the reference. At step 1 the policy
equals the reference, so the loss is exactly ln 2.
"""),
        code("""
let prefs: PreferenceDataset = world.preferences(Split::Train, n_train);
let p0: PreferenceSample = prefs.samples[0].clone();
println!("Q: {}\\n  chosen:   {}\\n  rejected: {}", p0.question, p0.chosen, p0.rejected);
let mut dpo: Mllm = base.clone();
let dpo_cfg: DpoConfig = DpoConfig { beta, train: TrainConfig::default().max_steps(dpo_steps).batch_size(batch_size).lr(dpo_lr).seed(seed), ..Default::default() };
let dpo_log: TrainLog = DpoTrainer::new(dpo_cfg).run(&mut dpo, &prefs)?;
dpo_log
"""),
        md("## Curves side by side, and the TRL reward metrics"),
        code("""
let loss_fig: Figure = curves("training loss", "step", "loss", &[sft_log.series("loss"), dpo_log.series("loss")])?;
loss_fig
"""),
        code("""
println!("DPO log columns: {:?}", dpo_log.columns());
let reward_fig: Figure = curves("DPO implicit rewards", "step", "reward", &[dpo_log.series("rewards/chosen"), dpo_log.series("rewards/rejected"), dpo_log.series("rewards/margins")])?;
reward_fig
"""),
        md("## VQA exact match by category: base, SFT, DPO"),
        code("""
let vqa_val: VqaDataset = world.vqa(Split::Val, n_eval);
let vqa_eval: VqaEval = VqaEval { limit: Some(n_eval), ..Default::default() };
let acc_base: VqaReport = vqa_eval.run(&base, &vqa_val)?;
let acc_sft: VqaReport = vqa_eval.run(&sft, &vqa_val)?;
let acc_dpo: VqaReport = vqa_eval.run(&dpo, &vqa_val)?;
let mut vqa_runs: Runs = Runs::new();
vqa_runs.add(&[("model", "base")], Some(seed as i64), &acc_base);
vqa_runs.add(&[("model", "SFT")], Some(seed as i64), &acc_sft);
vqa_runs.add(&[("model", "DPO")], Some(seed as i64), &acc_dpo);
vqa_runs
"""),
        code("""
let vqa_fig: Figure = vqa_runs.plot_bars("vqa_accuracy")?;
vqa_fig.save(format!("{out_dir}/vqa_accuracy.png"))?;
vqa_fig
"""),
        md("## Save both models and the logs (04 probes their towers)"),
        code("""
sft.save_pretrained(format!("{out_dir}/sft"))?;
dpo.save_pretrained(format!("{out_dir}/dpo"))?;
sft_log.save_csv(format!("{out_dir}/sft_log.csv"))?;
dpo_log.save_csv(format!("{out_dir}/dpo_log.csv"))?;
vqa_runs.save_csv(format!("{out_dir}/vqa_by_category.csv"))?;
// How far each tower moved from the base (relative L2 over all tower weights).
let (moved_sft, moved_dpo): (f64, f64) = {
    let b = base.tower.var_store().variables();
    let dist = |m: &Mllm| -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (k, v) in m.tower.var_store().variables() {
            let w = &b[&k];
            num += (&v - w).square().sum(Kind::Double).double_value(&[]);
            den += w.square().sum(Kind::Double).double_value(&[]);
        }
        (num / den.max(1e-30)).sqrt()
    };
    (dist(&sft), dist(&dpo))
};
println!("relative tower change from base: SFT {moved_sft:.2e}, DPO {moved_dpo:.2e}");
"""),
        md("## Checks"),
        code("""
assert_eq!(sft_log.len(), sft_steps);
assert_eq!(dpo_log.len(), dpo_steps);
assert!(sft_log.get("loss").iter().chain(dpo_log.get("loss").iter()).all(|l| l.is_finite()));
for m in ["loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"] {
    assert!(dpo_log.columns().iter().any(|c| c == m), "DPO log lacks {m}");
}
let first_dpo: f64 = dpo_log.get("loss")[0];
assert!((first_dpo - std::f64::consts::LN_2).abs() < 1e-3, "DPO loss at step 1 is {first_dpo}, not ln 2");
assert!(dpo_log.get("rewards/accuracies").iter().all(|a| (0.0..=1.0).contains(a)));
for r in [&acc_base, &acc_sft, &acc_dpo] {
    assert_eq!(r.total, n_eval.min(vqa_val.len()));
    assert!((0.0..=1.0).contains(&r.accuracy()));
    assert!(r.by_category.keys().all(|c| VQA_CATEGORIES.contains(&c.as_str())));
}
assert_eq!(vqa_runs.len(), 3);
assert!(moved_sft > 0.0 && moved_dpo > 0.0, "a tower did not train");
assert_eq!(sft.provenance.stage, Stage::Sft);
assert_eq!(dpo.provenance.stage, Stage::Dpo);
for f in ["sft/model.safetensors", "dpo/model.safetensors", "sft_log.csv", "dpo_log.csv", "vqa_by_category.csv", "vqa_accuracy.png"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"SFT vs DPO: all checks passed"
"""),
    ]


def nb04():
    return [
        md("""
# 04 · Linear probes of the base, SFT and DPO towers

The paper's first measurement of "seeing better": take each vision tower **out** of its MLLM and fit a
linear classifier (L-BFGS logistic regression with a C sweep, as in CLIP's protocol) on frozen features.
Higher top-1 means the tower's features separate the classes more linearly. In `ShapesWorld` the 12
classes are colour group × shape of the large object.

The towers come from `{out_dir}/{base,sft,dpo}` (02, 03). A missing one is made here with a few steps,
so the notebook also runs on its own; the numbers only mean something at full size.
"""),
        params(COMMON + """
let n_train: usize = 120;          // probe training images
let n_val: usize = 60;
let batch_size: usize = 8;
let fallback_steps: usize = 3;     // training steps if a checkpoint is missing
let base_path = String::new();     // "" = {out_dir}/base
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + LOAD_BASE),
        code("""
// (A closure cannot outlive its cell in evcxr, so it lives inside this block.)
let (enc_sft, enc_dpo): (VisionEncoder, VisionEncoder) = {
let load_or_train = |name: &str| -> Result<Mllm> {
    let dir = format!("{out_dir}/{name}");
    if std::path::Path::new(&dir).join("config.json").exists() {
        return Mllm::from_pretrained(&dir, device);
    }
    println!("no {dir}: {fallback_steps} {name} steps from the base (what 03 does)");
    let mut m = base.clone();
    let cfg = TrainConfig::default().max_steps(fallback_steps).batch_size(batch_size).lr(1e-4).seed(seed).quiet();
    if name == "dpo" {
        DpoTrainer::new(DpoConfig { train: cfg, ..Default::default() }).run(&mut m, &world.preferences(Split::Train, 32))?;
    } else {
        SftTrainer::new(cfg).run(&mut m, &world.vqa(Split::Train, 32))?;
    }
    Ok(m)
};
(load_or_train("sft")?.encoder(), load_or_train("dpo")?.encoder())
};
let enc_base: VisionEncoder = base.encoder();
println!("towers: {} | {} | {}", enc_base.label(), enc_sft.label(), enc_dpo.label());
"""),
        md("## Fit one probe per tower"),
        code("""
let train: ClassificationDataset = world.classification(Split::Train, n_train);
let val: ClassificationDataset = world.classification(Split::Val, n_val);
let lp_base: EncoderProbeReport = LinearProbe::default().fit(&enc_base, &train, &val)?;
let lp_sft: EncoderProbeReport = LinearProbe::default().fit(&enc_sft, &train, &val)?;
let lp_dpo: EncoderProbeReport = LinearProbe::default().fit(&enc_dpo, &train, &val)?;
lp_dpo
"""),
        code("""
let probe_runs: Runs = Runs::from([&lp_base, &lp_sft, &lp_dpo]);
probe_runs.save_csv(format!("{out_dir}/linear_probe.csv"))?;
probe_runs
"""),
        code("""
let probe_fig: Figure = probe_runs.plot_bars("top1")?;
probe_fig.save(format!("{out_dir}/linear_probe_top1.png"))?;
probe_fig
"""),
        md("## Checks"),
        code("""
let chance: f64 = 1.0 / world.num_classes() as f64;
for r in [&lp_base, &lp_sft, &lp_dpo] {
    assert!((0.0..=1.0).contains(&r.top1) && r.top5 >= r.top1, "top1 {} top5 {}", r.top1, r.top5);
    assert_eq!(r.n_train, n_train as i64);
    assert_eq!(r.n_val, n_val as i64);
    assert_eq!(r.class_names.len(), world.num_classes());
    assert_eq!(r.num_features, enc_base.tower().config().hidden_size);
}
assert!(lp_base.top1 > chance, "the base tower's probe is at chance ({})", lp_base.top1);
assert_eq!(probe_runs.len(), 3);
assert!(std::path::Path::new(&format!("{out_dir}/linear_probe.csv")).is_file());
assert!(std::path::Path::new(&format!("{out_dir}/linear_probe_top1.png")).is_file());
"linear probe: all checks passed"
"""),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": nb01,
    "02_base_mllm.ipynb": nb02,
    "03_sft_vs_dpo.ipynb": nb03,
    "04_linear_probe.ipynb": nb04,
}


def build(name: str) -> str:
    nb = new_notebook(cells=NOTEBOOKS[name](), metadata={"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    # Stable ids, so regenerating an unchanged notebook gives the same bytes.
    for i, cell in enumerate(nb.cells):
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = build(name)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date with build.py: {', '.join(stale)} (run python notebooks/build.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
