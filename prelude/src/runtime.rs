//! The prelude's side of the output and interrupt protocol shared with the PIVOT kernel and REPL.
//!
//! Cells run inside an evcxr child process whose stdout is read line by line by the front end.
//! Rich output therefore travels as single stdout lines, typed [`Marker`]s of the
//! `pivot-markers` crate (the protocol's one definition, shared with the engine), that the
//! front end turns into Jupyter `display_data`/`update_display_data`/`clear_output` messages (or
//! terminal renderings in the REPL). Outside a front end (`Frontend::Plain`: an ordinary program
//! or test) the same calls degrade to plain text, so library code can call them unconditionally.
//!
//! evcxr links the prelude statically into every cell's shared object, so each cell has its own
//! copy of every `static` in this file. Anything that must persist across cells (the interrupt
//! flag) lives in the front-end executable and is found through `dlsym`; display ids are random
//! rather than counters for the same reason.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::error::{PivotError, Result};

pub use pivot_markers::{Marker, INTERRUPT_FLAG_SYMBOL, PREFIX as MARKER_PREFIX};

// ---------------------------------------------------------------------------------------------
// Front end detection

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// Running in a cell of the PIVOT Jupyter kernel.
    Jupyter,
    /// Running in a line of `pivot-repl`.
    Repl,
    /// An ordinary Rust program or test: no marker protocol.
    Plain,
}

/// The front end this code runs under, from `PIVOT_FRONTEND` (set by the kernel/REPL on the
/// evcxr child process).
pub fn frontend() -> Frontend {
    match std::env::var("PIVOT_FRONTEND").as_deref() {
        Ok("jupyter") => Frontend::Jupyter,
        Ok("repl") => Frontend::Repl,
        _ => Frontend::Plain,
    }
}

// ---------------------------------------------------------------------------------------------
// Mime bundles

/// One piece of rich output: mime type → content (strings, except JSON mimes which hold JSON),
/// plus Jupyter display metadata (e.g. `{"image/png": {"width": 640}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct MimeBundle {
    pub data: BTreeMap<String, Value>,
    pub metadata: Value,
}

impl MimeBundle {
    /// A bundle with only `text/plain`; every bundle should have one, because it is what plain
    /// terminals, nbconvert to text and `Frontend::Plain` show.
    pub fn text(s: impl Into<String>) -> Self {
        let mut data = BTreeMap::new();
        data.insert("text/plain".to_string(), Value::String(s.into()));
        MimeBundle { data, metadata: json!({}) }
    }
    pub fn with_html(mut self, s: impl Into<String>) -> Self {
        self.data.insert("text/html".into(), Value::String(s.into()));
        self
    }
    /// PNG bytes; Jupyter wants them base64 encoded.
    pub fn with_png(mut self, bytes: &[u8]) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.data.insert("image/png".into(), Value::String(b64));
        self
    }
    pub fn with_svg(mut self, s: impl Into<String>) -> Self {
        self.data.insert("image/svg+xml".into(), Value::String(s.into()));
        self
    }
    pub fn with_json(mut self, v: Value) -> Self {
        self.data.insert("application/json".into(), v);
        self
    }
    pub fn with_markdown(mut self, s: impl Into<String>) -> Self {
        self.data.insert("text/markdown".into(), Value::String(s.into()));
        self
    }
    /// Any other mime type (string content).
    pub fn with_mime(mut self, mime: impl Into<String>, content: Value) -> Self {
        self.data.insert(mime.into(), content);
        self
    }
    /// Metadata for one mime type, e.g. `("image/png", json!({"width": 400}))`.
    pub fn with_metadata(mut self, mime: &str, meta: Value) -> Self {
        if !self.metadata.is_object() {
            self.metadata = json!({});
        }
        self.metadata[mime] = meta;
        self
    }
    pub fn plain_text(&self) -> &str {
        self.data.get("text/plain").and_then(Value::as_str).unwrap_or("")
    }
}

