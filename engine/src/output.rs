//! Turns the child's output lines into ordered front-end events.
//!
//! One pump thread reads evcxr's stdout/stderr channels, decodes our markers, batches stream text
//! (one message per ~30 ms instead of one per line) and hands events to the front end's sink in
//! order. At the end of a cell the session asks the pump to flush and waits for the answer, so
//! every output of a cell reaches the sink before the cell's result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use pivot_markers::{split_line, Line, Marker};
use serde_json::{Map, Value};

const BATCH_DELAY: Duration = Duration::from_millis(30);
const BATCH_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName {
    Stdout,
    Stderr,
}

impl StreamName {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stream { name: StreamName, text: String },
    /// New display (`update` false) or replacement of display `display_id` (`update` true).
    Display { data: Map<String, Value>, metadata: Value, display_id: Option<String>, update: bool },
    Clear { wait: bool },
    /// Progress marker for terminal front ends (the prelude renders HTML itself in Jupyter).
    Progress(pivot_markers::Progress),
}

pub type Sink = Arc<dyn Fn(Event) + Send + Sync>;

/// A panic as the prelude's hook reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct PanicReport {
    pub msg: String,
    pub loc: String,
    pub frames: Vec<String>,
}

/// What the pump learned about the cell that is running.
#[derive(Debug, Default, Clone)]
pub struct CellSignals {
    pub panic: Option<PanicReport>,
    pub panic_notice: Option<Vec<String>>,
    pub question_mark_error: Option<Vec<String>>,
}

pub(crate) enum Control {
    Flush(Sender<()>),
}

pub(crate) struct Pump {
    pub control: Sender<Control>,
    /// Events from the engine itself (the interrupt warning), delivered in order with the
    /// child's output. Its own channel: holders of a clone do not keep the pump thread alive.
    pub notices: Sender<Event>,
    pub signals: Arc<Mutex<CellSignals>>,
    /// While set, events are dropped instead of reaching the sink (signals are still recorded):
    /// used for evaluations the user did not ask to see, such as `user_expressions`.
    pub muted: Arc<AtomicBool>,
}

impl Pump {
    pub fn start(stdout: Receiver<String>, stderr: Receiver<String>, sink: Sink) -> Pump {
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (notices, notices_rx) = crossbeam_channel::unbounded();
        let signals = Arc::new(Mutex::new(CellSignals::default()));
        let sig = signals.clone();
        let muted = Arc::new(AtomicBool::new(false));
        let mute = muted.clone();
        std::thread::Builder::new()
            .name("pivot-output".into())
            .spawn(move || PumpState { sink, signals: sig, pending: None, muted: mute }.run(stdout, stderr, notices_rx, control_rx))
            .expect("spawn output thread");
        Pump { control, notices, signals, muted }
    }

