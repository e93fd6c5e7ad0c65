//! `pivot-repl`: the PIVOT Lab terminal REPL, on the Jupyter kernel's engine (evcxr with the
//! `pivot` prelude preloaded in a persistent build slot).
//!
//!   pivot-repl [--edit-mode emacs|vi] [--no-color]          interactive (stdin is a terminal)
//!   pivot-repl [options] SCRIPT.rs                          run a script cell by cell
//!   echo 'CODE' | pivot-repl                                run stdin, statement by statement
//!   pivot-repl --spare [--detach [--timeout S]]             a pre-started engine for the next REPL
//!
//! Environment: PIVOT_REPL_HISTORY (history file; default `<data dir>/pivot-lab/history.txt`),
//! PIVOT_FIGURES_DIR (where figures are saved; default ./pivot-figures), PIVOT_IMAGES
//! (kitty|iterm|file: force the image protocol), PIVOT_SLOT (build slot), NO_COLOR, and the
//! kernel's PIVOT_CACHE_DIR / PIVOT_PYTHON / PIVOT_PRELUDE / PIVOT_INTERRUPT_GRACE_SECS;
//! PIVOT_SPARE_ENGINE=1 keeps a spare engine for the next REPL (`engine::spare`).

mod cells;
mod engine;
mod interactive;
mod render;
mod sys;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pivot_engine::{paths, slots, Event, InterruptOutcome, Sink};
use pivot_engine::scan::{self, Completeness};

use engine::Engine;
use render::Out;

const USAGE: &str = "usage: pivot-repl [--edit-mode emacs|vi] [--no-color] [SCRIPT.rs | -]

  no SCRIPT, stdin a terminal   interactive REPL (rustyline; history, completion, Ctrl-C interrupts)
  SCRIPT.rs                     run the file cell by cell; exit 1 at the first error
  - or stdin not a terminal     run stdin statement by statement; exit 1 at the first error

Cells in a script are separated by `// %%` lines if there are any, otherwise by blank lines at
top level (a blank line inside a block or string does not split). Type :help at the prompt.";

pub const HELP: &str = "PIVOT Lab REPL — the `pivot` prelude is loaded (`use pivot::prelude::*`).
  Enter runs the input once brackets, strings and blocks are closed; two empty lines force it.
  Tab completes; Ctrl-C stops a running cell (loops should poll `check_interrupt(\"..\")?`;
  a cell that ignores it is killed after the grace period) or clears the line; Ctrl-D exits.
