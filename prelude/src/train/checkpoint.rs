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
//! Layout: `model.safetensors` (`tower.*`, `projector.*`, `lm.*` with HF names), the AdamW state,
//! `objective.safetensors` (optional), `trainer_state.json`, `MANIFEST.json`. The AdamW state of an
//! unsharded run is `optimizer.safetensors` (`m.<param>`, `v.<param>`, `master.<param>`); under
//! ZeRO-1 every rank writes its own chunk of it, `optimizer-rank00001-of-00002.safetensors`
//! (`m.<segment>`, ... : its flat range of each buffer), and rank 0 writes `optimizer_shards.json`
//! (world size, each segment's parameters, each shard's file, rank and ranges) beside the model,
//! so no rank ever holds or writes the whole state. Either loads at any number of ranks.
//!
//! A sharded save is a collective: rank 0 makes `<name>.tmp`, every rank writes and fsyncs its
//! files into it, and only when all of them succeeded (an all-reduce of their outcomes) does rank
//! 0 hash every file into the manifest and rename the directory into place. A rank that fails or
//! dies leaves the previous checkpoints as they were and no partial one.
//!
//! RNG state: shuffling draws each epoch's order from a ChaCha stream seeded by (seed, epoch), so
//! the seed and the step number *are* the RNG state and the data position; nothing else is random
//! (the models have no dropout).

use super::dist::{ProcessGroup, ReduceOp};
use super::log::TrainLog;
use super::optim::{OptimizerState, ParamGroup, SavedState, ShardLayout};
use crate::error::{PivotError, Result};
use crate::model::{Checkpoint, Mllm, weights};
use crate::runtime::check_interrupt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

pub const MANIFEST: &str = "MANIFEST.json";
/// The whole AdamW state of an unsharded run.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// Under ZeRO-1: the layout of the ranks' optimizer shards.
pub const SHARD_LAYOUT: &str = "optimizer_shards.json";

/// Rank `rank`'s optimizer shard in a checkpoint written by `world` ranks.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank:05}-of-{world:05}.safetensors")
}

/// Bytes of checkpoint files this process has written (what each rank's share of a save costs).
pub fn bytes_written() -> u64 {
    BYTES_WRITTEN.load(Ordering::Relaxed)
}

static BYTES_WRITTEN: AtomicU64 = AtomicU64::new(0);

/// `optimizer_shards.json`: the layout, and where each rank's chunks are.
#[derive(Debug, Serialize, Deserialize)]
struct ShardIndex {
    #[serde(flatten)]
    layout: ShardLayout,
    shards: Vec<ShardEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardEntry {
    file: String,
    rank: usize,
    /// The element range `[start, end)` of each segment's buffers that this shard holds.
    ranges: Vec<[i64; 2]>,
}

impl ShardIndex {
    fn new(layout: ShardLayout) -> Self {
        let shards = (0..layout.world)
            .map(|rank| ShardEntry {
                file: shard_file(rank, layout.world),
                rank,
                ranges: (0..layout.segments.len()).map(|i| layout.range(i, rank)).map(|r| [r.start, r.end]).collect(),
            })
            .collect();
        ShardIndex { layout, shards }
    }

    /// Reads `dir`'s layout file, checking that it describes one shard per rank, in rank order,
    /// with the ranges its segments imply.
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(SHARD_LAYOUT);
        let index: ShardIndex = serde_json::from_value(weights::read_json(&path)?)
            .map_err(|e| PivotError::file(&path, format!("invalid optimizer shard layout: {e}")))?;
        let world = index.layout.world;
        if index.shards.len() != world {
            return Err(PivotError::file(&path, format!("lists {} optimizer shards for a world of {world} ranks", index.shards.len())));
        }
        for (i, seg) in index.layout.segments.iter().enumerate() {
            let n: i64 = seg.params.iter().map(|(_, n)| n).sum();
            if seg.chunk < 0 || seg.chunk * (world as i64) < n {
                return Err(PivotError::file(&path, format!("segment {i}: {world} ranges of {} elements cannot hold its {n}", seg.chunk)));
            }
        }
        for (k, shard) in index.shards.iter().enumerate() {
            let expected: Vec<[i64; 2]> = (0..index.layout.segments.len()).map(|i| index.layout.range(i, k)).map(|r| [r.start, r.end]).collect();
            if shard.rank != k || shard.ranges != expected || shard.file.contains(['/', '\\']) {
                return Err(PivotError::file(
                    &path,
                    format!("shard {k} (`{}`, rank {}, ranges {:?}) is not rank {k} of {world} with ranges {expected:?}", shard.file, shard.rank, shard.ranges),
                ));
            }
        }
        Ok(index)
    }

