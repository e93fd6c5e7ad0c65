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

// ---------------------------------------------------------------- hashes, interrupt

#[test]
fn a_same_size_corruption_is_refused_naming_the_file() {
    let _lock = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 8);
    let dir = scratch("corrupt");
    let cfg = TrainConfig::default().batch_size(4).max_steps(2).quiet();
    tch::manual_seed(0);
    let mut m = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg.clone().checkpoints(&dir, 1)).run(&mut m, &data).unwrap();
    let last = dir.join("step-000002");
    verify_checkpoint(&last).unwrap();

    // One flipped bit in the middle of the optimizer state: same size, different bytes.
    let f = last.join("optimizer.safetensors");
    let mut bytes = fs::read(&f).unwrap();
    let mid = bytes.len() - 100;
    bytes[mid] ^= 0x10;
    fs::write(&f, &bytes).unwrap();

    let err = verify_checkpoint(&last).unwrap_err();
    assert!(matches!(&err, PivotError::File { path, .. } if path == &f), "{err:?}");
    assert!(err.to_string().contains("BLAKE3"), "{err}");
    let mut r = Mllm::tiny(Device::Cpu);
    let before = weights_of(&r);
    let e = SftTrainer::new(cfg.clone()).resume(&mut r, &data, &last).unwrap_err();
    assert!(e.to_string().contains("optimizer.safetensors"), "{e}");
    assert_identical(&before, &weights_of(&r));
    // Through the parent directory, the intact step 1 is used.
    assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("step-000001"));
}

#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_and_nothing_partial() {
    let _lock = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 8);
    let dir = scratch("interrupt");
    let cfg = TrainConfig::default().batch_size(2).max_steps(4).quiet().checkpoints(&dir, 1);
    tch::manual_seed(0);
    let mut m = Mllm::tiny(Device::Cpu);
    clear_interrupt();
    // The step hook runs between step 2's update and its save: the flag is up when the save starts.
    let err = SftTrainer::new(cfg)
        .on_step(|row| {
            if row.step == 2 {
                pivot::runtime::interrupt_flag().store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .run(&mut m, &data)
        .unwrap_err();
    clear_interrupt();
    assert!(matches!(&err, PivotError::Interrupted { at } if at.contains("checkpoint save")), "{err:?}");
    let files = tree(&dir);
    assert!(files.iter().all(|f| f.starts_with("step-000001") && !f.contains(".tmp") && !f.contains(".partial")), "{files:?}");
    verify_checkpoint(dir.join("step-000001")).unwrap();
    assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("step-000001"));
}

/// Where `renameat2(RENAME_EXCHANGE)` is unavailable a re-save parks the old step as
/// `step-N.old` until the new one has its name; a crash in between leaves only `.old`, which must
/// still be found, and the next save of that step must clear it.
#[test]
fn a_crash_between_the_fallback_renames_leaves_the_old_step_findable() {
    let _lock = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 8);
    let dir = scratch("fallback");
    let cfg = TrainConfig::default().batch_size(4).max_steps(2).quiet().checkpoints(&dir, 1);
    tch::manual_seed(0);
    let mut m = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg.clone()).run(&mut m, &data).unwrap();
    fs::rename(dir.join("step-000002"), dir.join("step-000002.old")).unwrap();
    assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("step-000002.old"));

    // Re-running step 2 from step 1 saves it again under its own name and drops the `.old`.
    let mut r = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg).resume(&mut r, &data, dir.join("step-000001")).unwrap();
    assert_eq!(tree(&dir).iter().filter(|f| !f.contains('/')).collect::<Vec<_>>(), ["step-000001", "step-000002"]);
    assert_eq!(latest_checkpoint(&dir).unwrap(), dir.join("step-000002"));
    assert_identical(&weights_of(&m), &weights_of(&r));
}

// ---------------------------------------------------------------- durability under strace

/// strace from the system, installed with apt-get where missing (CI images are Debian/Ubuntu).
fn strace() -> &'static str {
    let works = || Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success());
    if !works() {
        let apt = |args: &[&str]| Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status();
        let _ = apt(&["install", "-y", "-qq", "strace"]);
        if !works() {
            let _ = apt(&["update", "-qq"]);
            let _ = apt(&["install", "-y", "-qq", "strace"]);
        }
        assert!(works(), "this test needs strace and could not install it with apt-get");
    }
    "strace"
}

