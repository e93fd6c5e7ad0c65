//! `pivot-kernel`: the PIVOT Lab Jupyter kernel.
//!
//!   pivot-kernel kernel --connection-file FILE   serve Jupyter (what kernel.json runs)
//!   pivot-kernel install [--user|--sys-prefix|--prefix P|--dir D] [--name N]
//!   pivot-kernel uninstall [same location flags]
//!   pivot-kernel warm [--slot K] [--force]       build the prelude into a slot (default 0)
//!   pivot-kernel spare                           start an engine and wait for a kernel to adopt it
//!   pivot-kernel spare --detach [--timeout S]    the same in the background; returns once it is ready
//!   pivot-kernel run NB.ipynb [--allow-errors] [-p name=value]... [--output OUT.ipynb]

use std::path::PathBuf;
use std::process::ExitCode;

use pivot_engine::{self as engine, buildlog, paths, slots};
use pivot_kernel::jupyter::{install, nbrun, server};

fn main() -> ExitCode {
    // This executable is also evcxr's child process and its rustc wrapper: those roles must be
    // taken before anything else happens (threads, argument parsing), or evcxr re-spawns us.
    pivot_engine::fastbuild::shim_hook();
    if pivot_engine::child::is_runtime_child() {
        pivot_engine::child::child_main();
    }
    pivot_engine::fastbuild::wrapper_hook();
    evcxr::runtime_hook();
    engine::spare::snapshot_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pivot-kernel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: pivot-kernel kernel --connection-file FILE
       pivot-kernel install [--user|--sys-prefix|--prefix P|--dir D] [--name NAME]
       pivot-kernel uninstall [--user|--sys-prefix|--prefix P|--dir D] [--name NAME]
       pivot-kernel warm [--slot K] [--force]
       pivot-kernel spare [--detach [--timeout SECONDS]]
       pivot-kernel run NOTEBOOK.ipynb [--allow-errors] [-p NAME=RUST_EXPR]... [--output OUT.ipynb]";

fn take_value(args: &[String], i: &mut usize, flag: &str) -> anyhow::Result<String> {
    *i += 1;
    args.get(*i).cloned().ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))
}

fn location(args: &[String]) -> anyhow::Result<(install::Location, String)> {
    let mut loc = install::Location::User;
    let mut name = install::KERNEL_NAME.to_string();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--user" => loc = install::Location::User,
            "--sys-prefix" => loc = install::Location::SysPrefix,
            "--prefix" => loc = install::Location::Prefix(PathBuf::from(take_value(args, &mut i, "--prefix")?)),
            "--dir" => loc = install::Location::Dir(PathBuf::from(take_value(args, &mut i, "--dir")?)),
            "--name" => name = take_value(args, &mut i, "--name")?,
            other => anyhow::bail!("unknown option {other}\n{USAGE}"),
        }
        i += 1;
    }
    Ok((loc, name))
}

/// Locks a build slot and exports it to evcxr; must run before any thread starts.
/// Slot `want` (or PIVOT_SLOT's), else a free one; with `patience`, a free warm one if one comes
/// free within it (`slots::acquire_warm`, for a spare).
fn take_slot(want: Option<usize>, patience: std::time::Duration) -> anyhow::Result<slots::Slot> {
    let want = want.or_else(|| std::env::var("PIVOT_SLOT").ok().and_then(|s| s.parse().ok()));
    let slot = if patience.is_zero() {
        slots::acquire(&paths::cache_dir(), want)?
    } else {
        slots::acquire_warm(&paths::cache_dir(), want, patience)?
    };
    engine::prepare_process_env(&slot.dir);
    Ok(slot)
}