/// Values that know how to show themselves richly (tables, plots, tensors).
pub trait Rich {
    fn mime_bundle(&self) -> MimeBundle;
}

/// A bundle written as a cell's last expression shows itself.
impl Rich for MimeBundle {
    fn mime_bundle(&self) -> MimeBundle {
        self.clone()
    }
}

/// The method evcxr calls on a cell's final expression (it compiles `(expr).evcxr_display()`).
/// The blanket impl makes every `Rich` value display itself as the cell's `execute_result`.
///
/// evcxr builds a cell whose final expression has no `evcxr_display` method twice: the first
/// build fails, and it retries with `format!("{:?}", &(expr))`. The impls for std types below
/// (`debug_display!`) print exactly that text, so a cell ending in a number, a string, a vector or
/// an option builds once. They cannot be one blanket impl over `Debug`: it would overlap the `Rich`
/// one (a `Tensor` is both). Coherence accepts both kinds side by side because `Rich` is ours and
/// none of these types can implement it outside this crate. A type of the user's own still takes
/// evcxr's second build (its `Debug` output is the same either way).
///
/// Only evcxr's fallback honours `:fmt` and `:types`, so they now apply to the values the prelude
/// does not display (types of the user's own). Shadowing this trait while they are changed does not
/// work: rustc then suggests importing it, and evcxr follows that hint into the user's code
/// instead of retrying with its fallback.
pub trait EvcxrDisplay {
    fn evcxr_display(&self);
}

impl<T: Rich + ?Sized> EvcxrDisplay for T {
    fn evcxr_display(&self) {
        send_bundle(&self.mime_bundle());
    }
}

/// Writes a bundle in evcxr's content protocol (the cell's `execute_result`).
fn send_bundle(bundle: &MimeBundle) {
    let mut out = String::new();
    for (mime, value) in &bundle.data {
        let content = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push_str("EVCXR_BEGIN_CONTENT ");
        out.push_str(mime);
        out.push('\n');
        out.push_str(&content);
        out.push_str("\nEVCXR_END_CONTENT\n");
    }
    // One locked write: evcxr reads the blocks line by line and must not see them interleaved
    // with output from other threads.
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = lock.write_all(out.as_bytes());
    let _ = lock.flush();
}

/// The text evcxr's fallback shows for a final expression: `{:?}` (its default `:fmt`).
fn send_debug<T: std::fmt::Debug + ?Sized>(value: &T) {
    send_bundle(&MimeBundle::text(format!("{value:?}")));
}

macro_rules! debug_display {
    ($(<$($p:ident $(: $bound:path)?),*> $t:ty;)*) => {
        $(impl<$($p: std::fmt::Debug $(+ $bound)?),*> EvcxrDisplay for $t {
            fn evcxr_display(&self) {
                send_debug(self)
            }
        })*
    };
    ($($t:ty),* $(,)?) => {
        $(impl EvcxrDisplay for $t {
            fn evcxr_display(&self) {
                send_debug(self)
            }
        })*
    };
}

debug_display!(
    i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize, f32, f64, bool, char, (), str, String,
    std::time::Duration, std::path::Path, std::path::PathBuf, std::ffi::OsStr, std::ffi::OsString,
    std::cmp::Ordering,
);
debug_display!(
    <T> Vec<T>;
    <T> [T];
    <T> Option<T>;
    <T, E> std::result::Result<T, E>;
    <T> std::collections::VecDeque<T>;
    <T> std::collections::BTreeSet<T>;
    <K, V> std::collections::BTreeMap<K, V>;
    <T> std::sync::Arc<T>;
    <T> std::rc::Rc<T>;
    <T> std::ops::Range<T>;
    <T> std::ops::RangeInclusive<T>;
    <A> (A,);
    <A, B> (A, B);
    <A, B, C> (A, B, C);
    <A, B, C, D> (A, B, C, D);
    <A, B, C, D, E> (A, B, C, D, E);
    <A, B, C, D, E, F> (A, B, C, D, E, F);
);

