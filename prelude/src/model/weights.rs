//! Reading and writing Hugging Face safetensors checkpoints.
//!
//! A checkpoint is a single `*.safetensors` file, a sharded set described by
//! `model.safetensors.index.json`, or a directory holding either. Each file's header is read and
//! validated once, at open: every tensor's byte range is checked against the file's length, so a
//! truncated download is an error naming the file before any model is touched. A tensor is read
//! only when a model asks for it (loading a tower out of a whole MLLM checkpoint does not read the
//! language model), with bounds-checked positional reads (`pread`) on the open file rather than
//! through a memory map: a file truncated underneath a map turns the next access into SIGBUS, and
//! one rewritten in place hands out foreign bytes. Before each read the file's length and mtime
//! are compared with those seen at open, so a file changed underneath us is an error naming it.
//! Errors always name the file and the tensor.
//!
//! Writes are atomic and durable: data goes to `<name>.partial`, is fsynced, renamed into place,
//! and the directory is fsynced, so after a crash or power cut the real name holds either the old
//! file or the complete new one.

use crate::error::{PivotError, Result};
use crate::runtime::check_interrupt;
use safetensors::Dtype;
use safetensors::tensor::Metadata;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tch::{Kind, Tensor, nn::VarStore};

/// safetensors' own limit on the JSON header (`MAX_HEADER_SIZE` in the crate).
const MAX_HEADER_BYTES: u64 = 100_000_000;

struct Shard {
    path: PathBuf,
    file: File,
    /// Length and modification time at open: a file that differs later was changed underneath us.
    len: u64,
    modified: Option<SystemTime>,
}

/// Where one tensor lives: which shard, its dtype and shape, and its absolute byte range in the
/// shard (already checked against the file's length).
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    pub byte_range: (u64, u64),
}

/// An opened (possibly sharded) safetensors checkpoint.
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    index: BTreeMap<String, TensorInfo>,
}

thread_local! {
    static HEADER_PARSES: Cell<usize> = const { Cell::new(0) };
}

/// How many safetensors headers this thread has parsed so far. A checkpoint parses each file's
/// header once, at open; this counter lets a test check that reading tensors parses nothing more.
pub fn header_parse_count() -> usize {
    HEADER_PARSES.with(|c| c.get())
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => return Err(PivotError::invalid(format!("cannot write a {other:?} tensor to safetensors"))),
    })
}