/// The `kernel` command's options: the connection file's path and contents.
fn kernel_args(rest: &[String]) -> anyhow::Result<(String, server::ConnectionInfo)> {
    let mut file = None;
    let mut i = 0;
    while i < rest.len() {
        match rest[i].as_str() {
            // -f is what `jupyter console --existing` style tooling passes; --control_file
            // is evcxr_jupyter's spelling, accepted so old kernelspecs keep working.
            "--connection-file" | "-f" | "--control_file" => file = Some(take_value(rest, &mut i, "--connection-file")?),
            other => anyhow::bail!("unknown option {other}\n{USAGE}"),
        }
        i += 1;
    }
    let file = file.ok_or_else(|| anyhow::anyhow!("--connection-file is required\n{USAGE}"))?;
    let conn = server::ConnectionInfo::load(std::path::Path::new(&file))?;
    Ok((file, conn))
}

/// `pivot-kernel spare`: starts an engine as `kernel` would (same slot choice, same session, its
/// build log on the same pipe), makes rust-analyzer do its first inference, and waits for a
/// `pivot-kernel kernel` (or `pivot-kernel run`) of the same configuration to hand itself over
/// (`engine::spare`). Then it is that kernel (or runs that notebook).
fn spare() -> anyhow::Result<ExitCode> {
    let Some(mut claim) = engine::spare::claim(engine::Frontend::Jupyter)? else {
        eprintln!("pivot-kernel spare: a spare engine for this configuration is already running");
        return Ok(ExitCode::SUCCESS);
    };
    buildlog::install();
    let mut slot = take_slot(None, engine::spare::SLOT_PATIENCE)?;
    let (warm, mut switch) = engine::spare::start_warm(engine::Frontend::Jupyter, &slot, "pivot-kernel spare")?;
    let (mut session, warm_up_cpu_s) = (warm.session, warm.cpu_s);
    let mut ready_at = warm.ready_at;
    // Each round serves one kernel; a recycled engine (`engine::spare::recycling`) goes round again.
    for served in 1u64.. {
        let interrupter = session.interrupter();
        let Some(adoption) = claim.wait(engine::spare::idle_timeout(), buildlog::original_stderr(), move || interrupter.kill_child())? else {
            return Ok(ExitCode::SUCCESS);
        };
        let round = match adoption.args.split_first() {
            Some((cmd, rest)) if cmd == "kernel" => kernel_args(rest).map(|(file, conn)| Round::Kernel(file, conn)),
            Some((cmd, rest)) if cmd == "run" => run_args(rest).map(|(nb, opts)| Round::Run(nb, opts)),
            _ => {
                eprintln!("pivot-kernel: a spare engine was handed {:?}, not a kernel or run command", adoption.args);
                engine::spare::exit(2);
            }
        };
        let round = round.unwrap_or_else(|e| {
            eprintln!("pivot-kernel: {e:#}");
            engine::spare::exit(2);
        });
        eprintln!(
            "pivot-kernel: adopted spare engine pid {} for {} (launcher pid {}, which waited {:.1} s for the warm-up; engine ready {:.1} s before, handover {:.0} ms; launch {served} of this engine) with build slot {} ({})",
            std::process::id(),
            round.target(),
            adoption.launcher_pid,
            adoption.launcher_waited.as_secs_f64(),
            ready_at.elapsed().as_secs_f64(),
            adoption.handover.as_secs_f64() * 1e3,
            slot.index,
            slot.dir.display()
        );
        engine::spare::record_adoption(&adoption, session.startup, if served == 1 { warm_up_cpu_s } else { 0.0 }, served);
        let code = match round {
            Round::Kernel(_, conn) => {
                // Returns only when the kernel shut down cleanly with its engine idle and recycling
                // is on; otherwise the process ends in there.
                let recycled = match server::run(conn, slot, Some(server::Prestarted { session, switch })) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("pivot-kernel: {e:#}");
                        engine::spare::exit(1);
                    }
                };
                (session, slot, switch) = (recycled.session, recycled.slot, recycled.switch);
                0
            }
            Round::Run(nb, opts) => {
                ignore_sigxfsz();
                let (failure, back) = match nbrun::run(&nb, &opts, Some((session, switch.clone()))) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("pivot-kernel run: {e:#}");
                        engine::spare::exit(1);
                    }
                };
                slot.mark_warm();
                let code = if run_status(&nb, &opts, failure) == ExitCode::SUCCESS { 0 } else { 1 };
                let _ = std::io::Write::flush(&mut std::io::stdout());
                match back {
                    Some(s) if engine::spare::recycling() => session = s,
                    _ => engine::spare::exit(code),
                }
                code
            }
        };
        // The kernel shut down cleanly (or the notebook ran) and the engine is idle: it becomes the
        // spare for the next launch of this configuration.
        let Some(next) = engine::spare::recycle_for_next(engine::Frontend::Jupyter, &mut session, &switch, code, served, slot.index, || {}) else {
            return Ok(ExitCode::from(1));
        };
        claim = next;
        ready_at = std::time::Instant::now();
    }
    unreachable!("the rounds above end the process or return")
}

