//! Record-level reading of JSON lists and JSONL files, with errors that name file, line and field.
//!
//! A JSON list is cut into its top-level elements by a small scanner before parsing, so that each
//! record knows the line it starts on and one malformed record can be skipped without losing the
//! rest of the file — neither of which `serde_json::from_str::<Vec<Value>>` offers.
//!
//! The file is read as bytes and each record is checked for UTF-8 on its own, so one bad byte
//! (a Latin-1 caption in a UTF-8 dump) is an error naming its line, or one skipped record, rather
//! than a failure of the whole file.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{check_image, LoadOptions, SkipPolicy, SkipReport, Skipped};
use crate::error::{PivotError, Result};

/// How the records of a file are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// A JSON list `[{...}, {...}]`.
    List,
    /// One JSON object per line.
    Lines,
    /// A list if the first non-blank character is `[`, JSON lines otherwise.
    Auto,
}

/// The unparsed bytes of one record and where it starts.
pub(super) struct RawRecord<'a> {
    pub line: usize,
    pub text: &'a [u8],
}

/// One parsed record: field accessors turn every problem into a `PivotError::Record`.
pub(super) struct Record<'a> {
    pub path: &'a Path,
    pub line: usize,
    pub object: Map<String, Value>,
}

pub(super) fn record_error(path: &Path, line: usize, field: &str, message: impl std::fmt::Display) -> PivotError {
    PivotError::Record { path: path.to_path_buf(), line, field: field.to_string(), message: message.to_string() }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl<'a> Record<'a> {
    fn parse(path: &'a Path, raw: &RawRecord<'_>) -> Result<Record<'a>> {
        let text = std::str::from_utf8(raw.text).map_err(|e| {
            let at = e.valid_up_to();
            let line = raw.line + raw.text[..at].iter().filter(|&&b| b == b'\n').count();
            let column = at - raw.text[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
            record_error(path, line, "json", format!("invalid UTF-8 (byte 0x{:02x} at column {column}); the file must be UTF-8", raw.text[at]))
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| {
            // serde counts lines from the start of the record's text.
            record_error(path, raw.line + e.line().saturating_sub(1), "json", format!("malformed JSON: {e}"))
        })?;
        match value {
            Value::Object(object) => Ok(Record { path, line: raw.line, object }),
            other => Err(record_error(path, raw.line, "json", format!("expected a JSON object, found {}", kind_of(&other)))),
        }
    }

    pub fn error(&self, field: &str, message: impl std::fmt::Display) -> PivotError {
        record_error(self.path, self.line, field, message)
    }

    /// The first of `names` present in the record, as a string; a missing field is reported under
    /// the first name, with the alternatives listed.
    pub fn string(&self, names: &[&str]) -> Result<&str> {
        for name in names {
            if let Some(value) = self.object.get(*name) {
                return value
                    .as_str()
                    .ok_or_else(|| self.error(name, format!("expected a string, found {}", kind_of(value))));
            }
        }
        let message = match names {
            [_] => "missing".to_string(),
            [_, rest @ ..] => format!("missing (also looked for {})", quoted(rest)),
            [] => "missing".to_string(),
        };
        Err(self.error(names.first().copied().unwrap_or("?"), message))
    }

    pub fn optional_string(&self, name: &str) -> Result<Option<&str>> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(name, format!("expected a string, found {}", kind_of(other)))),
        }
    }

    pub fn array(&self, name: &str) -> Result<&Vec<Value>> {
        match self.object.get(name) {
            None => Err(self.error(name, "missing")),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(self.error(name, format!("expected a list, found {}", kind_of(other)))),
        }
    }

    /// The record's `image` (a path, or a list holding one path) resolved against `root` and
    /// checked as the options ask.
    pub fn image(&self, root: &Path, options: &LoadOptions) -> Result<PathBuf> {
        self.image_at("image", root, options)?
            .ok_or_else(|| self.error("image", "missing (text-only records have no image to train or probe on)"))
    }

    /// The image path under `name` when the record has one (absent or null: `None`), checked
    /// as `image` is.
    pub fn optional_image(&self, name: &str, root: &Path, options: &LoadOptions) -> Result<Option<PathBuf>> {
        self.image_at(name, root, options)
    }

    fn image_at(&self, name: &str, root: &Path, options: &LoadOptions) -> Result<Option<PathBuf>> {
        let relative = match self.object.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Array(items)) => match items.as_slice() {
                [Value::String(s)] => s.as_str(),
                [_] => return Err(self.error(name, "expected a path string inside the list")),
                _ => return Err(self.error(name, format!("{} images in one record; only single-image records are supported", items.len()))),
            },
            Some(other) => return Err(self.error(name, format!("expected a path string, found {}", kind_of(other)))),
        };
        if relative.trim().is_empty() {
            return Err(self.error(name, "empty path"));
        }
        let path = root.join(relative);
        check_image(&path, options.image_check).map_err(|message| self.error(name, message))?;
        Ok(Some(path))
    }
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Reads the records of `path`, turns each into zero or more samples with `parse`, and applies the
/// skip policy and limit of `options`.
pub(super) fn load_records<T>(
    path: &Path,
    layout: Layout,
    options: &LoadOptions,
    mut parse: impl FnMut(&Record<'_>) -> Result<Vec<T>>,
) -> Result<(Vec<T>, SkipReport)> {
    let bytes = std::fs::read(path).map_err(|e| PivotError::file(path, format!("cannot read: {e}")))?;
    let text = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&bytes);
    let layout = match layout {
        Layout::Auto if text.get(skip_whitespace(text, 0)) == Some(&b'[') => Layout::List,
        Layout::Auto => Layout::Lines,
        other => other,
    };
    let raws = match layout {
        Layout::List => split_list(path, text)?,
        _ => split_lines(text),
    };

    let mut samples = Vec::new();
    let mut skipped = SkipReport::default();
    for raw in &raws {
        if options.limit.is_some_and(|limit| samples.len() >= limit) {
            break;
        }
        match Record::parse(path, raw).and_then(|record| parse(&record)) {
            Ok(mut parsed) => samples.append(&mut parsed),
            Err(err) => match options.skip_policy {
                SkipPolicy::Error => return Err(err),
                SkipPolicy::Skip => skipped.push(Skipped::from_error(err)),
            },
        }
    }
    if let Some(limit) = options.limit {
        samples.truncate(limit);
    }
    Ok((samples, skipped))
}