/// Reads and validates one file's header: (tensor name, dtype, shape, absolute byte range).
fn read_header(path: &Path, file: &File, len: u64) -> Result<Vec<(String, Dtype, Vec<i64>, (u64, u64))>> {
    let bad = |why: String| PivotError::file(path, format!("not a valid safetensors file (truncated or corrupt?): {why}"));
    if len < 8 {
        return Err(bad(format!("{len} bytes, shorter than the 8-byte header length")));
    }
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(|e| PivotError::file(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")));
    }
    if 8 + n > len {
        return Err(bad(format!("header length {n} runs past the end of the {len}-byte file")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| PivotError::file(path, e))?;
    HEADER_PARSES.with(|c| c.set(c.get() + 1));
    // `Metadata`'s deserializer checks that the byte ranges are contiguous and match dtype × shape.
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + n;
    let expected = data_start + meta.data_len() as u64;
    if expected != len {
        return Err(bad(format!("the header describes {expected} bytes, the file has {len}")));
    }
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d).map_err(|_| bad(format!("tensor `{name}` has dimension {d}"))))
            .collect::<Result<Vec<i64>>>()?;
        // Offsets within the data section, which `expected == len` bounds by the file.
        out.push((name, info.dtype, shape, (data_start + s as u64, data_start + e as u64)));
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a directory containing
    /// either (the index wins, then `model.safetensors`; otherwise every `*.safetensors` in the
    /// directory is a shard).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(PivotError::file(path, "no such file or directory"));
        }
        let files: Vec<PathBuf> = if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                Self::shards_from_index(&index)?
            } else if path.join("model.safetensors").is_file() {
                vec![path.join("model.safetensors")]
            } else {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| PivotError::file(path, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                if files.is_empty() {
                    return Err(PivotError::file(path, "no *.safetensors file and no model.safetensors.index.json here"));
                }
                files
            }
        } else if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".index.json")) {
            Self::shards_from_index(path)?
        } else {
            vec![path.to_path_buf()]
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, file) in files.into_iter().enumerate() {
            let handle = File::open(&file).map_err(|e| PivotError::file(&file, e))?;
            let meta = handle.metadata().map_err(|e| PivotError::file(&file, e))?;
            if !meta.is_file() {
                return Err(PivotError::file(&file, "not a regular file"));
            }
            let len = meta.len();
            for (name, dtype, shape, byte_range) in read_header(&file, &handle, len)? {
                if index.contains_key(&name) {
                    return Err(PivotError::file(&file, format!("tensor `{name}` appears in more than one shard")));
                }
                index.insert(name, TensorInfo { shard: i, dtype, shape, byte_range });
            }
            shards.push(Shard { path: file, file: handle, len, modified: meta.modified().ok() });
        }
        Ok(Checkpoint { root: path.to_path_buf(), shards, index })
    }

    fn shards_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string(index_path).map_err(|e| PivotError::file(index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| PivotError::file(index_path, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| PivotError::file(index_path, "field `weight_map` is missing or not an object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                PivotError::file(index_path, format!("field `weight_map.{tensor}` is not a file name"))
            })?;
            let p = dir.join(file);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        for f in &files {
            if !f.is_file() {
                return Err(PivotError::file(index_path, format!("shard {} listed in weight_map does not exist", f.display())));
            }
        }
        files.sort();
        Ok(files)
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name)
    }

    /// File that holds `name` (for error messages), or the checkpoint root.
    pub fn file_of(&self, name: &str) -> &Path {
        self.index.get(name).map(|i| self.shards[i.shard].path.as_path()).unwrap_or(&self.root)
    }

    /// Copies one tensor out of the checkpoint, on the CPU, in the file's dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .index
            .get(name)
            .ok_or_else(|| PivotError::MissingTensor { path: self.root.clone(), name: name.to_string(), expected: vec![] })?;
        let shard = &self.shards[info.shard];
        let kind = kind_of(info.dtype).ok_or_else(|| {
            PivotError::file(&shard.path, format!("tensor `{name}` has unsupported dtype {:?}", info.dtype))
        })?;
        let now = shard.file.metadata().map_err(|e| PivotError::file(&shard.path, e))?;
        if now.len() != shard.len || now.modified().ok() != shard.modified {
            return Err(PivotError::file(
                &shard.path,
                format!(
                    "changed since it was opened ({} bytes then, {} now); reading tensor `{name}` from it would mix two versions — open it again",
                    shard.len,
                    now.len()
                ),
            ));
        }
        let (start, end) = info.byte_range;
        let nbytes = (end - start) as usize;
        // Read straight into the tensor's storage: no second copy of a large embedding.
        let tensor = Tensor::f_empty(info.shape.as_slice(), (kind, tch::Device::Cpu))?;
        if nbytes != tensor.numel() * kind.elt_size_in_bytes() {
            return Err(PivotError::file(&shard.path, format!("tensor `{name}`: {nbytes} bytes for shape {:?}", info.shape)));
        }
        if nbytes > 0 {
            // SAFETY: a fresh contiguous CPU tensor owns exactly `nbytes` bytes at `data_ptr`, and
            // nothing else refers to it yet.
            let dst = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, nbytes) };
            shard.file.read_exact_at(dst, start).map_err(|e| {
                PivotError::file(&shard.path, format!("cannot read tensor `{name}` (bytes {start}..{end}): {e}"))
            })?;
        }
        Ok(tensor)
    }

    /// The first of `prefixes` under which `probe` exists, e.g. to find whether a tower is stored
    /// as `vision_model.*` or `model.vision_tower.vision_tower.vision_model.*`.
    pub fn find_prefix<'a>(&self, prefixes: &[&'a str], probe: &str) -> Option<&'a str> {
        prefixes.iter().copied().find(|p| self.contains(&format!("{p}{probe}")))
    }

    /// Copies every variable of `vs` from `prefix + <var name>`, converting to the variable's
    /// dtype and device (the file's dtype never leaks into the model). A missing tensor or a
    /// shape mismatch is an error naming both.
    pub fn load_into(&self, vs: &VarStore, prefix: &str) -> Result<()> {
        self.load_mapped(vs, |name| format!("{prefix}{name}"))
    }

    /// Like [`Checkpoint::load_into`] with an arbitrary variable-name → checkpoint-key mapping.
    pub fn load_mapped(&self, vs: &VarStore, key_of: impl Fn(&str) -> String) -> Result<()> {
        let vars = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            let key = key_of(name);
            let expected = var.size();
            let Some(info) = self.index.get(&key) else {
                return Err(PivotError::MissingTensor { path: self.root.clone(), name: key, expected });
            };
            if info.shape != expected {
                return Err(PivotError::ShapeMismatch {
                    path: self.file_of(&key).to_path_buf(),
                    name: key,
                    expected,
                    found: info.shape.clone(),
                });
            }
            copy_into(var, &self.tensor(&key)?)?;
        }
        Ok(())
    }

    /// Number of encoder layers stored under `prefix` with the given layer path, e.g.
    /// `layers_under("vision_model.encoder.layers.")`. PIVOT checkpoints drop the last layer.
    pub fn count_layers(&self, layer_prefix: &str) -> usize {
        let mut max: Option<usize> = None;
        for name in self.index.keys() {
            if let Some(rest) = name.strip_prefix(layer_prefix) {
                if let Some(idx) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                    max = Some(max.map_or(idx, |m: usize| m.max(idx)));
                }
            }
        }
        max.map_or(0, |m| m + 1)
    }
}

