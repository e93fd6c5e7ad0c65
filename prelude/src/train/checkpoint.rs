//! Trainer checkpoints: one directory per save holding the model, the AdamW moments, the
//! objective's own state (DPO's reference) and `trainer_state.json` (step, schedule, data position,
//! log). The directory is written under `<name>.tmp` and renamed into place, and `MANIFEST.json`
//! (file sizes) is written last: a directory without a manifest that matches its files was cut
//! off mid-write and is refused.
//!
//! Layout: `model.safetensors` (`tower.*`, `projector.*`, `lm.*` with HF names),
//! `optimizer.safetensors` (`m.<param>`, `v.<param>`), `objective.safetensors` (optional),
//! `trainer_state.json`, `MANIFEST.json`.
//!
//! RNG state: shuffling draws each epoch's order from a ChaCha stream seeded by (seed, epoch), so
//! the seed and the step number *are* the RNG state and the data position; nothing else is random
//! (the models have no dropout).

use super::log::TrainLog;
use super::optim::{AdamW, ParamGroup};
use crate::error::{PivotError, Result};
use crate::model::{Checkpoint, Mllm, weights};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const MANIFEST: &str = "MANIFEST.json";

/// Everything but tensors that a continuation needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// "sft", "dpo", "stage1-projector", ...: a checkpoint resumes only the same objective.
    pub objective: String,
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    pub data_len: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// AdamW's bias-correction step count.
    pub adam_t: usize,
    pub log: TrainLog,
}

/// `<dir>/step-000123` for step 123.
pub fn checkpoint_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:06}"))
}

/// The newest complete checkpoint under `dir` (a `step-*` directory with a valid manifest), or
/// `dir` itself when it is a checkpoint.
pub fn latest_checkpoint(dir: impl AsRef<Path>) -> Option<PathBuf> {
    let dir = dir.as_ref();
    if verify(dir).is_ok() {
        return Some(dir.to_path_buf());
    }
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp")))
        .collect();
    steps.sort();
    steps.into_iter().rev().find(|p| verify(p).is_ok())
}

pub(crate) fn save(
    path: &Path,
    mllm: &Mllm,
    opt: &AdamW,
    objective: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<()> {
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PivotError::file(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| PivotError::file(&tmp, e))?;
    let model: Vec<(String, Tensor)> =
        ParamGroup::ALL.iter().flat_map(|m| m.vars(mllm)).map(|(n, t)| (n, t.detach())).collect();
    weights::write_safetensors(&model, &tmp.join("model.safetensors"))?;
    weights::write_safetensors(&opt.state_tensors(), &tmp.join("optimizer.safetensors"))?;
    if !objective.is_empty() {
        weights::write_safetensors(objective, &tmp.join("objective.safetensors"))?;
    }
    let json = serde_json::to_string_pretty(state).map_err(|e| PivotError::invalid(e))?;
    weights::write_text_atomic(&tmp.join("trainer_state.json"), &json)?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&tmp).map_err(|e| PivotError::file(&tmp, e))? {
        let entry = entry.map_err(|e| PivotError::file(&tmp, e))?;
        let len = entry.metadata().map_err(|e| PivotError::file(entry.path(), e))?.len();
        files.insert(entry.file_name().to_string_lossy().into_owned(), len);
    }
    let manifest = serde_json::json!({ "complete": true, "step": state.step, "files": files });
    weights::write_text_atomic(&tmp.join(MANIFEST), &manifest.to_string())?;
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| PivotError::file(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| PivotError::file(path, e))
}

/// Checks that `dir` is a complete checkpoint: a manifest whose every file exists with its size.
pub fn verify(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let incomplete = |why: String| {
        PivotError::file(dir, format!("not a complete trainer checkpoint ({why}); it was probably cut off mid-write — resume from an earlier one"))
    };
    if !dir.is_dir() {
        return Err(PivotError::file(dir, "no such checkpoint directory"));
    }
    let manifest = dir.join(MANIFEST);
    if !manifest.is_file() {
        return Err(incomplete(format!("{MANIFEST} is missing")));
    }
    let m = weights::read_json(&manifest)?;
    let files = m.get("files").and_then(|f| f.as_object()).ok_or_else(|| incomplete(format!("{MANIFEST} lists no files")))?;
    for required in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        if !files.contains_key(required) {
            return Err(incomplete(format!("{MANIFEST} does not list {required}")));
        }
    }
    for (name, size) in files {
        let p = dir.join(name);
        let actual = std::fs::metadata(&p).map(|m| m.len()).map_err(|_| incomplete(format!("{name} is missing")))?;
        if Some(actual) != size.as_u64() {
            return Err(incomplete(format!("{name} has {actual} bytes, the manifest says {size}")));
        }
    }
    Ok(())
}

/// A verified checkpoint, opened.
pub(crate) struct Loaded {
    pub state: TrainerState,
    pub model: Checkpoint,
    pub optimizer: Checkpoint,
    pub objective: Option<Checkpoint>,
}

pub(crate) fn open(dir: &Path) -> Result<Loaded> {
    let dir = latest_checkpoint(dir).ok_or_else(|| match verify(dir) {
        Err(e) => e,
        Ok(()) => PivotError::file(dir, "no complete checkpoint here"),
    })?;
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| PivotError::file(&dir, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| PivotError::file(dir.join("trainer_state.json"), format!("invalid trainer state: {e}")))?;
    let obj = dir.join("objective.safetensors");
    Ok(Loaded {
        state,
        model: Checkpoint::open(dir.join("model.safetensors"))?,
        optimizer: Checkpoint::open(dir.join("optimizer.safetensors"))?,
        objective: if obj.is_file() { Some(Checkpoint::open(&obj)?) } else { None },
    })
}

/// Copies `prefix + name` tensors of `ckpt` into the MLLM's variables (bit-exact).
pub(crate) fn load_model(mllm: &Mllm, ckpt: &Checkpoint, prefix: &str) -> Result<()> {
    for module in ParamGroup::ALL {
        for (name, mut var) in module.vars(mllm) {
            let key = format!("{prefix}{name}");
            let src = ckpt.tensor(&key)?;
            if src.size() != var.size() {
                return Err(PivotError::ShapeMismatch {
                    path: ckpt.path().to_path_buf(),
                    name: key,
                    expected: var.size(),
                    found: src.size(),
                });
            }
            tch::no_grad(|| var.copy_(&src));
        }
    }
    Ok(())
}

/// The MLLM's variables as `prefix + name` tensors (detached).
pub(crate) fn model_tensors(mllm: &Mllm, prefix: &str) -> Vec<(String, Tensor)> {
    ParamGroup::ALL.iter().flat_map(|m| m.vars(mllm)).map(|(n, t)| (format!("{prefix}{n}"), t.detach())).collect()
}