fn split_lines(text: &[u8]) -> Vec<RawRecord<'_>> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| (i, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.iter().all(|b| b.is_ascii_whitespace()))
        .map(|(i, line)| RawRecord { line: i + 1, text: line })
        .collect()
}

/// 1-based line of each byte offset.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &[u8]) -> Self {
        LineIndex(text.iter().copied().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i).collect())
    }
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

fn split_list<'a>(path: &Path, text: &'a [u8]) -> Result<Vec<RawRecord<'a>>> {
    let lines = LineIndex::new(text);
    let bytes = text;
    let fail = |at: usize, message: &str| record_error(path, lines.line(at), "json", message);

    let mut i = skip_whitespace(bytes, 0);
    if bytes.get(i) != Some(&b'[') {
        return Err(fail(i, "expected a JSON list `[...]` of records"));
    }
    i += 1;
    let mut records = Vec::new();
    loop {
        i = skip_whitespace(bytes, i);
        match bytes.get(i) {
            None => return Err(fail(i, "unterminated list: missing `]`")),
            Some(b']') if records.is_empty() => {
                i += 1;
                break;
            }
            _ => {}
        }
        let start = i;
        i = scan_value(bytes, i).map_err(|(at, message)| fail(at, message))?;
        records.push(RawRecord { line: lines.line(start), text: &text[start..i] });
        i = skip_whitespace(bytes, i);
        match bytes.get(i) {
            Some(b',') => i += 1,
            Some(b']') => {
                i += 1;
                break;
            }
            None => return Err(fail(i, "unterminated list: missing `]`")),
            Some(_) => return Err(fail(i, "expected `,` or `]` after a record")),
        }
    }
    if skip_whitespace(bytes, i) < bytes.len() {
        return Err(fail(i, "unexpected text after the closing `]`"));
    }
    Ok(records)
}

fn skip_whitespace(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// End offset of the JSON value starting at `i`. Only finds the extent; mismatched brackets and
/// bad tokens inside are left for serde to report.
fn scan_value(bytes: &[u8], i: usize) -> std::result::Result<usize, (usize, &'static str)> {
    match bytes[i] {
        b'"' => scan_string(bytes, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match bytes.get(j) {
                    None => return Err((i, "unterminated record: brackets never close")),
                    Some(b'"') => j = scan_string(bytes, j)?,
                    Some(b'{' | b'[') => {
                        depth += 1;
                        j += 1;
                    }
                    Some(b'}' | b']') => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            return Ok(j);
                        }
                    }
                    Some(_) => j += 1,
                }
            }
        }
        _ => {
            let mut j = i;
            while bytes.get(j).is_some_and(|b| !matches!(b, b',' | b']' | b'}') && !b.is_ascii_whitespace()) {
                j += 1;
            }
            Ok(j)
        }
    }
}

fn scan_string(bytes: &[u8], i: usize) -> std::result::Result<usize, (usize, &'static str)> {
    let mut j = i + 1;
    loop {
        match bytes.get(j) {
            None => return Err((i, "unterminated string")),
            Some(b'\\') => j += 2,
            Some(b'"') => return Ok(j + 1),
            Some(_) => j += 1,
        }
    }
}

/// Removes the `<image>` placeholder LLaVA and PIVOT put in front of (or behind) the first question.
pub(super) fn strip_image_placeholder(text: &str) -> String {
    text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").trim().to_string()
}