    /// "rank k of W, elements a..b of each buffer" (segment 0's range) for messages.
    fn describe(&self, rank: usize) -> String {
        let ranges: Vec<String> = self.shards[rank].ranges.iter().map(|[a, b]| format!("{a}..{b}")).collect();
        format!("rank {rank} of {}, elements {} of its segments' buffers", self.layout.world, ranges.join(", "))
    }
}

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

/// Saves a checkpoint at `path`. Every rank of `group` calls it (a collective): each writes its
/// own part (rank 0 the model, objective, trainer state and, unsharded, the whole optimizer
/// state; under ZeRO-1 every rank its optimizer shard), and rank 0 publishes the directory only
/// once every rank's files are durable.
pub(crate) fn save(
    path: &Path,
    mllm: &Mllm,
    optimizer: &OptimizerState,
    objective: &[(String, Tensor)],
    state: &TrainerState,
    group: Option<&ProcessGroup>,
) -> Result<()> {
    let rank = group.map_or(0, |g| g.rank());
    let tmp = with_suffix(path, ".tmp");
    let at = format!("checkpoint save of step {}", state.step);
    // Rank 0 starts the directory afresh; the others write into it once it exists.
    let ready = if rank == 0 { fresh_dir(&tmp) } else { Ok(()) };
    all_succeeded(group, ready, &at)?;
    let written = write_files(&tmp, rank, mllm, optimizer, objective, state);
    // Committed only when every rank's files are durable.
    let written = all_succeeded(group, written, &at);
    if rank != 0 {
        return written;
    }
    if let Err(e) = written.and_then(|()| write_manifest(&tmp, state.step, &at)) {
        // An interrupt or a write error (on any rank) abandons the save: no partial directory
        // stays behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    install(&tmp, path)
}

/// An empty directory at `dir`, replacing what an abandoned save left there.
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| PivotError::file(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| PivotError::file(dir, e))
}

/// Whether every rank's `local` succeeded (one small all-reduce; `local` itself alone). A rank
/// that failed returns its own error, the others one saying that another rank failed.
fn all_succeeded(group: Option<&ProcessGroup>, local: Result<()>, at: &str) -> Result<()> {
    let Some(g) = group else { return local };
    let failed = Tensor::from_slice(&[local.is_err() as i32 as f32]);
    g.all_reduce(&[&failed], ReduceOp::Max)?;
    local?;
    if failed.double_value(&[0]) > 0.0 {
        return Err(PivotError::invalid(format!("{at}: another rank failed to write its part; the save was abandoned")));
    }
    Ok(())
}

/// Writes one file of the checkpoint (between interrupt checks) and counts its bytes.
fn write_counted(path: &Path, at: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_interrupt(at)?;
    write(path)?;
    let size = std::fs::metadata(path).map_err(|e| PivotError::file(path, e))?.len();
    BYTES_WRITTEN.fetch_add(size, Ordering::Relaxed);
    Ok(())
}

/// This rank's files of the checkpoint, into `tmp`.
fn write_files(tmp: &Path, rank: usize, mllm: &Mllm, optimizer: &OptimizerState, objective: &[(String, Tensor)], state: &TrainerState) -> Result<()> {
    let at = format!("checkpoint save of step {}", state.step);
    if let OptimizerState::Shard { layout, rank, tensors } = optimizer {
        write_counted(&tmp.join(shard_file(*rank, layout.world)), &at, |p| weights::write_safetensors(tensors, p))?;
    }
    if rank != 0 {
        return Ok(());
    }
    let model: Vec<(String, Tensor)> =
        ParamGroup::ALL.iter().flat_map(|m| m.vars(mllm)).map(|(n, t)| (n, t.detach())).collect();
    write_counted(&tmp.join("model.safetensors"), &at, |p| weights::write_safetensors(&model, p))?;
    match optimizer {
        OptimizerState::Whole(tensors) => write_counted(&tmp.join(OPTIMIZER), &at, |p| weights::write_safetensors(tensors, p))?,
        OptimizerState::Shard { layout, .. } => {
            let index = serde_json::to_string_pretty(&ShardIndex::new(layout.clone())).map_err(PivotError::invalid)?;
            write_counted(&tmp.join(SHARD_LAYOUT), &at, |p| weights::write_text_atomic(p, &index))?;
        }
    }
    if !objective.is_empty() {
        write_counted(&tmp.join("objective.safetensors"), &at, |p| weights::write_safetensors(objective, p))?;
    }
    let json = serde_json::to_string_pretty(state).map_err(PivotError::invalid)?;
    write_counted(&tmp.join("trainer_state.json"), &at, |p| weights::write_text_atomic(p, &json))
}