/// Child: two saves of steps 1 and 2, then a resume from step 1 that saves step 2 again.
#[test]
fn strace_child() {
    let Ok(dir) = std::env::var("PIVOT_STRACE_CHILD") else { return };
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 8);
    let cfg = TrainConfig::default().batch_size(4).max_steps(2).quiet().prefetch(0).checkpoints(&dir, 1);
    tch::manual_seed(0);
    let mut m = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg.clone()).run(&mut m, &data).unwrap();
    let mut m = Mllm::tiny(Device::Cpu);
    SftTrainer::new(cfg).resume(&mut m, &data, Path::new(&dir).join("step-000001")).unwrap();
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Fsync(String),
    Rename { from: String, to: String, exchange: bool },
    Remove(String),
    Mkdir(String),
}

/// The strings between double quotes, and the paths strace's `-y` shows in `<...>` after fds.
fn quoted(s: &str) -> Vec<String> {
    s.split('"').skip(1).step_by(2).map(str::to_string).collect()
}
fn fd_paths(s: &str) -> Vec<String> {
    s.split('<').skip(1).filter_map(|p| p.split('>').next()).map(str::to_string).collect()
}

/// Parses `strace -f -y` output into the calls that matter, joining `<unfinished ...>` halves.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut calls = Vec::new();
    for raw in text.lines() {
        let (pid, rest) = raw.split_once(' ').unwrap_or(("", raw));
        let line = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid.to_string(), head.to_string());
            continue;
        } else if rest.starts_with("<... ") {
            let tail = rest.split_once("resumed>").map(|x| x.1).unwrap_or("");
            format!("{}{tail}", pending.remove(pid).unwrap_or_default())
        } else {
            rest.to_string()
        };
        let line = line.trim();
        if !line.ends_with(" = 0") && !line.contains(" = 0 ") {
            continue; // failed calls changed nothing
        }
        let name = line.split('(').next().unwrap_or("");
        let args = &line[name.len()..];
        let join = |dir: &str, name: &str| if name.starts_with('/') { name.to_string() } else { format!("{dir}/{name}") };
        match name {
            "fsync" | "fdatasync" => calls.extend(fd_paths(args).into_iter().next().map(Call::Fsync)),
            "rename" | "renameat" | "renameat2" => {
                let q = quoted(args);
                let dirs = fd_paths(args);
                if q.len() == 2 {
                    let (d0, d1) = (dirs.first().cloned().unwrap_or_default(), dirs.get(1).cloned().unwrap_or_default());
                    calls.push(Call::Rename { from: join(&d0, &q[0]), to: join(&d1, &q[1]), exchange: args.contains("RENAME_EXCHANGE") });
                }
            }
            "unlink" | "rmdir" => calls.extend(quoted(args).into_iter().next().map(Call::Remove)),
            "unlinkat" => {
                if let (Some(d), Some(n)) = (fd_paths(args).into_iter().next(), quoted(args).into_iter().next()) {
                    calls.push(Call::Remove(join(&d, &n)));
                }
            }
            "mkdir" | "mkdirat" => calls.extend(quoted(args).into_iter().next().map(Call::Mkdir)),
            _ => {}
        }
    }
    calls
}