impl<T: std::fmt::Debug, const N: usize> EvcxrDisplay for [T; N] {
    fn evcxr_display(&self) {
        send_debug(self)
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug, S> EvcxrDisplay for std::collections::HashMap<K, V, S> {
    fn evcxr_display(&self) {
        send_debug(self)
    }
}

impl<T: std::fmt::Debug, S> EvcxrDisplay for std::collections::HashSet<T, S> {
    fn evcxr_display(&self) {
        send_debug(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Marker output

/// Writes one marker line. Returns false when stdout is gone (nothing else can be done then).
pub fn emit_marker(marker: &Marker) -> bool {
    let mut line = marker.to_line();
    line.push('\n');
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    // Text printed with `print!` and not yet terminated may precede the marker on the same line;
    // front ends look for the prefix anywhere in a line, not only at its start.
    lock.write_all(line.as_bytes()).and_then(|_| lock.flush()).is_ok()
}

/// Decodes a marker line written by `emit_marker` (used by tests).
pub fn parse_marker(line: &str) -> Option<Marker> {
    Marker::decode(line.strip_prefix(MARKER_PREFIX)?)
}

fn bundle_json(b: &MimeBundle) -> (Map<String, Value>, Value) {
    let data: Map<String, Value> = b.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let metadata = if b.metadata.is_object() { b.metadata.clone() } else { json!({}) };
    (data, metadata)
}

/// Random, so that two cells (each with its own copy of this module) never hand out the same id.
fn fresh_display_id() -> String {
    format!("pivot-{:032x}", rand::random::<u128>())
}

/// A display that can be replaced in place later (live plots, progress, tables that grow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayHandle {
    id: String,
}

impl DisplayHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the content of this display wherever it is shown.
    pub fn update(&self, b: &MimeBundle) {
        match frontend() {
            Frontend::Plain => print_plain(b),
            _ => {
                let (data, metadata) = bundle_json(b);
                emit_marker(&Marker::Update { id: self.id.clone(), data, metadata });
            }
        }
    }
}

fn print_plain(b: &MimeBundle) {
    let text = b.plain_text();
    if !text.is_empty() {
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        let _ = writeln!(lock, "{text}");
        let _ = lock.flush();
    }
}

/// Shows a bundle now (a new `display_data`), in order with the cell's printed text. Several
/// calls in one cell give several outputs.
pub fn display(b: &MimeBundle) -> DisplayHandle {
    let handle = DisplayHandle { id: fresh_display_id() };
    match frontend() {
        Frontend::Plain => print_plain(b),
        _ => {
            let (data, metadata) = bundle_json(b);
            emit_marker(&Marker::Display { id: handle.id.clone(), data, metadata });
        }
    }
    handle
}

/// Shows any `Rich` value now.
pub fn show<T: Rich + ?Sized>(value: &T) -> DisplayHandle {
    display(&value.mime_bundle())
}

/// Clears the cell's output; with `wait`, only when the next output arrives (no flicker).
pub fn clear_output(wait: bool) {
    if frontend() != Frontend::Plain {
        emit_marker(&Marker::Clear { wait });
    }
}

// ---------------------------------------------------------------------------------------------
// Input

/// Asks the user for one line of text and returns it without its line ending.
///
/// In the Jupyter kernel the front end shows `prompt` in an input box (a Jupyter
/// `input_request`); in `pivot-repl` it is read from the terminal; in a plain program it is
/// printed and a line is read from stdin. When the Jupyter client does not allow stdin
/// (`allow_stdin: false`, e.g. `nbclient`/`pivot-kernel run`), the kernel answers with an empty
/// string and writes a notice on stderr. Call it as `pivot::runtime::input("name? ")`.
pub fn input(prompt: &str) -> String {
    read_input(prompt, false)
}

/// Like [`input`], but the front end hides what is typed (a password prompt).
pub fn input_password(prompt: &str) -> String {
    read_input(prompt, true)
}

fn read_input(prompt: &str, password: bool) -> String {
    let stdout = std::io::stdout();
    match frontend() {
        Frontend::Plain => {
            let mut lock = stdout.lock();
            let _ = lock.write_all(prompt.as_bytes()).and_then(|_| lock.flush());
        }
        Frontend::Jupyter | Frontend::Repl => {
            // evcxr's protocol (the `evcxr_input` crate): one stdout line
            // `EVCXR_INPUT_REQUEST[_PASSWORD]:<prompt>`, answered with one line on stdin. evcxr
            // keeps only the text up to the next `:`, so colons in the prompt travel as U+A789,
            // which the PIVOT session turns back into `:`. The request must start its own line:
            // pass the prompt here rather than `print!`ing it first.
            let cmd = if password { "EVCXR_INPUT_REQUEST_PASSWORD" } else { "EVCXR_INPUT_REQUEST" };
            let prompt = prompt.replace(':', "\u{a789}").replace(['\n', '\r'], " ");
            let mut lock = stdout.lock();
            let _ = writeln!(lock, "{cmd}:{prompt}").and_then(|_| lock.flush());
        }
    }
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        return String::new();
    }
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    line
}

// ---------------------------------------------------------------------------------------------
// Interrupt

/// Used when no front end exports a flag (plain programs, tests).
static LOCAL_INTERRUPT_FLAG: AtomicBool = AtomicBool::new(false);

/// The process-wide interrupt flag. The kernel and REPL executables export
/// `PIVOT_INTERRUPT_FLAG` (set by their SIGINT handler in the evcxr child); a per-cell static
/// would never see it because each cell has its own copy of this module.
pub fn interrupt_flag() -> &'static AtomicBool {
    // Caching per copy of the module is fine: the executable's symbol never moves.
    static FLAG: OnceLock<usize> = OnceLock::new();
    let addr = *FLAG.get_or_init(|| {
        let name = std::ffi::CString::new(INTERRUPT_FLAG_SYMBOL).expect("no NUL in symbol name");
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string has no preconditions.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as usize }
    });
    if addr == 0 {
        &LOCAL_INTERRUPT_FLAG
    } else {
        // SAFETY: the executable defines the symbol as a `static AtomicBool` that lives for the
        // whole process; AtomicBool has the same layout everywhere.
        unsafe { &*(addr as *const AtomicBool) }
    }
}