/// The manifest of every file in `tmp` (every rank's, durable by then), written last.
fn write_manifest(tmp: &Path, step: usize, at: &str) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| PivotError::file(tmp, e))? {
        let entry = entry.map_err(|e| PivotError::file(tmp, e))?;
        let p = entry.path();
        let size = entry.metadata().map_err(|e| PivotError::file(&p, e))?.len();
        let blake3 = hash_file(&p)?;
        files.insert(entry.file_name().to_string_lossy().into_owned(), serde_json::json!({ "size": size, "blake3": blake3 }));
    }
    check_interrupt(at)?;
    let manifest = serde_json::json!({ "complete": true, "format": 2, "step": step, "files": files });
    // The manifest write fsyncs `tmp` after renaming the manifest into it, and every file
    // before it was renamed: the directory is durable and complete before it gets its name.
    write_counted(&tmp.join(MANIFEST), at, |p| weights::write_text_atomic(p, &manifest.to_string()))
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
    for required in ["model.safetensors", "trainer_state.json"] {
        if !files.contains_key(required) {
            return Err(incomplete(format!("{MANIFEST} does not list {required}")));
        }
    }
    if files.contains_key(SHARD_LAYOUT) {
        // Every rank's optimizer shard must be there: named with its rank and range when not.
        let index = ShardIndex::read(dir)?;
        for shard in &index.shards {
            let listed = files.contains_key(&shard.file);
            if !listed || !dir.join(&shard.file).is_file() {
                let why = if listed { "is missing" } else { "is not in the manifest" };
                return Err(incomplete(format!("optimizer shard {} ({}) {why}", shard.file, index.describe(shard.rank))));
            }
        }
    } else if !files.contains_key(OPTIMIZER) {
        return Err(incomplete(format!("{MANIFEST} lists neither {OPTIMIZER} nor {SHARD_LAYOUT}")));
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
    pub optimizer: SavedState,
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
        optimizer: open_optimizer(&dir)?,
        objective: if obj.is_file() { Some(Checkpoint::open(&obj)?) } else { None },
    })
}

/// The optimizer state of the verified checkpoint `dir`: its one file, or its shards, each checked
/// to hold its rank's range of every buffer (fp32, the layout's length).
fn open_optimizer(dir: &Path) -> Result<SavedState> {
    if !dir.join(SHARD_LAYOUT).is_file() {
        return Ok(SavedState::Whole(Checkpoint::open(dir.join(OPTIMIZER))?));
    }
    let index = ShardIndex::read(dir)?;
    let mut files = Vec::with_capacity(index.shards.len());
    for shard in &index.shards {
        let path = dir.join(&shard.file);
        let ck = Checkpoint::open(&path)?;
        for i in 0..index.layout.segments.len() {
            let chunk = index.layout.segments[i].chunk;
            for key in index.layout.keys(i) {
                let found = ck.info(&key).map(|t| (t.dtype, t.shape.clone()));
                if found != Some((safetensors::Dtype::F32, vec![chunk])) {
                    return Err(PivotError::file(
                        &path,
                        format!(
                            "optimizer shard of {} does not match {SHARD_LAYOUT}: `{key}` should be F32 [{chunk}], found {}",
                            index.describe(shard.rank),
                            found.map_or("nothing".to_string(), |(d, s)| format!("{d:?} {s:?}"))
                        ),
                    ));
                }
            }
        }
        files.push(ck);
    }
    Ok(SavedState::Shards { layout: index.layout, files })
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
