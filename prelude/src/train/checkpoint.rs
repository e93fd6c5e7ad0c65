//! Trainer checkpoints: one directory per save holding the model, the AdamW moments, the
//! objective's own state (DPO's reference) and `trainer_state.json` (step, schedule, data position,
//! log), plus `MANIFEST.json`, written last, with every file's size and BLAKE3 hash.
//!
//! Durability: the directory is assembled under `<name>.tmp`; every file is fsynced before it is
//! renamed to its name and the directory is fsynced before it is renamed into place, so after a
//! crash or power cut a checkpoint directory is complete or absent, never a right-sized file of
//! zeros. Re-saving a step that exists swaps the new directory in atomically (`renameat2`
//! `RENAME_EXCHANGE`) and only then deletes the old one, so the old step stays loadable until the
//! new one is. A checkpoint is loaded only after every file matches the manifest's size and hash:
//! a same-size corruption is refused with the name of the file. An interrupt (the prelude's
//! interrupt flag) during a save abandons it and leaves the previous checkpoints untouched.
//!
//! Layout: `model.safetensors` (`tower.*`, `projector.*`, `lm.*` with HF names),
//! `optimizer.safetensors` (`m.<param>`, `v.<param>`), `objective.safetensors` (optional),
//! `trainer_state.json`, `MANIFEST.json`.
//!
//! RNG state: shuffling draws each epoch's order from a ChaCha stream seeded by (seed, epoch), so
//! the seed and the step number *are* the RNG state and the data position; nothing else is random
//! (the models have no dropout).

use super::log::TrainLog;
use super::optim::ParamGroup;
use crate::error::{PivotError, Result};
use crate::model::{Checkpoint, Mllm, weights};
use crate::runtime::check_interrupt;
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
    /// Per rank.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Ranks of the run that wrote it (absent in checkpoints of single-process runs: 1). A run
    /// resumes at another number of ranks when its samples per optimizer step are the same.
    #[serde(default = "one")]
    pub world: usize,
    pub seed: u64,
    /// AdamW's bias-correction step count.
    pub adam_t: usize,
    pub log: TrainLog,
}

fn one() -> usize {
    1
}

impl TrainerState {
    /// Samples (pairs) per optimizer step over all ranks.
    pub fn samples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.world
    }
}

/// `<dir>/step-000123` for step 123.
pub fn checkpoint_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:06}"))
}

/// The step of a `step-000123` directory (or of `step-000123.old`, the previous version of a
/// re-saved step that a crash left behind on a file system without `RENAME_EXCHANGE`), and
/// whether it is the `.old` one.
fn step_of(path: &Path) -> Option<(usize, bool)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("step-")?;
    let (digits, old) = match rest.strip_suffix(".old") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, old))
}

/// The newest complete checkpoint under `dir` (a `step-*` directory whose files all match its
/// manifest), or `dir` itself when it is a checkpoint. Newer checkpoints that fail the check are
/// passed over with a warning naming the reason.
pub fn latest_checkpoint(dir: impl AsRef<Path>) -> Option<PathBuf> {
    let dir = dir.as_ref();
    if dir.join(MANIFEST).is_file() {
        return verify(dir).is_ok().then(|| dir.to_path_buf());
    }
    let mut steps: Vec<((usize, bool), PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| step_of(&p).map(|s| (s, p)))
        .collect();
    // Newest step first; at the same step the plain directory before its `.old` predecessor.
    steps.sort_by(|a, b| b.0.0.cmp(&a.0.0).then(a.0.1.cmp(&b.0.1)));
    for (_, p) in steps {
        match verify(&p) {
            Ok(()) => return Some(p),
            Err(e) => eprintln!("pivot: skipping checkpoint {}: {e}", p.display()),
        }
    }
    None
}