/// What a spare engine was handed: a kernel (connection file) or a headless run (`run`).
enum Round {
    Kernel(String, server::ConnectionInfo),
    Run(PathBuf, nbrun::RunOptions),
}

impl Round {
    fn target(&self) -> String {
        match self {
            Round::Kernel(file, _) => file.clone(),
            Round::Run(nb, _) => format!("run {}", nb.display()),
        }
    }
}

/// `run NOTEBOOK [--allow-errors] [-p NAME=VALUE]... [-o OUT]`.
fn run_args(rest: &[String]) -> anyhow::Result<(PathBuf, nbrun::RunOptions)> {
    let mut nb = None;
    let mut opts = nbrun::RunOptions { allow_errors: false, params: vec![], output: None };
    let mut i = 0;
    while i < rest.len() {
        match rest[i].as_str() {
            "--allow-errors" => opts.allow_errors = true,
            "-p" | "--param" => {
                let kv = take_value(rest, &mut i, "-p")?;
                let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("-p wants NAME=VALUE, got {kv:?}"))?;
                opts.params.push((k.trim().to_string(), v.to_string()));
            }
            "--output" | "-o" => opts.output = Some(PathBuf::from(take_value(rest, &mut i, "--output")?)),
            other if !other.starts_with('-') && nb.is_none() => nb = Some(PathBuf::from(other)),
            other => anyhow::bail!("unknown option {other}\n{USAGE}"),
        }
        i += 1;
    }
    Ok((nb.ok_or_else(|| anyhow::anyhow!("which notebook?\n{USAGE}"))?, opts))
}