#[test]
fn checkpoint_files_and_directories_are_fsynced_before_they_are_named() {
    let strace = strace();
    let dir = scratch("strace");
    let dir = dir.canonicalize().unwrap();
    let trace = dir.join("trace.txt");
    let ckpts = dir.join("ckpt");
    let status = Command::new(strace)
        .args(["-f", "-y", "-qq", "-o"])
        .arg(&trace)
        .args(["-e", "trace=openat,rename,renameat,renameat2,fsync,fdatasync,unlink,unlinkat,rmdir,mkdir,mkdirat"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "strace_child", "--nocapture", "--test-threads=1"])
        .env("PIVOT_STRACE_CHILD", &ckpts)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the traced child failed");
    let calls = parse_trace(&fs::read_to_string(&trace).unwrap());
    let pos = |pred: &dyn Fn(&Call) -> bool, after: usize| calls.iter().skip(after).position(pred).map(|i| i + after);

    let s = |p: &Path| p.to_string_lossy().into_owned();
    // Three saves: step 1, step 2, step 2 again. Walk them in order.
    let mut cursor = 0;
    for (save, step) in [(1, "step-000001"), (2, "step-000002"), (3, "step-000002")] {
        let final_dir = s(&ckpts.join(step));
        let tmp = format!("{final_dir}.tmp");
        let start = pos(&|c| *c == Call::Mkdir(tmp.clone()), cursor).unwrap_or_else(|| panic!("save {save}: no mkdir of {tmp}"));
        let install = pos(&|c| matches!(c, Call::Rename { from, to, .. } if *from == tmp && *to == final_dir), start)
            .unwrap_or_else(|| panic!("save {save}: {tmp} never renamed to {final_dir}"));
        for file in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "MANIFEST.json"] {
            let named = format!("{tmp}/{file}");
            let partial = format!("{named}.partial");
            let rename = pos(&|c| matches!(c, Call::Rename { from, to, .. } if *from == partial && *to == named), start)
                .filter(|&i| i < install)
                .unwrap_or_else(|| panic!("save {save}: {partial} not renamed to {file} before the install"));
            assert!(
                calls[start..rename].contains(&Call::Fsync(partial.clone())),
                "save {save}: {partial} was renamed without an fsync of its data"
            );
        }
        let last_into_tmp = (start..install).rev().find(|&i| matches!(&calls[i], Call::Rename { to, .. } if to.starts_with(&format!("{tmp}/")))).unwrap();
        assert!(
            calls[last_into_tmp..install].contains(&Call::Fsync(tmp.clone())),
            "save {save}: the directory {tmp} was not fsynced between its last entry and its rename"
        );
        let parent = s(&ckpts);
        let synced = pos(&|c| *c == Call::Fsync(parent.clone()), install);
        let next = pos(&|c| matches!(c, Call::Mkdir(d) if d.ends_with(".tmp")), install + 1).unwrap_or(calls.len());
        assert!(synced.is_some_and(|i| i < next), "save {save}: {parent} not fsynced after the rename");
        if save == 3 {
            // The re-save of an existing step: swapped in atomically, old files removed only after.
            assert!(matches!(&calls[install], Call::Rename { exchange: true, .. }), "{:?}", calls[install]);
            let early = calls[start..install].iter().find(|c| matches!(c, Call::Remove(p) if p == &final_dir || p.starts_with(&format!("{final_dir}/"))));
            assert!(early.is_none(), "the old {step} was deleted before the new one was in place: {early:?}");
        }
        cursor = install + 1;
    }
    verify_checkpoint(ckpts.join("step-000002")).unwrap();
    assert_eq!(tree(&ckpts).iter().filter(|f| f.contains(".tmp") || f.contains(".old") || f.contains(".partial")).count(), 0);
}

// ---------------------------------------------------------------- SIGKILL during saves

const KILL_STEPS: usize = 6;

/// Child: trains `KILL_STEPS` steps with a checkpoint after each, resuming from the newest complete
/// checkpoint in the directory if there is one; prints `STEP n` after each step's update, right
/// before its save.
#[test]
fn kill_child() {
    let Ok(dir) = std::env::var("PIVOT_KILL_CHILD") else { return };
    tch::set_num_threads(1);
    let data = ShapesWorld::new(ShapesConfig::default()).vqa(Split::Train, 12);
    tch::manual_seed(11);
    let mut m = Mllm::tiny(Device::Cpu);
    let cfg = TrainConfig { lr: 1e-3, ..TrainConfig::default() }
        .batch_size(2)
        .max_steps(KILL_STEPS)
        .seed(5)
        .quiet()
        .prefetch(0)
        .checkpoints(&dir, 1);
    let mut trainer = SftTrainer::new(cfg).on_step(|row| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "STEP {}", row.step).unwrap();
        out.flush().unwrap();
    });
    match latest_checkpoint(&dir) {
        Some(p) => trainer.resume(&mut m, &data, p).unwrap(),
        None => trainer.run(&mut m, &data).unwrap(),
    };
    println!("DONE");
}

enum Outcome {
    Killed,
    Finished,
}