/// Writes named tensors to one safetensors file with `{"format": "pt"}` metadata (which
/// `transformers` requires), atomically and durably (see the module doc): a crash or power cut
/// never leaves a truncated or zero-filled file under the real name.
///
/// Interruptible between tensors (each one's copy to the host is a chunk of work): an interrupt
/// returns `PivotError::Interrupted` before anything is written, so the file already at `path`
/// (an earlier checkpoint) stays as it was.
/// Copies `src` into the variable `var` in place, converting to its kind and device (no
/// gradient is recorded): how every loader fills a model's parameters.
pub(crate) fn copy_into(var: &Tensor, src: &Tensor) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let mut dst = var.shallow_clone();
        dst.f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        Ok(())
    })
}

pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    struct Owned {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &Owned {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut owned: Vec<(String, Owned)> = Vec::with_capacity(tensors.len());
    for (i, (name, t)) in tensors.iter().enumerate() {
        check_interrupt(&format!("saving {} (tensor {} of {})", path.display(), i + 1, tensors.len()))?;
        let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let dtype = dtype_of(t.kind())?;
        let numel = t.numel();
        let nbytes = numel * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; nbytes];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), Owned { dtype, shape, data }));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(&str, &Owned)> = owned.iter().map(|(n, o)| (n.as_str(), o)).collect();
    let partial = partial_path(path);
    safetensors::serialize_to_file(views, Some(metadata), &partial).map_err(|e| PivotError::file(&partial, e))?;
    commit_partial(&partial, path)
}

/// Writes a text file atomically and durably (see [`write_safetensors`]).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let partial = partial_path(path);
    std::fs::write(&partial, text).map_err(|e| PivotError::file(&partial, e))?;
    commit_partial(&partial, path)
}

/// fsyncs a fully written `partial`, renames it to `path` and fsyncs the directory: without the
/// first fsync a power cut after the rename can leave `path` at its full size holding zeros;
/// without the second the rename itself may be lost. On error the partial file is removed.
fn commit_partial(partial: &Path, path: &Path) -> Result<()> {
    let res = sync_file(partial)
        .and_then(|()| std::fs::rename(partial, path).map_err(|e| PivotError::file(path, e)))
        .and_then(|()| sync_dir(path.parent().unwrap_or(Path::new("."))));
    if res.is_err() {
        let _ = std::fs::remove_file(partial);
    }
    res
}

/// fsync of a file's data and metadata. On Linux fsync on any descriptor of the file flushes all
/// of its dirty pages, so a read-only handle opened after the writer closed is enough.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| PivotError::file(path, format!("fsync: {e}")))
}

/// fsync of a directory, which makes the creations, renames and removals of its entries durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| PivotError::file(dir, format!("fsync of the directory: {e}")))
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// The variables of a store as (name, tensor) pairs, sorted by name, under a key prefix.
pub fn named_tensors(vs: &VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (format!("{prefix}{n}"), t.detach())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Reads and parses a JSON file, naming the file on error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| PivotError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| PivotError::file(path, format!("invalid JSON: {e}")))
}
