//! Terminal rendering of the engine's events and results.
//!
//! - stdout text plain, stderr text red, a cell's value green, notes dim;
//! - errors: the engine's traceback (ariadne reports with the span for compile errors);
//! - `progress` markers: indicatif bars updated in place (one final line when stderr is no tty);
//! - images: inline with the kitty or iTerm2 protocol when the terminal has one (not inside
//!   tmux/screen, which do not pass them through), else saved as PNG/SVG under
//!   `$PIVOT_FIGURES_DIR` (default `./pivot-figures`) with the path printed;
//! - HTML (tables) shown by its `text/plain` part.
//!
//! Output that arrives while the prompt is shown (engine start-up, background threads) goes
//! through rustyline's external printer so the line being typed is redrawn below it.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pivot_engine::session::strip_ansi;
use pivot_engine::{CellError, Event, StreamName};
use pivot_markers::Progress;
use serde_json::{Map, Value};

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageMode {
    Kitty,
    Iterm,
    File,
}

impl ImageMode {
    /// `PIVOT_IMAGES=kitty|iterm|file` wins; otherwise the terminal's own variables decide.
    pub fn detect(stdout_tty: bool) -> ImageMode {
        match std::env::var("PIVOT_IMAGES").as_deref() {
            Ok("kitty") => return ImageMode::Kitty,
            Ok("iterm") => return ImageMode::Iterm,
            Ok("file") => return ImageMode::File,
            _ => {}
        }
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        // Multiplexers swallow graphics escapes unless configured to pass them through.
        if !stdout_tty || std::env::var_os("TMUX").is_some() || var("TERM").starts_with("screen") {
            return ImageMode::File;
        }
        if var("TERM") == "xterm-kitty" || std::env::var_os("KITTY_WINDOW_ID").is_some() || var("TERM_PROGRAM") == "ghostty" {
            ImageMode::Kitty
        } else if matches!(var("TERM_PROGRAM").as_str(), "iTerm.app" | "WezTerm") {
            ImageMode::Iterm
        } else {
            ImageMode::File
        }
    }
}

type Printer = Box<dyn rustyline::ExternalPrinter + Send>;

/// A live bar and what its last marker said (to print its final state as text).
struct Bar {
    bar: ProgressBar,
    line: String,
}

struct State {
    bars: HashMap<String, Bar>,
    /// Display id → file it was saved to (updates overwrite it).
    figure_files: HashMap<String, PathBuf>,
    next_figure: Option<u32>,
    /// The last thing printed was this display, taking this many lines (updates redraw it).
    last_display: Option<(String, usize)>,
    /// The spinner shown while the first line waits for the engine.
    wait_spinner: Option<ProgressBar>,
}

pub struct Out {
    pub color_out: bool,
    pub color_err: bool,
    stdout_tty: bool,
    stderr_tty: bool,
    images: ImageMode,
    figures_dir: PathBuf,
    printer: Mutex<Option<Printer>>,
    /// A cell is running: output goes straight to the terminal (the prompt is not shown).
    executing: AtomicBool,
    state: Mutex<State>,
}

impl Out {
    pub fn new(no_color: bool) -> Out {
        let stdout_tty = std::io::stdout().is_terminal();
        let stderr_tty = std::io::stderr().is_terminal();
        let no_color = no_color || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let figures_dir = std::env::var_os("PIVOT_FIGURES_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("pivot-figures"));
        Out {
            color_out: stdout_tty && !no_color,
            color_err: stderr_tty && !no_color,
            stdout_tty,
            stderr_tty,
            images: ImageMode::detect(stdout_tty),
            figures_dir,
            printer: Mutex::new(None),
            executing: AtomicBool::new(false),
            state: Mutex::new(State {
                bars: HashMap::new(),
                figure_files: HashMap::new(),
                next_figure: None,
                last_display: None,
                wait_spinner: None,
            }),
        }
    }

    pub fn set_printer(&self, p: Printer) {
        *self.printer.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paint(&self, err: bool, color: &str, text: &str) -> String {
        let on = if err { self.color_err } else { self.color_out };
        if !on || color.is_empty() || text.is_empty() {
            return if on { text.to_string() } else { strip_ansi(text) };
        }
        // Colour line by line, so a reset never lands after a newline the terminal scrolled on.
        let mut s = String::with_capacity(text.len() + 16);
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                s.push('\n');
            }
            if !line.is_empty() {
                s.push_str(color);
                s.push_str(line);
                s.push_str(RESET);
            }
        }
        s
    }

    /// Writes text to stdout or stderr, around progress bars and the prompt.
    fn write(&self, err: bool, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.executing.load(Ordering::SeqCst)
            && let Some(p) = self.printer.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
        {
            let _ = p.print(text.to_string());
            return;
        }
        let (spinner, bar) = {
            let st = self.state();
            (st.wait_spinner.clone(), st.bars.values().next().map(|b| b.bar.clone()))
        };
        let raw = || {
            if err {
                crate::sys::write_stderr(text.as_bytes());
            } else {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(text.as_bytes());
                let _ = o.flush();
            }
        };
        if let Some(s) = spinner {
            s.suspend(raw);
        } else if let Some(b) = bar {
            // Clears the bar, writes, draws it again below the text.
            b.suspend(raw);
        } else {
            raw();
        }
    }

