//! What is on the disk never crashes or silently corrupts a run:
//! - trainer checkpoints are durable (every file and directory fsynced before it is named, proved
//!   with strace), hashed (a same-size corruption is refused, naming the file), re-saved without
//!   ever dropping the old step first, abandoned cleanly on interrupt, and survive SIGKILL at
//!   random points during saves (50 kills of a real training process, each followed by a
//!   bit-identical continuation);
//! - the safetensors reader parses each header once, bounds-checks every tensor against the file
//!   and turns a file truncated or rewritten underneath it into an error, not SIGBUS or foreign
//!   bytes; a seeded mutation fuzz checks it never panics.
//!
//! Children: `strace_child` and `kill_child` do nothing unless the parent test re-runs this binary
//! with their environment variable set.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pivot::model::weights::{self, header_parse_count};
use pivot::prelude::*;
use rand::{Rng, SeedableRng};

/// In-process training runs share the interrupt flag: one at a time.
static TRAINING: Mutex<()> = Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hardening_disk").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn weights_of(m: &Mllm) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for (p, vs) in [("t.", m.tower.var_store()), ("p.", m.projector.var_store()), ("l.", m.lm.var_store())] {
        v.extend(vs.variables().into_iter().map(|(n, t)| (format!("{p}{n}"), t.detach().copy())));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(b) {
        assert!(x.equal(y), "{n} differs");
    }
}

/// Every path under `dir`, recursively, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- safetensors reader

fn sample_tensors() -> Vec<(String, Tensor)> {
    tch::manual_seed(3);
    (0..20)
        .map(|i| {
            let t = match i % 4 {
                0 => Tensor::randn([3, 5], (Kind::Float, Device::Cpu)),
                1 => Tensor::randn([7], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
                2 => Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([2, 3]),
                _ => Tensor::randn([2, 2, 2], (Kind::Double, Device::Cpu)),
            };
            (format!("layer.{i}.weight"), t)
        })
        .collect()
}

#[test]
fn safetensors_headers_are_parsed_once_per_file() {
    let dir = scratch("parse-once");
    let tensors = sample_tensors();
    weights::write_safetensors(&tensors, &dir.join("one.safetensors")).unwrap();
    let before = header_parse_count();
    let ck = Checkpoint::open(dir.join("one.safetensors")).unwrap();
    for (name, t) in &tensors {
        assert!(ck.tensor(name).unwrap().equal(t), "{name}");
    }
    assert_eq!(header_parse_count() - before, 1, "one parse for one file, however many tensors are read");

    // Three shards: three parses.
    let shards = dir.join("sharded");
    fs::create_dir_all(&shards).unwrap();
    for (k, chunk) in tensors.chunks(7).enumerate() {
        weights::write_safetensors(chunk, &shards.join(format!("part-{k}.safetensors"))).unwrap();
    }
    let before = header_parse_count();
    let ck = Checkpoint::open(&shards).unwrap();
    for (name, t) in &tensors {
        assert!(ck.tensor(name).unwrap().equal(t), "{name}");
    }
    assert_eq!(header_parse_count() - before, 3);
}

#[test]
fn a_file_truncated_or_rewritten_underneath_an_open_checkpoint_is_an_error() {
    let dir = scratch("underneath");
    let tensors = sample_tensors();
    let path = dir.join("w.safetensors");

    // Truncated after open: a memory map would SIGBUS here.
    weights::write_safetensors(&tensors, &path).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 3).unwrap();
    for (name, _) in &tensors {
        let e = ck.tensor(name).unwrap_err();
        assert!(matches!(&e, PivotError::File { path: p, .. } if p == &path), "{name}: {e:?}");
    }
    // Truncated before open: named at open, with the sizes.
    let e = Checkpoint::open(&path).err().unwrap().to_string();
    assert!(e.contains("w.safetensors") && e.contains("truncated or corrupt"), "{e}");

    // Rewritten in place, same size, different bytes: never handed out as the old tensors.
    weights::write_safetensors(&tensors, &path).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    std::thread::sleep(Duration::from_millis(30)); // past the file system's timestamp granularity
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 200..].iter_mut().for_each(|b| *b = b.wrapping_add(1));
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&bytes).unwrap();
    drop(f);
    let e = ck.tensor(&tensors.last().unwrap().0).unwrap_err().to_string();
    assert!(e.contains("changed since it was opened"), "{e}");
}

/// Fixed budget: 1500 mutants of a valid file (about two seconds). Opening and reading every
/// tensor either works with tensors of the header's shapes, or fails with an error
/// naming the file; it never panics.
#[test]
fn fuzz_safetensors_reader_never_panics_and_always_names_the_file() {
    let dir = scratch("fuzz-st");
    let seed_path = dir.join("seed.safetensors");
    weights::write_safetensors(&sample_tensors()[..6], &seed_path).unwrap();
    let seed = fs::read(&seed_path).unwrap();
    let header_len = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let file = dir.join("mutant.safetensors");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xF00D);
    let (mut opened, mut failed) = (0, 0);
    for iteration in 0..1500 {
        let mut bytes = seed.clone();
        for _ in 0..rng.random_range(1..=3) {
            match rng.random_range(0..6) {
                // Most edits land in the JSON header, where the parsing is.
                0 | 1 => {
                    let i = 8 + rng.random_range(0..header_len);
                    let b = b"0123456789{}[]\":,-e. \xff"[rng.random_range(0..22)];
                    if let Some(x) = bytes.get_mut(i) {
                        *x = b;
                    }
                }
                2 => {
                    let i = rng.random_range(0..8);
                    let b = rng.random();
                    if let Some(x) = bytes.get_mut(i) {
                        *x = b;
                    }
                }
                3 => {
                    let n = bytes.len();
                    bytes.truncate(rng.random_range(0..=n));
                }
                4 => bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
                _ => {
                    // A plausible but wrong header length.
                    let delta = rng.random_range(-16i64..16);
                    let n = (header_len as i64 + delta).max(0) as u64;
                    if bytes.len() >= 8 {
                        bytes[..8].copy_from_slice(&n.to_le_bytes());
                    }
                }
            }
        }
        fs::write(&file, &bytes).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| -> std::result::Result<(), PivotError> {
            let ck = Checkpoint::open(&file)?;
            let names: Vec<String> = ck.names().map(str::to_string).collect();
            for name in names {
                let info = ck.info(&name).unwrap().clone();
                assert_eq!(ck.tensor(&name)?.size(), info.shape, "{name}");
            }
            Ok(())
        }));
        match outcome {
            Ok(Ok(())) => opened += 1,
            Ok(Err(e)) => {
                failed += 1;
                assert!(e.to_string().contains("mutant.safetensors"), "mutant {iteration}: {e}");
            }
            Err(_) => {
                let keep = dir.join(format!("panic-{iteration}.safetensors"));
                fs::copy(&file, &keep).unwrap();
                panic!("the reader panicked on mutant {iteration} (kept as {})", keep.display());
            }
        }
    }
    assert!(opened > 0 && failed > 0, "the mutants should both pass and fail: {opened} opened, {failed} refused");
}