/// True once the user asked to stop (Jupyter interrupt, Ctrl-C in the REPL).
pub fn interrupt_requested() -> bool {
    interrupt_flag().load(Ordering::SeqCst)
}

/// Forgets a pending interrupt request.
pub fn clear_interrupt() {
    interrupt_flag().store(false, Ordering::SeqCst);
}

/// For long loops: call once per step. Returns `Err(Interrupted { at })` when the user asked to
/// stop, and consumes the request so that the next cell starts clean.
pub fn check_interrupt(at: &str) -> Result<()> {
    if interrupt_flag().swap(false, Ordering::SeqCst) {
        Err(PivotError::Interrupted { at: at.to_string() })
    } else {
        Ok(())
    }
}

/// For ordinary programs: makes the first Ctrl-C set the interrupt flag (so loops polling
/// `check_interrupt` stop cleanly) and a second one terminate the program as usual. Kernels and
/// the REPL install their own handler; this is a no-op there.
pub fn install_sigint_handler() {
    if frontend() != Frontend::Plain {
        return;
    }
    extern "C" fn on_sigint(_: libc::c_int) {
        if LOCAL_INTERRUPT_FLAG.swap(true, Ordering::SeqCst) {
            // SAFETY: signal and raise are async-signal-safe.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::raise(libc::SIGINT);
            }
        }
    }
    // SAFETY: installing a handler that only touches an atomic and async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
}

// ---------------------------------------------------------------------------------------------
// Panics

