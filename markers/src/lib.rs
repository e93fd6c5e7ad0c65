//! The output-marker protocol between the prelude, which runs inside evcxr's child process, and
//! the engine, which reads that process's stdout line by line.
//!
//! Rich output, progress and panics travel as single stdout lines `\x1ePIVOT <base64(json)>`,
//! where the JSON is one [`Marker`] tagged by its `"t"` field. The record separator (`\x1e`)
//! cannot appear in ordinary text output by accident, and text printed with `print!` and not yet
//! terminated may precede a marker on the same line, so readers look for it anywhere in a line
//! ([`split_line`]). Base64 keeps newlines inside the payload from breaking the line framing.
//!
//! Two more prefixes are written by the engine's own relay inside the child (not by the
//! prelude): [`STDERR_PREFIX`] carries a stderr line through the ordered stdout stream and
//! [`PARTIAL_PREFIX`] a line that has no newline yet.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Start of every marker line.
pub const PREFIX: &str = "\x1ePIVOT ";
/// A stderr line relayed through stdout, so that it keeps its order with stdout.
pub const STDERR_PREFIX: &str = "\x1ePIVOT-ERR ";
/// Text written without a newline (`print!` + flush), shown before the line is complete.
pub const PARTIAL_PREFIX: &str = "\x1ePIVOT-PART ";
/// Name of the interrupt flag (an `AtomicBool`) that the front-end executable exports and the
/// prelude finds with `dlsym`: the one flag every cell's copy of the prelude shares.
pub const INTERRUPT_FLAG_SYMBOL: &str = "PIVOT_INTERRUPT_FLAG";

/// One message from the child to the front end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Marker {
    /// A new display (Jupyter `display_data`). `data` maps mime type to content: strings, except
    /// JSON mimes, which hold JSON.
    Display {
        id: String,
        data: Map<String, Value>,
        #[serde(default = "empty_object")]
        metadata: Value,
    },
    /// Replaces the content of display `id` (Jupyter `update_display_data`).
    Update {
        id: String,
        data: Map<String, Value>,
        #[serde(default = "empty_object")]
        metadata: Value,
    },
    /// Clears the cell's output; with `wait`, only when the next output arrives.
    Clear {
        #[serde(default)]
        wait: bool,
    },
    /// A progress bar's state, for terminal front ends (Jupyter gets an HTML display instead).
    Progress(Progress),
    /// A panic, as the prelude's panic hook saw it.
    Panic {
        msg: String,
        #[serde(default)]
        loc: String,
        #[serde(default)]
        thread: String,
        /// The frames that explain the panic to a user, innermost first.
        #[serde(default)]
        frames: Vec<String>,
    },
    /// evcxr's own panic notice, with the stderr lines written just before it (a panic that the
    /// prelude's hook did not see, e.g. before the prelude was loaded).
    PanicNotice {
        #[serde(default)]
        lines: Vec<String>,
    },
    /// A cell returned an error with `?`: evcxr prints it to stderr and reports success, so the
    /// relay captures the text.
    #[serde(rename = "qerr")]
    QuestionMarkError {
        #[serde(default)]
        lines: Vec<String>,
    },
    /// A marker of a later protocol version: ignored rather than shown as garbage.
    #[serde(other)]
    Unknown,
}

/// State of one progress bar (`Marker::Progress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Identifies the bar across updates.
    pub id: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub pos: u64,
    /// 0: unknown length (a counter instead of a bar).
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub msg: String,
    /// Seconds since the bar started.
    #[serde(default)]
    pub elapsed: f64,
    #[serde(default)]
    pub done: bool,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl Marker {
    /// The marker as one line, without the newline.
    pub fn to_line(&self) -> String {
        let json = serde_json::to_string(self).expect("markers serialise: string keys only");
        format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(json))
    }

    /// Decodes the text after [`PREFIX`]; `None` when it is not a marker this protocol wrote.
    pub fn decode(payload: &str) -> Option<Marker> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(payload.trim_end()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// What one stdout line of the child carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Line<'a> {
    /// Ordinary output (the whole line).
    Text(&'a str),
    /// `before` was printed without a newline; then a relayed stderr line `text`.
    Stderr { before: &'a str, text: &'a str },
    /// Text without a newline yet (`before` and `text` belong together).
    Partial { before: &'a str, text: &'a str },
    /// `before` was printed without a newline; then a marker (`None`: it did not decode, and the
    /// line is best shown as text).
    Marker { before: &'a str, marker: Option<Marker> },
}

/// Classifies one line (without its newline) read from the child's stdout.
pub fn split_line(line: &str) -> Line<'_> {
    let Some(pos) = line.find('\x1e') else { return Line::Text(line) };
    let (before, tail) = line.split_at(pos);
    if let Some(text) = tail.strip_prefix(STDERR_PREFIX) {
        Line::Stderr { before, text }
    } else if let Some(text) = tail.strip_prefix(PARTIAL_PREFIX) {
        Line::Partial { before, text }
    } else if let Some(payload) = tail.strip_prefix(PREFIX) {
        Line::Marker { before, marker: Marker::decode(payload) }
    } else {
        Line::Text(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_through_a_line() {
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("x\ny"));
        let m = Marker::Display { id: "d1".into(), data, metadata: json!({"image/png": {"width": 3}}) };
        let line = m.to_line();
        assert!(!line.contains('\n'));
        assert_eq!(split_line(&format!("abc{line}")), Line::Marker { before: "abc", marker: Some(m) });
    }

    #[test]
    fn wire_names_are_stable() {
        // Front ends and preludes of one build agree by construction; these names are what an
        // older kernel reads, so they must not drift.
        let tag = |m: &Marker| serde_json::to_value(m).unwrap()["t"].as_str().unwrap().to_string();
        assert_eq!(tag(&Marker::QuestionMarkError { lines: vec![] }), "qerr");
        assert_eq!(tag(&Marker::PanicNotice { lines: vec![] }), "panic_notice");
        assert_eq!(tag(&Marker::Clear { wait: true }), "clear");
        let p = Progress { id: "p".into(), label: "train".into(), pos: 3, total: 10, msg: String::new(), elapsed: 1.5, done: false };
        let v = serde_json::to_value(Marker::Progress(p.clone())).unwrap();
        assert_eq!(v["t"], "progress");
        assert_eq!(v["pos"], 3);
        assert_eq!(Marker::decode(&Marker::Progress(p.clone()).to_line()[PREFIX.len()..]), Some(Marker::Progress(p)));
    }

    #[test]
    fn unknown_and_broken_markers() {
        let unknown = base64::engine::general_purpose::STANDARD.encode(r#"{"t":"from_the_future","x":1}"#);
        assert_eq!(Marker::decode(&unknown), Some(Marker::Unknown));
        assert_eq!(split_line(&format!("{PREFIX}!!not base64")), Line::Marker { before: "", marker: None });
        // A display without metadata gets an empty object.
        let m = base64::engine::general_purpose::STANDARD.encode(r#"{"t":"display","id":"a","data":{}}"#);
        assert!(matches!(Marker::decode(&m), Some(Marker::Display { metadata, .. }) if metadata == json!({})));
    }

    #[test]
    fn relay_prefixes() {
        assert_eq!(split_line("plain"), Line::Text("plain"));
        assert_eq!(split_line(&format!("x{STDERR_PREFIX}warn")), Line::Stderr { before: "x", text: "warn" });
        assert_eq!(split_line(&format!("{PARTIAL_PREFIX}50%")), Line::Partial { before: "", text: "50%" });
        assert_eq!(split_line("a\x1eb"), Line::Text("a\x1eb"));
    }
}