    fn forget_display(&self) {
        self.state().last_display = None;
    }

    /// A note from the REPL itself (start-up progress, timings, saved files).
    pub fn note(&self, text: &str) {
        self.forget_display();
        let mut t = self.paint(true, DIM, text);
        t.push('\n');
        self.write(true, &t);
    }

    pub fn begin_cell(&self) {
        self.executing.store(true, Ordering::SeqCst);
        self.forget_display();
    }

    /// Ends a cell: bars it left unfinished are replaced by a line with their last state.
    pub fn end_cell(&self) {
        let bars: Vec<Bar> = self.state().bars.drain().map(|(_, b)| b).collect();
        for b in bars {
            b.bar.finish_and_clear();
            let line = format!("{}\n", self.paint(true, DIM, &b.line));
            self.write(true, &line);
        }
        self.executing.store(false, Ordering::SeqCst);
    }

    pub fn event(&self, e: Event) {
        match e {
            Event::Stream { name, text } => {
                self.forget_display();
                let err = name == StreamName::Stderr;
                let t = if err { self.paint(true, RED, &text) } else { self.paint(false, "", &text) };
                self.write(err, &t);
            }
            Event::Display { data, display_id, update, .. } => self.bundle(&data, display_id.as_deref(), update, false),
            Event::Clear { .. } => {}
            Event::Progress(p) => self.progress(&p),
        }
    }

    /// The cell's value (its final expression, or a command's answer).
    pub fn result(&self, data: &Map<String, Value>) {
        self.bundle(data, None, false, true);
    }

    fn bundle(&self, data: &Map<String, Value>, display_id: Option<&str>, update: bool, is_result: bool) {
        let plain = data.get("text/plain").and_then(Value::as_str);
        let redraw = match (update, display_id, &self.state().last_display) {
            (true, Some(id), Some((last, lines))) if last == id && self.stdout_tty => Some(*lines),
            _ => None,
        };
        let image = data
            .get("image/png")
            .and_then(Value::as_str)
            .map(|s| ("png", s))
            .or_else(|| data.get("image/svg+xml").and_then(Value::as_str).map(|s| ("svg", s)));
        let mut text = String::new();
        if let Some((kind, content)) = image {
            text = self.image(kind, content, plain, display_id);
        } else if let Some(p) = plain {
            text = self.paint(false, if is_result { GREEN } else { "" }, p);
        } else if let Some(md) = data.get("text/markdown").and_then(Value::as_str) {
            text = md.to_string();
        } else if let Some(j) = data.get("application/json") {
            text = serde_json::to_string_pretty(j).unwrap_or_default();
        } else if let Some(html) = data.get("text/html").and_then(Value::as_str) {
            text = self.paint(false, DIM, &format!("[HTML output, {} bytes, without a text/plain part]", html.len()));
        }
        if text.is_empty() {
            return;
        }
        if !text.ends_with('\n') {
            text.push('\n');
        }
        if let Some(n) = redraw
            && n > 0
            && !text.contains("\x1b_G")
            && !text.contains("\x1b]1337")
        {
            text = format!("\x1b[{n}A\x1b[J{text}");
        }
        self.write(false, &text);
        let lines = strip_ansi(&text).lines().count();
        self.state().last_display = display_id.map(|id| (id.to_string(), lines));
    }

    /// Shows or saves an image; returns the text to print.
    fn image(&self, kind: &str, content: &str, plain: Option<&str>, display_id: Option<&str>) -> String {
        let title = plain.and_then(|p| p.lines().next()).unwrap_or("figure").trim();
        if kind == "png" {
            let b64: String = content.chars().filter(|c| !c.is_whitespace()).collect();
            match self.images {
                ImageMode::Kitty => {
                    let mut s = String::new();
                    let chunks: Vec<&[u8]> = b64.as_bytes().chunks(4096).collect();
                    for (i, c) in chunks.iter().enumerate() {
                        let more = if i + 1 < chunks.len() { 1 } else { 0 };
                        let head = if i == 0 { "a=T,f=100," } else { "" };
                        s.push_str(&format!("\x1b_G{head}m={more};{}\x1b\\", String::from_utf8_lossy(c)));
                    }
                    return s;
                }
                ImageMode::Iterm => {
                    let len = base64::engine::general_purpose::STANDARD.decode(&b64).map(|b| b.len()).unwrap_or(0);
                    return format!("\x1b]1337;File=inline=1;size={len};preserveAspectRatio=1:{b64}\x07");
                }
                ImageMode::File => {}
            }
            match base64::engine::general_purpose::STANDARD.decode(&b64) {
                Ok(bytes) => self.save_figure("png", &bytes, title, display_id),
                Err(e) => self.paint(false, RED, &format!("[{title}: undecodable PNG data: {e}]")),
            }
        } else {
            self.save_figure("svg", content.as_bytes(), title, display_id)
        }
    }