/// Called once by the kernel/REPL when the prelude is loaded. Panics in cells then reach the
/// front end as one structured marker (message, location, the user-relevant frames) instead of
/// the default hook's stderr text, so they can be reported as errors: evcxr itself reports a
/// panicking cell as a success. The hook lives in the shared libstd, so it covers later cells.
pub fn install_panic_hook() {
    if frontend() == Frontend::Plain {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "Box<dyn Any>".to_string()
        };
        let loc = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("<unnamed>").to_string();
        let frames = user_frames(&std::backtrace::Backtrace::force_capture().to_string());
        emit_marker(&Marker::Panic { msg, loc, thread, frames });
    }));
}

/// Keeps the frames that explain a panic to a notebook user: prelude, tch and the cell itself,
/// not the panic machinery or evcxr's wrapper.
fn user_frames(bt: &str) -> Vec<String> {
    let mut frames = Vec::new();
    let mut lines = bt.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        let Some((_, name)) = t.split_once(": ") else { continue };
        if !t.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        let skip = ["std::", "core::", "alloc::", "rust_begin_unwind", "__rust", "<alloc::", "<core::", "<std::", "pivot::runtime::install_panic_hook"]
            .iter()
            .any(|p| name.starts_with(p));
        let location = lines.peek().map(|l| l.trim_start()).filter(|l| l.starts_with("at ")).map(str::to_string);
        if location.is_some() {
            lines.next();
        }
        if skip {
            continue;
        }
        let user_fn = name.contains("run_user_code");
        let mut frame = name.to_string();
        if let Some(at) = location {
            frame.push_str("\n      ");
            frame.push_str(&at);
        }
        frames.push(frame);
        if user_fn || frames.len() >= 20 {
            break;
        }
    }
    frames
}

// ---------------------------------------------------------------------------------------------
// Progress

/// A progress bar for long loops: an HTML bar updated in place in Jupyter, a one-line bar in the
/// REPL, an occasional stderr line in plain programs. Updates are throttled, so calling `set` or
/// `inc` every step is cheap.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    pos: u64,
    message: String,
    id: String,
    started: Instant,
    last_emit: Option<Instant>,
    handle: Option<DisplayHandle>,
    finished: bool,
}

const JUPYTER_MIN_INTERVAL: Duration = Duration::from_millis(100);
const PLAIN_MIN_INTERVAL: Duration = Duration::from_secs(2);

impl Progress {
    /// `total` = 0 means unknown (the bar shows a count only).
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let mut p = Progress {
            label: label.into(),
            total,
            pos: 0,
            message: String::new(),
            id: fresh_display_id(),
            started: Instant::now(),
            last_emit: None,
            handle: None,
            finished: false,
        };
        p.emit(true);
        p
    }

    /// Moves to `pos` and sets the text shown after the bar (e.g. "loss 0.41").
    pub fn set(&mut self, pos: u64, message: impl Into<String>) {
        self.pos = pos;
        self.message = message.into();
        self.emit(false);
    }

    pub fn inc(&mut self) {
        self.pos += 1;
        self.emit(false);
    }

    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        self.emit(false);
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Marks the bar complete and shows its final state.
    pub fn finish(&mut self) {
        if self.total > 0 && self.pos < self.total {
            self.pos = self.total;
        }
        self.finished = true;
        self.emit(true);
    }

    fn emit(&mut self, force: bool) {
        let now = Instant::now();
        let min = if frontend() == Frontend::Plain { PLAIN_MIN_INTERVAL } else { JUPYTER_MIN_INTERVAL };
        let due = self.last_emit.is_none_or(|t| now.duration_since(t) >= min);
        if !force && !due && !(self.total > 0 && self.pos >= self.total) {
            return;
        }
        self.last_emit = Some(now);
        match frontend() {
            Frontend::Jupyter => {
                let b = self.bundle();
                match &self.handle {
                    Some(h) => h.update(&b),
                    None => self.handle = Some(display(&b)),
                }
            }
            Frontend::Repl => {
                emit_marker(&Marker::Progress(pivot_markers::Progress {
                    id: self.id.clone(),
                    label: self.label.clone(),
                    pos: self.pos,
                    total: self.total,
                    msg: self.message.clone(),
                    elapsed: self.started.elapsed().as_secs_f64(),
                    done: self.finished,
                }));
            }
            Frontend::Plain => {
                if self.last_emit.is_some() {
                    eprintln!("{}", self.text_line());
                }
            }
        }
    }

    fn text_line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut s = if self.total > 0 {
            let frac = (self.pos as f64 / self.total as f64).clamp(0.0, 1.0);
            let filled = (frac * 30.0).round() as usize;
            format!(
                "{} [{}{}] {}/{} ({:.0}%) {}",
                self.label,
                "#".repeat(filled),
                "-".repeat(30 - filled),
                self.pos,
                self.total,
                frac * 100.0,
                fmt_duration(elapsed)
            )
        } else {
            format!("{} {} {}", self.label, self.pos, fmt_duration(elapsed))
        };
        if self.total > 0 && self.pos > 0 && self.pos < self.total && !self.finished {
            let eta = elapsed / self.pos as f64 * (self.total - self.pos) as f64;
            s.push_str(&format!(" eta {}", fmt_duration(eta)));
        }
        if !self.message.is_empty() {
            s.push_str(" · ");
            s.push_str(&self.message);
        }
        s
    }

    fn bundle(&self) -> MimeBundle {
        let text = self.text_line();
        let bar = if self.total > 0 {
            format!("<progress value=\"{}\" max=\"{}\" style=\"width:24em\"></progress>", self.pos, self.total)
        } else {
            "<progress style=\"width:24em\"></progress>".to_string()
        };
        let html = format!(
            "<div class=\"pivot-progress\" style=\"font-family:monospace\">{bar} {}</div>",
            html_escape(&text)
        );
        MimeBundle::text(text).with_html(html)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An interrupted or failed loop leaves the bar where it stopped instead of a stale rate.
        if !self.finished {
            self.finished = true;
            self.emit(true);
        }
    }
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", secs.max(0.0))
    }
}