/// Runs the kill child on `dir`; kills it `delay` after it prints `STEP kill_after` (never if None).
/// Returns how it ended and the gaps between its `STEP` lines.
fn run_child(dir: &Path, kill_after: Option<usize>, delay: Duration) -> (Outcome, Vec<Duration>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill_child", "--nocapture", "--test-threads=1"])
        .env("PIVOT_KILL_CHILD", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut gaps = Vec::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.ends_with("DONE") {
            done = true;
        }
        // The harness's "test kill_child ... " shares a line with the first STEP.
        let Some(step) = line.rsplit_once("STEP ").and_then(|(_, s)| s.trim().parse::<usize>().ok()) else { continue };
        let now = Instant::now();
        if let Some(t) = last {
            gaps.push(now - t);
        }
        last = Some(now);
        if Some(step) == kill_after {
            std::thread::sleep(delay);
            child.kill().unwrap(); // SIGKILL
            let _ = child.wait();
            return (Outcome::Killed, gaps);
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success() && done, "the training child failed: {status}");
    (Outcome::Finished, gaps)
}

/// What an unfinished save leaves on disk (`.tmp` directories, `.partial` files, `.old` swaps),
/// with modification times, so that a new leftover is told from an old one.
fn leftovers(dir: &Path) -> Vec<(String, Option<std::time::SystemTime>)> {
    tree(dir)
        .into_iter()
        .filter(|f| f.contains(".tmp") || f.contains(".partial") || f.contains(".old"))
        .map(|f| {
            let t = fs::metadata(dir.join(&f)).and_then(|m| m.modified()).ok();
            (f, t)
        })
        .collect()
}

/// (model, optimizer) bytes and the loss log of a checkpoint.
fn contents(ckpt: &Path) -> (Vec<u8>, Vec<u8>, Vec<f64>) {
    let state: TrainerState = serde_json::from_str(&fs::read_to_string(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    (fs::read(ckpt.join("model.safetensors")).unwrap(), fs::read(ckpt.join("optimizer.safetensors")).unwrap(), state.log.get("loss"))
}

/// 50 SIGKILLs of a real training process at random points during its saves. After every kill the
/// directory holds only complete checkpoints (plus leftovers the next save ignores), each
/// identical to the uninterrupted run's checkpoint of the same step, and the next process resumes
/// from the newest one; every sequence ends with the uninterrupted run's final weights.
#[test]
fn sigkill_during_saves_always_resumes_bit_identically() {
    let root = scratch("kill");
    let reference = root.join("reference");
    let (_, gaps) = run_child(&reference, None, Duration::ZERO);
    let expected: BTreeMap<usize, (Vec<u8>, Vec<u8>, Vec<f64>)> =
        (1..=KILL_STEPS).map(|s| (s, contents(&reference.join(format!("step-{s:06}"))))).collect();
    // A kill lands uniformly in the time from a step's `STEP` line (its save starts right after)
    // to the next one: one save plus one step, the median on the reference run.
    let mut gaps = gaps;
    gaps.sort();
    let window = gaps.get(gaps.len() / 2).copied().unwrap_or(Duration::from_millis(100));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xC0FFEE);
    let dir = root.join("run");
    let (mut kills, mut mid_save, mut sequences, mut resumes) = (0, 0, 0, 0);
    let started = Instant::now();
    while kills < 50 {
        let done = latest_checkpoint(&dir).map(|p| contents(&p).2.len()).unwrap_or(0);
        if done > 0 {
            resumes += 1;
        }
        // Mostly the first save after the resume (the cheapest trial), sometimes the one after.
        let target = rng.random_range(done + 1..=(done + 2).min(KILL_STEPS));
        let delay = window.mul_f64(rng.random::<f64>());
        let before = leftovers(&dir);
        let (outcome, _) = run_child(&dir, Some(target), delay);
        if let Outcome::Killed = outcome {
            kills += 1;
            let after = leftovers(&dir);
            if !after.is_empty() && after != before {
                mid_save += 1;
            }
        }
        // Every named checkpoint is complete and equal to the reference's.
        let mut newest = 0;
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) else { continue };
            verify_checkpoint(entry.path()).unwrap_or_else(|e| panic!("kill {kills}: {name} is not complete: {e}"));
            assert!(contents(&entry.path()) == expected[&step], "kill {kills}: {name} differs from the uninterrupted run");
            newest = newest.max(step);
        }
        let latest = latest_checkpoint(&dir);
        assert_eq!(latest.map(|p| p.file_name().unwrap().to_string_lossy().into_owned()), (newest > 0).then(|| format!("step-{newest:06}")));
        if newest == KILL_STEPS {
            sequences += 1;
            fs::remove_dir_all(&dir).unwrap();
        }
    }
    eprintln!(
        "{kills} SIGKILLs ({mid_save} left a save half-done on disk), {resumes} resumes, {sequences} complete runs, all bit-identical; kill window {} ms; {:.1} s",
        window.as_millis(),
        started.elapsed().as_secs_f64()
    );
    assert!(mid_save >= 10, "only {mid_save} of {kills} kills landed inside a save: the timing window is off");
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
    let mut tensors = sample_tensors();
    // 1 MiB at the end: a truncation then cuts whole pages, which a memory map turns into SIGBUS.
    tensors.push(("big".into(), Tensor::randn([256, 1024], (Kind::Float, Device::Cpu))));
    let path = dir.join("w.safetensors");

    weights::write_safetensors(&tensors, &path).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
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