    /// Waits until every line the child has written so far has reached the sink.
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.control.send(Control::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Drops (true) or delivers (false) events from now on. Call `flush` first so that earlier
    /// output is not affected.
    pub fn set_muted(&self, muted: bool) {
        self.muted.store(muted, Ordering::SeqCst);
    }

    pub fn take_signals(&self) -> CellSignals {
        std::mem::take(&mut *self.signals.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct PumpState {
    sink: Sink,
    signals: Arc<Mutex<CellSignals>>,
    pending: Option<(StreamName, String, Instant)>,
    muted: Arc<AtomicBool>,
}

impl PumpState {
    fn run(mut self, stdout: Receiver<String>, stderr: Receiver<String>, notices: Receiver<Event>, control: Receiver<Control>) {
        let mut stdout_open = true;
        let mut stderr_open = true;
        let mut notices_open = true;
        loop {
            let timeout = match &self.pending {
                Some((_, _, since)) => BATCH_DELAY.saturating_sub(since.elapsed()),
                None => Duration::from_secs(3600),
            };
            let never = crossbeam_channel::never();
            let never_event = crossbeam_channel::never();
            select! {
                recv(if stdout_open { &stdout } else { &never }) -> line => match line {
                    Ok(line) => self.stdout_line(line),
                    Err(_) => stdout_open = false,
                },
                recv(if stderr_open { &stderr } else { &never }) -> line => match line {
                    Ok(line) => self.text(StreamName::Stderr, line + "\n"),
                    Err(_) => stderr_open = false,
                },
                recv(if notices_open { &notices } else { &never_event }) -> e => match e {
                    Ok(e) => self.emit(e),
                    Err(_) => notices_open = false,
                },
                recv(control) -> c => match c {
                    Ok(Control::Flush(ack)) => {
                        while let Ok(line) = stdout.try_recv() { self.stdout_line(line); }
                        while let Ok(line) = stderr.try_recv() { self.text(StreamName::Stderr, line + "\n"); }
                        while let Ok(e) = notices.try_recv() { self.emit(e); }
                        self.flush_text();
                        let _ = ack.send(());
                    }
                    Err(_) => { self.flush_text(); return; }
                },
                default(timeout) => self.flush_text(),
            }
            if let Some((_, text, since)) = &self.pending {
                if since.elapsed() >= BATCH_DELAY || text.len() >= BATCH_MAX {
                    self.flush_text();
                }
            }
        }
    }

    fn text(&mut self, name: StreamName, text: String) {
        match &mut self.pending {
            Some((n, buf, _)) if *n == name => buf.push_str(&text),
            _ => {
                self.flush_text();
                self.pending = Some((name, text, Instant::now()));
            }
        }
    }

    fn flush_text(&mut self) {
        if let Some((name, text, _)) = self.pending.take() {
            if !text.is_empty() && !self.muted.load(Ordering::SeqCst) {
                (self.sink)(Event::Stream { name, text });
            }
        }
    }

    fn emit(&mut self, e: Event) {
        self.flush_text();
        if !self.muted.load(Ordering::SeqCst) {
            (self.sink)(e);
        }
    }

    fn stdout_line(&mut self, line: String) {
        match split_line(&line) {
            Line::Text(_) => self.text(StreamName::Stdout, line + "\n"),
            Line::Stderr { before, text } => {
                if !before.is_empty() {
                    self.text(StreamName::Stdout, before.to_string());
                }
                self.text(StreamName::Stderr, format!("{text}\n"));
            }
            Line::Partial { before, text } => self.text(StreamName::Stdout, format!("{before}{text}")),
            Line::Marker { before, marker } => {
                if !before.is_empty() {
                    self.text(StreamName::Stdout, before.to_string());
                }
                match marker {
                    Some(m) => self.marker(m),
                    None => self.text(StreamName::Stdout, line.clone() + "\n"),
                }
            }
        }
    }

    fn marker(&mut self, m: Marker) {
        match m {
            Marker::Display { id, data, metadata } => self.emit(Event::Display { data, metadata: object(metadata), display_id: Some(id), update: false }),
            Marker::Update { id, data, metadata } => self.emit(Event::Display { data, metadata: object(metadata), display_id: Some(id), update: true }),
            Marker::Clear { wait } => self.emit(Event::Clear { wait }),
            Marker::Progress(p) => self.emit(Event::Progress(p)),
            Marker::Panic { msg, loc, frames, .. } => {
                self.flush_text();
                self.signals.lock().unwrap_or_else(|e| e.into_inner()).panic = Some(PanicReport { msg, loc, frames });
            }
            Marker::PanicNotice { lines } => {
                let mut s = self.signals.lock().unwrap_or_else(|e| e.into_inner());
                if s.panic.is_none() {
                    s.panic_notice = Some(lines);
                } else if !lines.is_empty() {
                    // The structured panic already carries the message; anything else the cell
                    // wrote to stderr just before still belongs to the output.
                    drop(s);
                    for line in lines {
                        self.text(StreamName::Stderr, line + "\n");
                    }
                }
            }
            Marker::QuestionMarkError { lines } => {
                self.flush_text();
                self.signals.lock().unwrap_or_else(|e| e.into_inner()).question_mark_error = Some(lines);
            }
            Marker::Unknown => {}
        }
    }
}

/// Jupyter wants display metadata to be an object.
fn object(v: Value) -> Value {
    if v.is_object() { v } else { Value::Object(Map::new()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pivot_markers::{PARTIAL_PREFIX, STDERR_PREFIX};
    use serde_json::json;

    #[test]
    fn pump_orders_and_batches() {
        let (otx, orx) = crossbeam_channel::unbounded();
        let (_etx, erx) = crossbeam_channel::unbounded::<String>();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let pump = Pump::start(orx, erx, Arc::new(move |e| ev.lock().unwrap().push(e)));
        otx.send("a".into()).unwrap();
        otx.send("b".into()).unwrap();
        otx.send(format!("{STDERR_PREFIX}warn")).unwrap();
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("P"));
        otx.send(format!("partial{}", Marker::Display { id: "x".into(), data, metadata: json!({}) }.to_line())).unwrap();
        otx.send(Marker::QuestionMarkError { lines: vec!["bad thing".into()] }.to_line()).unwrap();
        otx.send(format!("{PARTIAL_PREFIX}50%")).unwrap();
        pump.flush();
        let ev = events.lock().unwrap().clone();
        assert_eq!(ev.len(), 5, "{ev:?}");
        assert_eq!(ev[0], Event::Stream { name: StreamName::Stdout, text: "a\nb\n".into() });
        assert_eq!(ev[1], Event::Stream { name: StreamName::Stderr, text: "warn\n".into() });
        assert_eq!(ev[2], Event::Stream { name: StreamName::Stdout, text: "partial".into() });
        assert!(matches!(&ev[3], Event::Display { display_id: Some(id), update: false, .. } if id == "x"));
        assert_eq!(ev[4], Event::Stream { name: StreamName::Stdout, text: "50%".into() });
        assert_eq!(pump.take_signals().question_mark_error, Some(vec!["bad thing".to_string()]));
    }
}
