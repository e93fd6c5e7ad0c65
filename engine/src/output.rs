//! Turns the child's output lines into ordered front-end events.
//!
//! One pump thread reads evcxr's stdout/stderr channels, decodes our markers, batches stream text
//! (one message per ~30 ms instead of one per line) and hands events to the front end's sink in
//! order. At the end of a cell the session asks the pump to flush and waits for the answer, so
//! every output of a cell reaches the sink before the cell's result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use crossbeam_channel::{select, Receiver, Sender};
use serde_json::{Map, Value};

use crate::child::{PARTIAL_PREFIX, STDERR_PREFIX};

const MARKER_PREFIX: &str = "\x1ePIVOT ";
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
    Progress(Value),
}

pub type Sink = Arc<dyn Fn(Event) + Send + Sync>;

/// What the pump learned about the cell that is running.
#[derive(Debug, Default, Clone)]
pub struct CellSignals {
    pub panic: Option<Value>,
    pub panic_notice: Option<Vec<String>>,
    pub question_mark_error: Option<Vec<String>>,
}

pub(crate) enum Control {
    Flush(Sender<()>),
}

pub(crate) struct Pump {
    pub control: Sender<Control>,
    pub signals: Arc<Mutex<CellSignals>>,
    /// While set, events are dropped instead of reaching the sink (signals are still recorded):
    /// used for evaluations the user did not ask to see, such as `user_expressions`.
    pub muted: Arc<AtomicBool>,
}

impl Pump {
    pub fn start(stdout: Receiver<String>, stderr: Receiver<String>, sink: Sink) -> Pump {
        let (control, control_rx) = crossbeam_channel::unbounded();
        let signals = Arc::new(Mutex::new(CellSignals::default()));
        let sig = signals.clone();
        let muted = Arc::new(AtomicBool::new(false));
        let mute = muted.clone();
        std::thread::Builder::new()
            .name("pivot-output".into())
            .spawn(move || PumpState { sink, signals: sig, pending: None, muted: mute }.run(stdout, stderr, control_rx))
            .expect("spawn output thread");
        Pump { control, signals, muted }
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
    fn run(mut self, stdout: Receiver<String>, stderr: Receiver<String>, control: Receiver<Control>) {
        let mut stdout_open = true;
        let mut stderr_open = true;
        loop {
            let timeout = match &self.pending {
                Some((_, _, since)) => BATCH_DELAY.saturating_sub(since.elapsed()),
                None => Duration::from_secs(3600),
            };
            let never = crossbeam_channel::never();
            select! {
                recv(if stdout_open { &stdout } else { &never }) -> line => match line {
                    Ok(line) => self.stdout_line(line),
                    Err(_) => stdout_open = false,
                },
                recv(if stderr_open { &stderr } else { &never }) -> line => match line {
                    Ok(line) => self.text(StreamName::Stderr, line + "\n"),
                    Err(_) => stderr_open = false,
                },
                recv(control) -> c => match c {
                    Ok(Control::Flush(ack)) => {
                        while let Ok(line) = stdout.try_recv() { self.stdout_line(line); }
                        while let Ok(line) = stderr.try_recv() { self.text(StreamName::Stderr, line + "\n"); }
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
        let Some(pos) = line.find('\x1e') else {
            self.text(StreamName::Stdout, line + "\n");
            return;
        };
        let (before, marker) = line.split_at(pos);
        if let Some(rest) = marker.strip_prefix(STDERR_PREFIX) {
            if !before.is_empty() {
                self.text(StreamName::Stdout, before.to_string());
            }
            self.text(StreamName::Stderr, format!("{rest}\n"));
        } else if let Some(rest) = marker.strip_prefix(PARTIAL_PREFIX) {
            self.text(StreamName::Stdout, format!("{before}{rest}"));
        } else if let Some(payload) = marker.strip_prefix(MARKER_PREFIX) {
            if !before.is_empty() {
                self.text(StreamName::Stdout, before.to_string());
            }
            match decode_marker(payload) {
                Some(v) => self.marker(v),
                None => self.text(StreamName::Stdout, line.clone() + "\n"),
            }
        } else {
            self.text(StreamName::Stdout, line + "\n");
        }
    }

    fn marker(&mut self, v: Value) {
        let t = v.get("t").and_then(Value::as_str).unwrap_or("");
        let lines = |v: &Value| -> Vec<String> {
            v.get("lines")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|l| l.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        match t {
            "display" | "update" => {
                let data = v.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
                let metadata = v.get("metadata").cloned().filter(Value::is_object).unwrap_or_else(|| Value::Object(Map::new()));
                let display_id = v.get("id").and_then(Value::as_str).map(str::to_string);
                self.emit(Event::Display { data, metadata, display_id, update: t == "update" });
            }
            "clear" => {
                let wait = v.get("wait").and_then(Value::as_bool).unwrap_or(false);
                self.emit(Event::Clear { wait });
            }
            "progress" => self.emit(Event::Progress(v)),
            "panic" => {
                self.flush_text();
                self.signals.lock().unwrap_or_else(|e| e.into_inner()).panic = Some(v);
            }
            "panic_notice" => {
                let l = lines(&v);
                let mut s = self.signals.lock().unwrap_or_else(|e| e.into_inner());
                if s.panic.is_none() {
                    s.panic_notice = Some(l);
                } else if !l.is_empty() {
                    // The structured panic already carries the message; anything else the cell
                    // wrote to stderr just before still belongs to the output.
                    drop(s);
                    for line in l {
                        self.text(StreamName::Stderr, line + "\n");
                    }
                }
            }
            "qerr" => {
                self.flush_text();
                self.signals.lock().unwrap_or_else(|e| e.into_inner()).question_mark_error = Some(lines(&v));
            }
            _ => {}
        }
    }
}

fn decode_marker(payload: &str) -> Option<Value> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload.trim_end()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn marker(v: Value) -> String {
        format!("{MARKER_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(v.to_string()))
    }

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
        otx.send(format!("partial{}", marker(json!({"t": "display", "id": "x", "data": {"text/plain": "P"}})))).unwrap();
        otx.send(marker(json!({"t": "qerr", "lines": ["bad thing"]}))).unwrap();
        pump.flush();
        let ev = events.lock().unwrap().clone();
        assert_eq!(ev.len(), 4, "{ev:?}");
        assert_eq!(ev[0], Event::Stream { name: StreamName::Stdout, text: "a\nb\n".into() });
        assert_eq!(ev[1], Event::Stream { name: StreamName::Stderr, text: "warn\n".into() });
        assert_eq!(ev[2], Event::Stream { name: StreamName::Stdout, text: "partial".into() });
        assert!(matches!(&ev[3], Event::Display { display_id: Some(id), update: false, .. } if id == "x"));
        assert_eq!(pump.take_signals().question_mark_error, Some(vec!["bad thing".to_string()]));
    }
}