/// `<path>` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// BLAKE3 of a file's contents, hex.
fn hash_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| PivotError::file(path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(|e| PivotError::file(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// `optimizer`: [`AdamW::state_tensors`](super::optim::AdamW::state_tensors), whole (under
/// ZeRO-1 gathered from every rank first), so that any number of ranks can resume from it.
pub(crate) fn save(
    path: &Path,
    mllm: &Mllm,
    optimizer: &[(String, Tensor)],
    objective: &[(String, Tensor)],
    state: &TrainerState,
) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PivotError::file(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| PivotError::file(&tmp, e))?;
    let written = write_files(&tmp, mllm, optimizer, objective, state);
    if let Err(e) = written {
        // An interrupt or a write error abandons the save: no partial directory stays behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    install(&tmp, path)
}

/// Writes the checkpoint's files and, last, its manifest into `tmp`, checking for an interrupt
/// between files (a save of a large model takes seconds).
fn write_files(tmp: &Path, mllm: &Mllm, optimizer: &[(String, Tensor)], objective: &[(String, Tensor)], state: &TrainerState) -> Result<()> {
    let at = format!("checkpoint save of step {}", state.step);
    check_interrupt(&at)?;
    let model: Vec<(String, Tensor)> =
        ParamGroup::ALL.iter().flat_map(|m| m.vars(mllm)).map(|(n, t)| (n, t.detach())).collect();
    weights::write_safetensors(&model, &tmp.join("model.safetensors"))?;
    check_interrupt(&at)?;
    weights::write_safetensors(optimizer, &tmp.join("optimizer.safetensors"))?;
    check_interrupt(&at)?;
    if !objective.is_empty() {
        weights::write_safetensors(objective, &tmp.join("objective.safetensors"))?;
        check_interrupt(&at)?;
    }
    let json = serde_json::to_string_pretty(state).map_err(PivotError::invalid)?;
    weights::write_text_atomic(&tmp.join("trainer_state.json"), &json)?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| PivotError::file(tmp, e))? {
        let entry = entry.map_err(|e| PivotError::file(tmp, e))?;
        let p = entry.path();
        let size = entry.metadata().map_err(|e| PivotError::file(&p, e))?.len();
        let blake3 = hash_file(&p)?;
        files.insert(entry.file_name().to_string_lossy().into_owned(), serde_json::json!({ "size": size, "blake3": blake3 }));
    }
    check_interrupt(&at)?;
    let manifest = serde_json::json!({ "complete": true, "format": 2, "step": state.step, "files": files });
    // The manifest write fsyncs `tmp` after renaming the manifest into it, and every file
    // before it was renamed: the directory is durable and complete before it gets its name.
    weights::write_text_atomic(&tmp.join(MANIFEST), &manifest.to_string())
}

/// Moves the complete directory `tmp` to `path`, replacing a previous checkpoint of the same step
/// only once the new one is in place, and makes the move durable.
fn install(tmp: &Path, path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    if path.exists() {
        if exchange(tmp, path)? {
            // `tmp` now holds the old checkpoint.
            weights::sync_dir(parent)?;
            std::fs::remove_dir_all(tmp).map_err(|e| PivotError::file(tmp, e))?;
        } else {
            // No atomic exchange here: keep the old version as `<name>.old` (which
            // `latest_checkpoint` still finds) until the new one has its name.
            let old = with_suffix(path, ".old");
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| PivotError::file(&old, e))?;
            }
            std::fs::rename(path, &old).map_err(|e| PivotError::file(path, e))?;
            std::fs::rename(tmp, path).map_err(|e| PivotError::file(path, e))?;
            weights::sync_dir(parent)?;
            std::fs::remove_dir_all(&old).map_err(|e| PivotError::file(&old, e))?;
        }
    } else {
        std::fs::rename(tmp, path).map_err(|e| PivotError::file(path, e))?;
        // The previous version that a crash mid-swap left behind is superseded now.
        let old = with_suffix(path, ".old");
        if old.exists() {
            weights::sync_dir(parent)?;
            std::fs::remove_dir_all(&old).map_err(|e| PivotError::file(&old, e))?;
        }
    }
    weights::sync_dir(parent)
}

/// Atomically swaps the directories `a` and `b` (Linux `renameat2(RENAME_EXCHANGE)`). `Ok(false)`
/// where the kernel or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| PivotError::file(a, e))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| PivotError::file(b, e))?;
    // SAFETY: two valid NUL-terminated paths; renameat2 touches nothing else of ours.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(PivotError::file(b, format!("cannot swap in the new checkpoint: {err}"))),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// Checks that `dir` is a complete, intact checkpoint: a manifest whose every file exists with its
/// size and content hash. Manifests of format 1 (sizes only) are checked for sizes.
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
    for (name, entry) in files {
        // A manifest names files inside its own directory, nothing else.
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(incomplete(format!("{MANIFEST} lists the invalid file name {name:?}")));
        }
        let (size, hash) = match entry {
            serde_json::Value::Object(o) => (o.get("size").and_then(|s| s.as_u64()), o.get("blake3").and_then(|h| h.as_str())),
            other => (other.as_u64(), None),
        };
        let Some(size) = size else {
            return Err(incomplete(format!("{MANIFEST} has no size for {name}")));
        };
        let p = dir.join(name);
        let actual = std::fs::metadata(&p).map(|m| m.len()).map_err(|_| incomplete(format!("{name} is missing")))?;
        if actual != size {
            return Err(incomplete(format!("{name} has {actual} bytes, the manifest says {size}")));
        }
        if let Some(expected) = hash {
            let found = hash_file(&p)?;
            if found != expected {
                return Err(PivotError::file(
                    &p,
                    format!("corrupt checkpoint file: its BLAKE3 hash {found} differs from {expected} in {MANIFEST} (same size, different bytes: a disk or copy error) — resume from an earlier checkpoint"),
                ));
            }
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
    // Named directly, a checkpoint that fails the check is an error naming why (and the file).
    let dir = if dir.join(MANIFEST).is_file() {
        verify(dir)?;
        dir.to_path_buf()
    } else {
        latest_checkpoint(dir).ok_or_else(|| match verify(dir) {
            Err(e) => e,
            Ok(()) => PivotError::file(dir, "no complete checkpoint here"),
        })?
    };
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
