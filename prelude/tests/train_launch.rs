//! `train::launch`: a 2-rank Gloo run of `pivot-train` under torchrun started from Rust, its loss
//! read as rank 0 writes it and its final checkpoint loaded back; and an interrupt in mid-run that
//! must end every rank. One test function: outside a front end the interrupt flag is this
//! process's own static, which a second test running in parallel could see.
//!
//! torchrun is the venv's (beside $PIVOT_PYTHON, as the Makefile sets it); pivot-train is this
//! package's binary. Cost: three torchrun launches of the tiny MLLM, about 13 s on 2 cores.

use pivot::prelude::*;
use pivot::runtime::interrupt_flag;
use pivot::train::launch::{Launch, load_checkpoint};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn config(dir: &Path, name: &str, steps: usize, every: usize) -> std::path::PathBuf {
    let out = dir.join(name);
    let text = format!(
        "stage = \"dpo\"\nthreads = 1\n[model]\nseed = 0\noutput = \"{}\"\n[data]\nworld = {{ seed = 0, samples = 16 }}\n\
         [dpo.train]\nlr = 1e-3\nwarmup_ratio = 0.0\nbatch_size = 1\nmax_steps = {steps}\nlive = false\ncheckpoint_every = {every}\ncheckpoint_dir = \"{}\"\n",
        out.display(),
        dir.join(format!("{name}-ckpt")).display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Processes whose command line names `needle` (ranks or torchrun of one launch).
fn survivors(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .filter(|&pid| pivot::train::launch::alive(pid))
        .collect()
}

#[test]
fn a_two_rank_run_streams_its_loss_loads_back_and_stops_whole_on_interrupt() {
    let dir = std::env::temp_dir().join(format!("pivot-launch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_pivot-train");
    let env = [("OMP_NUM_THREADS", "1")];

    // A whole run: every step's loss arrives, in order, and the final checkpoint is the model.
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let s = seen.clone();
    let cfg = config(&dir, "whole", 3, 3);
    let run = Launch::new(&cfg, 2).bin(bin).live(false).env(env[0].0, env[0].1).on_step(move |row| s.borrow_mut().push(row.step)).run().unwrap();
    assert_eq!(*seen.borrow(), vec![1, 2, 3], "the hook sees each step once, in order");
    let losses = run.log.get("loss");
    assert!(losses.len() == 3 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert_eq!(run.ranks.len(), 2, "two ranks seen: {:?}", run.ranks);
    assert!(run.stdout.contains("rank 1/2: 3 steps"), "{}", run.stdout);
    let saved = Mllm::from_pretrained(dir.join("whole"), Device::Cpu).unwrap();
    let loaded = Mllm::tiny(Device::Cpu);
    let state = load_checkpoint(&loaded, dir.join("whole-ckpt")).unwrap();
    assert_eq!(state.step, 3);
    for (a, b) in [(saved.lm.var_store(), loaded.lm.var_store()), (saved.tower.var_store(), loaded.tower.var_store())] {
        let (va, vb) = (a.variables(), b.variables());
        assert!(!va.is_empty());
        for (name, t) in va {
            assert!(t.equal(&vb[&name]), "{name} differs between the final checkpoint and the saved model");
        }
    }

    // An interrupt after the first step: the run ends Interrupted and no rank (nor torchrun) lives on.
    let cfg = config(&dir, "stopped", 500, 0);
    let err = Launch::new(&cfg, 2)
        .bin(bin)
        .live(false)
        .env(env[0].0, env[0].1)
        .grace(Duration::from_secs(5))
        .on_step(|row| {
            if row.step == 1 {
                interrupt_flag().store(true, Ordering::SeqCst);
            }
        })
        .run()
        .err()
        .expect("an interrupted run is an error");
    assert!(matches!(err, PivotError::Interrupted { .. }), "{err}");
    assert!(!interrupt_flag().load(Ordering::SeqCst), "the request is consumed");
    let left = survivors(&cfg.display().to_string());
    assert!(left.is_empty(), "processes of the interrupted launch still run: {left:?}");

    // A missing binary is named before anything starts; a rank's own error leads a failure's
    // message (torchrun's report of the failed workers follows it).
    let err = Launch::new(&cfg, 2).bin(dir.join("no-such-pivot-train")).run().err().expect("no binary").to_string();
    assert!(err.contains("no-such-pivot-train") && err.contains("PIVOT_TRAIN_BIN"), "{err}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "stage = \"dpo\"\n[data]\nworld = { samples = 4 }\n[dpo.train]\nbatch_sise = 2\n").unwrap();
    let err = Launch::new(&bad, 2).bin(bin).live(false).env(env[0].0, env[0].1).run().err().expect("a bad config fails").to_string();
    let first = err.lines().nth(1).unwrap_or("");
    assert!(first.starts_with("pivot-train rank ") && first.contains("batch_sise"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