Commands:
  :help              this text (:help evcxr lists evcxr's own commands)
  :vars              variables and their types
  :type EXPR / :t    the type of a variable or expression
  :dep NAME = SPEC   add a crate, e.g. :dep rand = \"0.9\"
  :timing            toggle timing of each input
  :save FILE         write the inputs that ran successfully as a script
  :load FILE         run a script here, cell by cell (stops at the first error)
  :quit              exit (or Ctrl-D)
Figures are shown inline on kitty/iTerm2, otherwise saved under $PIVOT_FIGURES_DIR (./pivot-figures).";

fn main() -> ExitCode {
    // This executable is also evcxr's child process and its rustc wrapper: those roles must be
    // taken before anything else happens (threads, argument parsing), or evcxr re-spawns us.
    pivot_engine::fastbuild::shim_hook();
    if pivot_engine::child::is_runtime_child() {
        pivot_engine::child::child_main();
    }
    pivot_engine::fastbuild::wrapper_hook();
    evcxr::runtime_hook();
    pivot_engine::spare::snapshot_env();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = if argv.first().map(String::as_str) == Some("--spare") {
        match &argv[1..] {
            [] => spare(),
            [d] if d == "--detach" => prestart(1800),
            [d, t, secs] if d == "--detach" && t == "--timeout" => {
                secs.parse().map_err(|e| anyhow::anyhow!("--timeout wants whole seconds, got {secs:?} ({e})")).and_then(prestart)
            }
            _ => Err(anyhow::anyhow!("usage: pivot-repl --spare [--detach [--timeout SECONDS]]")),
        }
    } else {
        real_main(argv)
    };
    let code = report(result);
    if pivot_engine::spare::adopted() {
        // The launcher exits with this status.
        pivot_engine::spare::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    code
}

/// The exit status of a REPL's result, with the error (if any) on stderr.
fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pivot-repl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A session a spare engine started before this REPL was launched.
struct Prestarted {
    session: pivot_engine::Session,
    switch: pivot_engine::spare::SinkSwitch,
    slot: slots::Slot,
}

/// `pivot-repl --spare`: starts an engine as the REPL would (same slot choice, same session),
/// makes rust-analyzer do its first inference, and waits for a `pivot-repl` of the same
/// configuration to hand over its terminal and arguments (`pivot_engine::spare`); then it is
/// that REPL. With `PIVOT_SPARE_ENGINE=1` the engine is recycled when that REPL ends (its script
/// done, or the user quit at the prompt, with no cell running): the launcher exits with the
/// REPL's status, `Session::recycle` gives the engine a fresh child process and evcxr state
/// while rust-analyzer and the build slot stay warm, and it waits for the next `pivot-repl` of
/// this configuration, as the kernel's spare does.
fn spare() -> anyhow::Result<ExitCode> {
    use pivot_engine::spare;
    let Some(mut claim) = spare::claim(pivot_engine::Frontend::Repl)? else {
        eprintln!("pivot-repl --spare: a spare engine for this configuration is already running");
        return Ok(ExitCode::SUCCESS);
    };
    let want = std::env::var("PIVOT_SLOT").ok().and_then(|s| s.parse().ok());
    let slot = slots::acquire_warm(&paths::cache_dir(), want, spare::SLOT_PATIENCE)?;
    pivot_engine::prepare_process_env(&slot.dir);
    let (warm, switch) = spare::start_warm(pivot_engine::Frontend::Repl, &slot, "pivot-repl --spare")?;
    let warm_up_cpu_s = warm.cpu_s;
    let mut engine = Prestarted { session: warm.session, switch, slot };
    // Each round serves one REPL; a recycled engine goes round again.
    for served in 1u64.. {
        let interrupter = engine.session.interrupter();
        let Some(adoption) = claim.wait(spare::idle_timeout(), 2, move || interrupter.kill_child())? else {
            return Ok(ExitCode::SUCCESS);
        };
        spare::record_adoption(&adoption, engine.session.startup, if served == 1 { warm_up_cpu_s } else { 0.0 }, served);
        let (result, back) = serve_adopted(adoption.args, engine);
        let code = if report(result) == ExitCode::SUCCESS { 0 } else { 1 };
        let Some(back) = back.filter(|_| spare::recycling()) else { spare::exit(code) };
        engine = back;
        let before_release = || {
            sys::clear_sigint();
            sys::discard_buffered_stdin();
            let _ = std::io::Write::flush(&mut std::io::stdout());
        };
        let Some(next) = spare::recycle_for_next(pivot_engine::Frontend::Repl, &mut engine.session, &engine.switch, code, served, engine.slot.index, before_release) else {
            return Ok(ExitCode::FAILURE);
        };
        claim = next;
    }
    unreachable!("the rounds above end the process or return")
}

/// `pivot-repl --spare --detach`: a spare (`spare`) in the background for the next `pivot-repl`
/// launched with this environment and working directory; returns once it is ready.
fn prestart(timeout_s: u64) -> anyhow::Result<ExitCode> {
    let ready = pivot_engine::spare::prestart(pivot_engine::Frontend::Repl, &["--spare"], std::time::Duration::from_secs(timeout_s))?;
    println!("{ready}");
    Ok(ExitCode::SUCCESS)
}

/// ", N builds, code ran T s" for the timing notes: where a cell's time went.
fn build_note(r: &pivot_engine::CellResult) -> String {
    match r.run_time {
        Some(run) => format!(", {} build{}, code ran {:.3} s", r.builds, if r.builds == 1 { "" } else { "s" }, run.as_secs_f64()),
        None => String::new(),
    }
}

struct Args {
    vi: bool,
    no_color: bool,
    script: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> anyhow::Result<Option<Args>> {
    let mut a = Args { vi: false, no_color: false, script: None };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("pivot-repl {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--no-color" => a.no_color = true,
            "--edit-mode" => {
                i += 1;
                match args.get(i).map(String::as_str) {
                    Some("vi") => a.vi = true,
                    Some("emacs") => a.vi = false,
                    other => anyhow::bail!("--edit-mode wants emacs or vi, got {other:?}\n{USAGE}"),
                }
            }
            "--edit-mode=vi" => a.vi = true,
            "--edit-mode=emacs" => a.vi = false,
            other if (other == "-" || !other.starts_with('-')) && a.script.is_none() => a.script = Some(PathBuf::from(other)),
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
        i += 1;
    }
    Ok(Some(a))
}

/// The parsed arguments and the script's text; None when they asked for help or the version.
fn prepare(argv: &[String]) -> anyhow::Result<Option<(Args, Option<String>)>> {
    let Some(args) = parse_args(argv)? else { return Ok(None) };
    let script_src = match &args.script {
        Some(p) if p.as_os_str() != "-" => {
            Some(std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?)
        }
        _ => None,
    };
    Ok(Some((args, script_src)))
}

/// A launched REPL: a spare engine of this exact configuration runs it on our terminal if one
/// waits (this process then only stands in for it: signals, exit status); else it starts its own.
fn real_main(argv: Vec<String>) -> anyhow::Result<ExitCode> {
    let Some((args, script_src)) = prepare(&argv)? else { return Ok(ExitCode::SUCCESS) };
    let log = |m: &str| eprintln!("pivot-repl: {m}");
    if let Some(adopted) = pivot_engine::spare::try_adopt(pivot_engine::Frontend::Repl, &argv, &log) {
        adopted.proxy();
    }
    // Still single-threaded: lock a build slot and export it to evcxr.
    let want = std::env::var("PIVOT_SLOT").ok().and_then(|s| s.parse().ok());
    let slot = slots::acquire(&paths::cache_dir(), want)?;
    pivot_engine::prepare_process_env(&slot.dir);
    run(&args, script_src, slot, None).0
}

/// The REPL a spare engine runs for the launch that handed it `argv`; with the engine back when
/// it ended idle, for the next launch. Bad arguments leave the engine as it was.
fn serve_adopted(argv: Vec<String>, p: Prestarted) -> (anyhow::Result<ExitCode>, Option<Prestarted>) {
    match prepare(&argv) {
        Ok(Some((args, script_src))) => {
            let Prestarted { session, switch, slot } = p;
            run(&args, script_src, slot, Some((session, switch)))
        }
        Ok(None) => (Ok(ExitCode::SUCCESS), Some(p)),
        Err(e) => (Err(e), Some(p)),
    }
}

/// Runs the REPL (interactive, a script, or piped input) on `slot` with its own engine, or with a
/// spare's session; an adopted session comes back with its slot once the REPL is done.
fn run(
    args: &Args,
    script_src: Option<String>,
    slot: slots::Slot,
    prestarted: Option<(pivot_engine::Session, pivot_engine::spare::SinkSwitch)>,
) -> (anyhow::Result<ExitCode>, Option<Prestarted>) {
    let interactive = args.script.is_none() && std::io::stdin().is_terminal();
    let adopted = prestarted.is_some();
    let out = Arc::new(Out::new(args.no_color));
    if interactive && !adopted {
        let o = out.clone();
        sys::capture_stderr(move |line| o.note(&line));
    }

    let sink: Sink = {
        let out = out.clone();
        Arc::new(move |e: Event| out.event(e))
    };
    let progress: engine::Progress = {
        let out = out.clone();
        Arc::new(move |m: &str| if interactive || std::io::stderr().is_terminal() { out.note(m) })
    };
    let slot_index = slot.index;
    let switch = prestarted.as_ref().map(|(_, switch)| switch.clone());
    let engine = Arc::new(match prestarted {
        Some((session, switch)) => {
            switch.set(sink);
            if interactive || std::io::stderr().is_terminal() {
                out.note(&format!("adopted a spare engine (pid {}, build slot {slot_index})", std::process::id()));
            } else {
                eprintln!("pivot-repl: adopted spare engine pid {} (build slot {slot_index})", std::process::id());
            }
            Engine::adopt(slot, session)
        }
        None => Engine::spawn(slot, sink, progress, interactive),
    });
    let repl_state = Arc::new(AtomicBool::new(false)); // a cell is running
    {
        let engine = engine.clone();
        let running = repl_state.clone();
        let out = out.clone();
        sys::install_sigint(move || {
            if running.load(Ordering::SeqCst) {
                if let Some(i) = engine.interrupter() {
                    match i.interrupt() {
                        InterruptOutcome::Requested => out.note(
                            "interrupting… (the cell stops at its next check_interrupt; one that never checks is warned about, then restarted after the grace period)",
                        ),
                        InterruptOutcome::CompileStopped => out.note("interrupting… (stopping the build)"),
                        InterruptOutcome::Killed => out.note("restarting the Rust process now…"),
                        InterruptOutcome::Idle => {}
                    }
                }
            } else if !interactive && engine.is_ready() {
                pivot_engine::spare::exit(130);
            }
        });
    }
    let mut repl = Repl { engine, out, accepted: Vec::new(), timing: false, interactive, running: repl_state, first_result: None, failed: false };

    let result = if interactive {
        repl.out.note(&format!(
            "PIVOT Lab REPL {} — {}; type ahead. :help for help, Ctrl-D to exit.",
            env!("CARGO_PKG_VERSION"),
            if adopted { format!("engine ready (a spare, build slot {slot_index})") } else { format!("starting the engine in the background (build slot {slot_index})") }
        ));
        interactive::run(&mut repl, args.vi)
    } else {
        let ok = match script_src {
            Some(src) => repl.run_script(&src),
            None => repl.run_stream(std::io::stdin().lock()),
        };
        Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    };
    let back = switch.and_then(|switch| repl.engine.finish().map(|(session, slot)| Prestarted { session, switch, slot }));
    (result, back)
}

pub enum Flow {
    Ok,
    Error,
    Quit,
}

pub struct Repl {
    pub engine: Arc<Engine>,
    pub out: Arc<Out>,
    /// Inputs that ran successfully, for `:save`.
    pub accepted: Vec<String>,
    timing: bool,
    interactive: bool,
    running: Arc<AtomicBool>,
    /// Time from process start to the first result (PIVOT_REPL_TIMINGS=1 prints it).
    first_result: Option<f64>,
    /// The engine could not start: nothing can run.
    pub failed: bool,
}

impl Repl {
    /// Waits for the engine; false (with the reason printed) when it cannot start.
    fn ensure_engine(&mut self) -> Result<bool, String> {
        if self.engine.is_ready() {
            return Ok(true);
        }
        sys::take_sigints();
        let _echo = self.interactive.then(sys::echo_off);
        self.out.executing(true);
        self.out.start_wait_spinner("waiting for the engine to start (Ctrl-C cancels this input)");
        let r = self.engine.wait_ready(&|| sys::take_sigints() > 0);
        self.out.stop_wait_spinner();
        self.out.executing(false);
        r
    }

    /// Runs one input: a REPL command or a cell.
    pub fn input(&mut self, text: &str) -> Flow {
        let t = text.trim();
        if t.is_empty() {
            return Flow::Ok;
        }
        if t.starts_with(':') && !t.contains('\n') {
            let (cmd, arg) = t.split_once(char::is_whitespace).map(|(c, a)| (c, a.trim())).unwrap_or((t, ""));
            match cmd {
                ":help" | ":h" | ":?" if arg.is_empty() => {
                    println!("{HELP}");
                    return Flow::Ok;
                }
                ":help" if arg == "evcxr" => return self.cell(":help", false),
                ":quit" | ":q" | ":exit" => return Flow::Quit,
                ":save" => return self.save(arg),
                ":load" => return self.load(arg),
                ":timing" => {
                    self.timing = !self.timing;
                    return self.cell(":timing", false);
                }
                ":vars" | ":type" | ":t" | ":help" => return self.cell(t, false),
                _ => {}
            }
        }
        self.cell(text, true)
    }

    fn save(&mut self, arg: &str) -> Flow {
        if arg.is_empty() {
            self.out.error(&pivot_engine::CellError::new("UsageError", ":save FILE"));
            return Flow::Error;
        }
        match std::fs::write(arg, cells::to_script(&self.accepted)) {
            Ok(()) => {
                self.out.note(&format!("saved {} inputs to {arg}", self.accepted.len()));
                Flow::Ok
            }
            Err(e) => {
                self.out.error(&pivot_engine::CellError::new("IOError", format!("cannot write {arg}: {e}")));
                Flow::Error
            }
        }
    }

    fn load(&mut self, arg: &str) -> Flow {
        match std::fs::read_to_string(arg) {
            Ok(src) => {
                if self.run_script(&src) {
                    Flow::Ok
                } else {
                    Flow::Error
                }
            }
            Err(e) => {
                self.out.error(&pivot_engine::CellError::new("IOError", format!("cannot read {arg}: {e}")));
                Flow::Error
            }
        }
    }

    /// Runs a cell on the engine and prints what it produced.
    fn cell(&mut self, code: &str, record: bool) -> Flow {
        match self.ensure_engine() {
            Ok(true) => {}
            Ok(false) => {
                self.out.note("cancelled (the engine is still starting)");
                return Flow::Error;
            }
            Err(msg) => {
                self.out.error(&pivot_engine::CellError::new("EngineStartFailed", msg));
                self.failed = true;
                return Flow::Quit;
            }
        }
        sys::take_sigints();
        self.out.begin_cell();
        self.running.store(true, Ordering::SeqCst);
        let r = self.engine.execute(code);
        self.running.store(false, Ordering::SeqCst);
        self.out.end_cell();
        if let Some(v) = &r.value {
            // A trailing `for`/`while` is a `()` expression: nothing worth a line.
            let unit = v.len() == 1 && v.get("text/plain").and_then(|p| p.as_str()) == Some("()");
            if !unit {
                self.out.result(v);
            }
        }
        if self.first_result.is_none() {
            let t = self.engine.started.elapsed().as_secs_f64();
            self.first_result = Some(t);
            if std::env::var_os("PIVOT_REPL_TIMINGS").is_some() {
                self.out.note(&format!(
                    "[timings] engine ready {:.2} s, first result {:.2} s, this input {:.3} s{}",
                    self.engine.ready_after.lock().map(|d| d.map(|d| d.as_secs_f64()).unwrap_or(0.0)).unwrap_or(0.0),
                    t,
                    r.duration.as_secs_f64(),
                    build_note(&r)
                ));
            }
        } else if std::env::var_os("PIVOT_REPL_TIMINGS").is_some() {
            self.out.note(&format!("[timings] this input {:.3} s{}", r.duration.as_secs_f64(), build_note(&r)));
        }
        if self.timing {
            self.out.note(&format!("took {}", fmt_duration(r.duration)));
        }
        if let Some(e) = &r.error {
            self.out.error(e);
            if r.restarted {
                self.out.note("the Rust process was restarted: variables are gone, the prelude is loaded again");
            }
            return Flow::Error;
        }
        if record {
            self.accepted.push(code.trim_end().to_string());
        }
        Flow::Ok
    }

    /// Runs a script cell by cell; false at the first error.
    pub fn run_script(&mut self, src: &str) -> bool {
        for cell in cells::split_cells(src) {
            if self.interactive {
                let first = cell.lines().next().unwrap_or("");
                let more = if cell.lines().count() > 1 { " …" } else { "" };
                self.out.note(&format!("» {first}{more}"));
            }
            match self.input(&cell) {
                Flow::Ok => {}
                Flow::Error | Flow::Quit => return false,
            }
        }
        true
    }

    /// Runs piped input: each line completes an input as soon as the scanner says it is complete.
    pub fn run_stream(&mut self, r: impl BufRead) -> bool {
        let mut buf = String::new();
        for line in r.lines() {
            let Ok(line) = line else { break };
            buf.push_str(&line);
            buf.push('\n');
            if buf.trim().is_empty() {
                buf.clear();
                continue;
            }
            if !matches!(scan::check(&buf), Completeness::Incomplete { .. }) {
                let input = std::mem::take(&mut buf);
                match self.input(&input) {
                    Flow::Ok => {}
                    Flow::Error => return false,
                    Flow::Quit => return !self.failed,
                }
            }
        }
        if !buf.trim().is_empty() {
            return matches!(self.input(&buf), Flow::Ok | Flow::Quit) && !self.failed;
        }
        true
    }
}

pub fn fmt_duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 { format!("{:.0} ms", s * 1000.0) } else { format!("{s:.2} s") }
}