/// A write over RLIMIT_FSIZE then fails with EFBIG like a full disk (an error that names the
/// notebook, the temporary file removed) instead of killing the process.
fn ignore_sigxfsz() {
    // SAFETY: only changes the disposition of one signal.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// What `run` says and its exit status, once the notebook is written.
fn run_status(nb: &std::path::Path, opts: &nbrun::RunOptions, failure: Option<String>) -> ExitCode {
    let written = opts.output.as_deref().unwrap_or(nb).display();
    match failure {
        None => {
            println!("executed {written}");
            ExitCode::SUCCESS
        }
        Some(msg) => {
            eprintln!("pivot-kernel run: {msg} (outputs written to {written})");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Vec<String>) -> anyhow::Result<ExitCode> {
    let Some(cmd) = args.first().map(String::as_str) else {
        println!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    let rest = &args[1..];
    match cmd {
        "kernel" => {
            let (file, conn) = kernel_args(rest)?;
            // A spare engine of this exact configuration serves this kernel if one waits; this
            // process then only stands in for it (signals, exit status). Before the slot lock:
            // the spare holds its own.
            let log = |m: &str| eprintln!("pivot-kernel: {m}");
            if let Some(adopted) = engine::spare::try_adopt(engine::Frontend::Jupyter, &args, &log) {
                eprintln!(
                    "pivot-kernel: handed {file} over to the spare engine pid {} (waited {:.1} s for its warm-up)",
                    adopted.spare_pid,
                    adopted.waited.as_secs_f64()
                );
                adopted.proxy();
            }
            buildlog::install();
            let slot = take_slot(None, std::time::Duration::ZERO)?;
            eprintln!("pivot-kernel: serving {} with build slot {} ({})", file, slot.index, slot.dir.display());
            // Only an adopted engine is recycled; this one ends at shutdown.
            let _ = server::run(conn, slot, None)?;
            Ok(ExitCode::SUCCESS)
        }
        "spare" => {
            let (mut detach, mut timeout) = (false, 1800u64);
            let mut i = 0;
            while i < rest.len() {
                match rest[i].as_str() {
                    "--detach" => detach = true,
                    "--timeout" => {
                        let v = take_value(rest, &mut i, "--timeout")?;
                        timeout = v.parse().map_err(|e| anyhow::anyhow!("--timeout wants whole seconds, got {v:?} ({e})"))?;
                    }
                    other => anyhow::bail!("unknown option {other}\n{USAGE}"),
                }
                i += 1;
            }
            if !detach {
                return spare();
            }
            // The engine of the next kernel launched with this environment and working
            // directory, started now (tools/run_study.py, before its first notebook).
            let ready = engine::spare::prestart(engine::Frontend::Jupyter, &["spare"], std::time::Duration::from_secs(timeout))?;
            println!("{ready}");
            Ok(ExitCode::SUCCESS)
        }
        "install" => {
            let (loc, name) = location(rest)?;
            let dir = install::install(&loc, &name)?;
            println!("installed kernelspec {name:?} in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        "uninstall" => {
            let (loc, name) = location(rest)?;
            let dir = install::uninstall(&loc, &name)?;
            println!("removed {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        "warm" => {
            let (mut want, mut force) = (Some(0), false);
            let mut i = 0;
            while i < rest.len() {
                match rest[i].as_str() {
                    "--slot" => {
                        let v = take_value(rest, &mut i, "--slot")?;
                        want = Some(v.parse().map_err(|e| anyhow::anyhow!("--slot wants a slot number, got {v:?} ({e})"))?);
                    }
                    "--force" => force = true,
                    other => anyhow::bail!("unknown option {other}\n{USAGE}"),
                }
                i += 1;
            }
            let slot = take_slot(want, std::time::Duration::ZERO)?;
            // A warm-up is a whole engine start (~40 s, most of it rust-analyzer). Done already for
            // this configuration (this binary, the prelude's sources and Cargo.lock, the
            // environment: what keys a spare), the slot's build is current and it would only
            // repeat it.
            let key = engine::spare::Config::current(engine::Frontend::Jupyter).key();
            if !force && slot.warmed_for().as_deref() == Some(key.as_str()) {
                println!("slot {} ({}) is warm for this configuration already (--force warms it again)", slot.index, slot.dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            slot.seed_if_cold();
            let started = std::time::Instant::now();
            let sink: engine::Sink = std::sync::Arc::new(|e| {
                if let engine::Event::Stream { text, .. } = e {
                    eprint!("{text}");
                }
            });
            let session = engine::Session::start(engine::SessionOptions::new(engine::Frontend::Jupyter)?, sink)?;
            slot.mark_warm();
            slot.mark_warmed_for(&key);
            drop(session);
            println!("slot {} ({}) is warm: {:.1} s", slot.index, slot.dir.display(), started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        "run" => {
            let (nb, opts) = run_args(rest)?;
            // A spare engine of this configuration (`pivot-kernel spare`: same environment and
            // folder) runs the notebook if one waits, as for `kernel`: a sweep of `run -p ...`
            // with PIVOT_SPARE_ENGINE=1 pays one engine start, then recycled engines.
            let log = |m: &str| eprintln!("pivot-kernel run: {m}");
            if let Some(adopted) = engine::spare::try_adopt(engine::Frontend::Jupyter, &args, &log) {
                adopted.proxy();
            }
            ignore_sigxfsz();
            let slot = take_slot(None, std::time::Duration::ZERO)?;
            slot.seed_if_cold();
            let (failure, _) = nbrun::run(&nb, &opts, None)?;
            slot.mark_warm();
            Ok(run_status(&nb, &opts, failure))
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("unknown command {other}\n{USAGE}"),
    }
}