    fn save_figure(&self, ext: &str, bytes: &[u8], title: &str, display_id: Option<&str>) -> String {
        let path = {
            let mut st = self.state();
            match display_id.and_then(|id| st.figure_files.get(id)).cloned() {
                Some(p) => p,
                None => {
                    let n = match st.next_figure {
                        Some(n) => n,
                        None => first_free_figure(&self.figures_dir),
                    };
                    st.next_figure = Some(n + 1);
                    let p = self.figures_dir.join(format!("fig-{n:03}.{ext}"));
                    if let Some(id) = display_id {
                        st.figure_files.insert(id.to_string(), p.clone());
                    }
                    p
                }
            }
        };
        let saved = std::fs::create_dir_all(&self.figures_dir).and_then(|_| std::fs::write(&path, bytes));
        match saved {
            Ok(()) => self.paint(false, CYAN, &format!("[{title}] saved to {} ({})", path.display(), human_bytes(bytes.len()))),
            Err(e) => self.paint(false, RED, &format!("[{title}] could not be saved to {}: {e}", path.display())),
        }
    }

    fn progress(&self, p: &Progress) {
        self.forget_display();
        let Progress { id, label, pos, total, msg, elapsed, done } = p.clone();
        if !self.stderr_tty || self.printer_active() {
            // No terminal to animate: one line when the bar finishes.
            if done {
                self.write(true, &format!("{}\n", final_line(&label, pos, total, elapsed, &msg)));
            }
            return;
        }
        let line = final_line(&label, pos, total, elapsed, &msg);
        let bar = {
            let mut st = self.state();
            let entry = st.bars.entry(id.clone()).or_insert_with(|| {
                    let b = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
                    let tpl = if total > 0 {
                        "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} ({percent}%) {elapsed} eta {eta} {msg}"
                    } else {
                        "{prefix:.bold} {spinner} {pos} {elapsed} {msg}"
                    };
                    if let Ok(style) = ProgressStyle::with_template(tpl) {
                        b.set_style(style.progress_chars("#>-"));
                    }
                    let b = b.with_elapsed(Duration::from_secs_f64(elapsed));
                b.set_prefix(label.clone());
                Bar { bar: b, line: String::new() }
            });
            entry.line = line.clone();
            entry.bar.clone()
        };
        bar.set_position(pos);
        bar.set_message(msg.clone());
        if done {
            bar.finish_and_clear();
            self.state().bars.remove(&id);
            self.write(true, &format!("{}\n", self.paint(true, DIM, &line)));
        }
    }

    fn printer_active(&self) -> bool {
        !self.executing.load(Ordering::SeqCst) && self.printer.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    pub fn error(&self, e: &CellError) {
        self.forget_display();
        let tb = if e.traceback.is_empty() { vec![format!("{}: {}", e.ename, e.evalue)] } else { e.traceback.clone() };
        let text = tb.join("\n");
        let mut text = if text.contains('\x1b') { self.paint(true, "", &text) } else { self.paint(true, RED, &text) };
        text.push('\n');
        self.write(true, &text);
    }

    /// Spinner on stdout while the first input waits for the engine (tty only).
    pub fn start_wait_spinner(&self, msg: &str) {
        if !self.stdout_tty {
            return;
        }
        let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            s.set_style(style);
        }
        s.set_message(msg.to_string());
        s.enable_steady_tick(Duration::from_millis(120));
        self.state().wait_spinner = Some(s);
    }

    pub fn stop_wait_spinner(&self) {
        if let Some(s) = self.state().wait_spinner.take() {
            s.finish_and_clear();
        }
    }

    pub fn executing(&self, on: bool) {
        self.executing.store(on, Ordering::SeqCst);
    }
}

fn final_line(label: &str, pos: u64, total: u64, elapsed: f64, msg: &str) -> String {
    let mut s = if total > 0 { format!("{label} {pos}/{total} in {elapsed:.1} s") } else { format!("{label} {pos} in {elapsed:.1} s") };
    if !msg.is_empty() {
        s.push_str(" · ");
        s.push_str(msg);
    }
    s
}

fn first_free_figure(dir: &std::path::Path) -> u32 {
    let mut n = 1;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(k) = name.strip_prefix("fig-").and_then(|r| r.split('.').next()).and_then(|k| k.parse::<u32>().ok()) {
                n = n.max(k + 1);
            }
        }
    }
    n
}

fn human_bytes(n: usize) -> String {
    if n < 1024 { format!("{n} B") } else if n < 1024 * 1024 { format!("{:.1} KiB", n as f64 / 1024.0) } else { format!("{:.1} MiB", n as f64 / 1048576.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_continue_numbering() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(first_free_figure(dir.path()), 1);
        std::fs::write(dir.path().join("fig-007.png"), b"x").unwrap();
        assert_eq!(first_free_figure(dir.path()), 8);
    }

    #[test]
    fn final_progress_line() {
        assert_eq!(final_line("train", 10, 10, 1.25, "loss 0.1"), "train 10/10 in 1.2 s · loss 0.1");
        assert_eq!(final_line("scan", 3, 0, 2.0, ""), "scan 3 in 2.0 s");
    }
}
