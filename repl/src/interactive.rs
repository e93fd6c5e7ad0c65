//! The interactive loop: rustyline with the kernel's scanner as validator, engine completions,
//! history appended after every input.

use std::borrow::Cow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pivot_engine::scan::{self, Completeness};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::FileHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Cmd, CompletionType, Config, ConditionalEventHandler, Context, EditMode, Editor, Event, EventContext, EventHandler, KeyCode, KeyEvent, Modifiers, Movement, RepeatCount, Word};

use crate::engine::Engine;
use crate::{Flow, Repl};

struct Helper {
    engine: Arc<Engine>,
}

impl Completer for Helper {
    type Candidate = Pair;
    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, _end, cands) = self.engine.complete(line, pos);
        let pairs = cands.into_iter().map(|(code, _kind)| Pair { display: code.clone(), replacement: code }).collect();
        Ok((start.min(pos), pairs))
    }
}

impl Hinter for Helper {
    type Hint = String;
}

impl Highlighter for Helper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(&'s self, prompt: &'p str, _default: bool) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for Helper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        let input = ctx.input();
        // Two empty lines always submit (escape hatch for a scanner mistake); rustc reports the rest.
        if input.trim_end_matches([' ', '\t']).ends_with("\n\n") {
            return Ok(ValidationResult::Valid(None));
        }
        Ok(match scan::check(input) {
            Completeness::Incomplete { .. } => ValidationResult::Incomplete,
            _ => ValidationResult::Valid(None),
        })
    }
}

impl rustyline::Helper for Helper {}

/// Ctrl-Z at the prompt of an adopted REPL. rustyline's own suspend signals this process's group,
/// which is orphaned in an adopted engine (`pivot_engine::jobctl`), so it would do nothing: the
/// launcher stops with the engine instead, with the terminal in the mode it had before the prompt
/// while the shell has it, and back in rustyline's mode after `fg`.
struct SuspendWithLauncher {
    /// The terminal's mode before rustyline's raw mode: what the shell gets back.
    shell_mode: libc::termios,
}

impl ConditionalEventHandler for SuspendWithLauncher {
    fn handle(&self, _evt: &Event, _n: RepeatCount, _positive: bool, _ctx: &EventContext) -> Option<Cmd> {
        // SAFETY: termios calls on fd 0 with a valid struct.
        let mut editing_mode: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut editing_mode) } != 0 {
            return None;
        }
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &self.shell_mode) };
        pivot_engine::jobctl::suspend_with_launcher();
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &editing_mode) };
        Some(Cmd::Repaint)
    }
}

/// `PIVOT_REPL_HISTORY`, else `<data dir>/pivot-lab/history.txt`.
pub fn history_path() -> PathBuf {
    std::env::var_os("PIVOT_REPL_HISTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| pivot_engine::paths::data_dir().join("history.txt"))
}

pub fn run(repl: &mut Repl, vi: bool) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::builder()
        .auto_add_history(true)
        .history_ignore_space(true)
        .completion_type(if std::env::var("PIVOT_COMPLETION_TYPE").as_deref() == Ok("circular") { CompletionType::Circular } else { CompletionType::List })
        .edit_mode(if vi { EditMode::Vi } else { EditMode::Emacs })
        .max_history_size(10_000)?;
    if vi {
        cfg = cfg.keyseq_timeout(Some(0));
    }
    let mut ed: Editor<Helper, FileHistory> = Editor::with_config(cfg.build())?;
    ed.set_helper(Some(Helper { engine: repl.engine.clone() }));
    ed.bind_sequence(KeyEvent(KeyCode::Left, Modifiers::CTRL), Cmd::Move(Movement::BackwardWord(1, Word::Big)));
    ed.bind_sequence(KeyEvent(KeyCode::Right, Modifiers::CTRL), Cmd::Move(Movement::ForwardWord(1, rustyline::At::AfterEnd, Word::Big)));
    if pivot_engine::jobctl::has_launcher() {
        // SAFETY: reads the terminal's mode into a valid struct.
        let mut shell_mode: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut shell_mode) } == 0 {
            ed.bind_sequence(KeyEvent::ctrl('Z'), EventHandler::Conditional(Box::new(SuspendWithLauncher { shell_mode })));
        }
    }
    let hist = history_path();
    if let Some(dir) = hist.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = ed.load_history(&hist);
    if let Ok(p) = ed.create_external_printer() {
        repl.out.set_printer(Box::new(p));
    }
    let prompt: (&str, String) = if repl.out.color_out { (">> ", "\x1b[1;33m>> \x1b[0m".to_string()) } else { (">> ", ">> ".to_string()) };
    loop {
        match ed.readline(&prompt) {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                if let Err(e) = ed.append_history(&hist) {
                    repl.out.note(&format!("could not save history to {}: {e}", hist.display()));
                }
                match repl.input(&line) {
                    Flow::Ok | Flow::Error => {}
                    Flow::Quit => break,
                }
            }
            // Ctrl-C at the prompt: the line is dropped, a fresh prompt follows.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                repl.out.note(&format!("terminal error: {e}"));
                break;
            }
        }
    }
    Ok(if repl.failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