/// Escapes text for inclusion in HTML output.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip() {
        let (data, metadata) = bundle_json(&MimeBundle::text("x\ny"));
        let m = Marker::Display { id: fresh_display_id(), data, metadata };
        assert_eq!(parse_marker(&m.to_line()), Some(m));
        assert_eq!(parse_marker("plain text"), None);
    }

    #[test]
    fn bundle_builders() {
        let b = MimeBundle::text("t").with_html("<b>t</b>").with_png(&[1, 2, 3]).with_json(json!({"a": 1}));
        assert_eq!(b.data["image/png"], json!("AQID"));
        assert_eq!(b.data["application/json"], json!({"a": 1}));
        assert_eq!(b.plain_text(), "t");
        let b = b.with_metadata("image/png", json!({"width": 10}));
        assert_eq!(b.metadata["image/png"]["width"], 10);
    }

    #[test]
    fn interrupt_flag_is_consumed_by_check() {
        // No front end in unit tests: the local fallback flag is used.
        interrupt_flag().store(true, Ordering::SeqCst);
        assert!(interrupt_requested());
        assert!(matches!(check_interrupt("step 3"), Err(PivotError::Interrupted { at }) if at == "step 3"));
        assert!(check_interrupt("step 4").is_ok());
        clear_interrupt();
    }

    #[test]
    fn display_ids_are_unique() {
        assert_ne!(fresh_display_id(), fresh_display_id());
    }

    #[test]
    fn progress_line_formats() {
        let mut p = Progress::new("train", 10);
        p.set(5, "loss 0.5");
        let line = p.text_line();
        assert!(line.contains("5/10") && line.contains("loss 0.5"), "{line}");
        p.finish();
        assert_eq!(p.position(), 10);
    }

    #[test]
    fn frames_are_filtered() {
        let bt = "   0: std::backtrace::Backtrace::create\n             at /rustc/x/library/std/src/backtrace.rs:331:13\n   1: pivot::train::step\n             at src/train.rs:10:5\n   2: ctx::run_user_code_3::{{closure}}\n   3: evcxr::runtime::Runtime::run_loop\n";
        let f = user_frames(bt);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("pivot::train::step"));
    }
}
