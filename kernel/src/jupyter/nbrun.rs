//! `pivot-kernel run NOTEBOOK.ipynb`: executes a notebook headlessly with the engine (no
//! sockets, no Python) and writes the outputs back in nbformat 4.
//!
//! The notebook is checked before the engine starts ([`parse_notebook`]: every field the runner
//! reads or rewrites must have its nbformat type, and an error names it), and it is replaced
//! atomically ([`write_atomic`]), so a full disk or a kill mid-write leaves the old notebook.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::engine::{Event, Frontend, Session, SessionOptions};

pub struct RunOptions {
    pub allow_errors: bool,
    /// `name=value` pairs; the value is a Rust expression (`-p lr=1e-3 -p name='"vit"'`).
    pub params: Vec<(String, String)>,
    pub output: Option<PathBuf>,
}

#[derive(Default)]
struct Outputs {
    cells: Vec<Vec<Value>>,
    current: usize,
    pending_clear: bool,
    /// display_id → (cell, output index) of every output showing it.
    displays: HashMap<String, Vec<(usize, usize)>>,
}

impl Outputs {
    fn push(&mut self, out: Value) -> usize {
        if self.pending_clear {
            self.pending_clear = false;
            self.clear();
        }
        let cell = &mut self.cells[self.current];
        // Consecutive text of one stream is one output, as Jupyter stores it.
        if out["output_type"] == "stream" {
            if let Some(last) = cell.last_mut() {
                if last["output_type"] == "stream" && last["name"] == out["name"] {
                    let text = last["text"].as_str().unwrap_or("").to_string() + out["text"].as_str().unwrap_or("");
                    last["text"] = json!(text);
                    return cell.len() - 1;
                }
            }
        }
        cell.push(out);
        cell.len() - 1
    }

    fn clear(&mut self) {
        let cur = self.current;
        self.cells[cur].clear();
        for v in self.displays.values_mut() {
            v.retain(|(c, _)| *c != cur);
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Stream { name, text } => {
                self.push(json!({"output_type": "stream", "name": name.as_str(), "text": text}));
            }
            Event::Display { data, metadata, display_id, update } => {
                if update {
                    let Some(id) = display_id else { return };
                    for (c, i) in self.displays.get(&id).cloned().unwrap_or_default() {
                        if let Some(o) = self.cells.get_mut(c).and_then(|cell| cell.get_mut(i)) {
                            o["data"] = Value::Object(data.clone());
                            o["metadata"] = metadata.clone();
                        }
                    }
                } else {
                    let mut out = json!({"output_type": "display_data", "data": data, "metadata": metadata});
                    if let Some(id) = &display_id {
                        out["transient"] = json!({"display_id": id});
                    }
                    let idx = self.push(out);
                    if let Some(id) = display_id {
                        self.displays.entry(id).or_default().push((self.current, idx));
                    }
                }
            }
            Event::Clear { wait } => {
                if wait {
                    self.pending_clear = true;
                } else {
                    self.clear();
                }
            }
            Event::Progress(_) => {}
        }
    }
}

fn source_text(cell: &Value) -> String {
    match &cell["source"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => String::new(),
    }
}

fn has_tag(cell: &Value, tag: &str) -> bool {
    cell["metadata"]["tags"].as_array().is_some_and(|t| t.iter().any(|x| x == tag))
}

/// papermill-style: parameters go into a cell tagged `injected-parameters` right after the cell
/// tagged `parameters` (or first), replacing an earlier injected one.
pub fn inject_parameters(nb: &mut Value, params: &[(String, String)]) {
    if params.is_empty() {
        return;
    }
    let Some(cells) = nb["cells"].as_array_mut() else { return };
    cells.retain(|c| !has_tag(c, "injected-parameters"));
    let src: String = params.iter().map(|(k, v)| format!("let {k} = {v};\n")).collect();
    let cell = json!({
        "cell_type": "code",
        "execution_count": null,
        "metadata": {"tags": ["injected-parameters"]},
        "outputs": [],
        "source": src,
    });
    let at = cells.iter().position(|c| has_tag(c, "parameters")).map(|i| i + 1).unwrap_or(0);
    cells.insert(at, cell);
}

/// Why a text is not a notebook the runner can execute and rewrite, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotebookError {
    /// Not JSON: serde_json's message (with line and column).
    Json(String),
    /// `field` (a path such as `cells[3].source`) is missing or has the wrong type.
    Field { field: String, expected: &'static str },
}

impl std::fmt::Display for NotebookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotebookError::Json(e) => write!(f, "not a notebook: {e}"),
            NotebookError::Field { field, expected } => write!(f, "not a notebook: `{field}` must be {expected}"),
        }
    }
}

impl std::error::Error for NotebookError {}

fn field_error(field: impl Into<String>, expected: &'static str) -> NotebookError {
    NotebookError::Field { field: field.into(), expected }
}

/// Reads an nbformat 4 notebook, checking what the runner relies on: a top-level object with a
/// `cells` list of objects, each with a string `cell_type`; code cells' `source` a string or a
/// list of strings; `metadata` (top level and per cell) an object when present, and `tags` a
/// list. Anything else is kept as it is.
pub fn parse_notebook(text: &str) -> Result<Value, NotebookError> {
    let nb: Value = serde_json::from_str(text).map_err(|e| NotebookError::Json(e.to_string()))?;
    let top = nb.as_object().ok_or_else(|| field_error("(top level)", "a JSON object"))?;
    if top.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err(field_error("metadata", "an object"));
    }
    let cells = top.get("cells").and_then(Value::as_array).ok_or_else(|| field_error("cells", "a list of cells"))?;
    for (i, cell) in cells.iter().enumerate() {
        let cell = cell.as_object().ok_or_else(|| field_error(format!("cells[{i}]"), "an object"))?;
        let kind = cell.get("cell_type").and_then(Value::as_str).ok_or_else(|| field_error(format!("cells[{i}].cell_type"), "a string"))?;
        match cell.get("metadata") {
            None => {}
            Some(Value::Object(m)) => {
                if m.get("tags").is_some_and(|t| !t.as_array().is_some_and(|t| t.iter().all(Value::is_string))) {
                    return Err(field_error(format!("cells[{i}].metadata.tags"), "a list of strings"));
                }
            }
            Some(_) => return Err(field_error(format!("cells[{i}].metadata"), "an object")),
        }
        if kind == "code" {
            let ok = match cell.get("source") {
                Some(Value::String(_)) => true,
                Some(Value::Array(lines)) => lines.iter().all(Value::is_string),
                _ => false,
            };
            if !ok {
                return Err(field_error(format!("cells[{i}].source"), "a string or a list of strings"));
            }
        }
    }
    Ok(nb)
}

/// Replaces `path` with `contents` so that a crash, a kill or a full disk at any moment leaves
/// the old file or the new one, never a mix: a temporary file in the same directory (tempfile
/// names it and removes it on error), fsync, rename over `path` (atomic within a file system),
/// then fsync the directory so the rename itself is durable. Keeps the old file's permissions.
pub fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {what}: {e} (the file was left as it was)", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", path.file_name().and_then(|n| n.to_str()).unwrap_or("notebook")))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| fail("cannot create a temporary file beside it", &e))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = tmp.as_file().set_permissions(meta.permissions());
    }
    tmp.write_all(contents).map_err(|e| fail("cannot write", &e))?;
    tmp.as_file().sync_all().map_err(|e| fail("cannot sync", &e))?;
    tmp.persist(path).map_err(|e| fail("cannot replace", &e.error))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| anyhow::anyhow!("{}: written, but syncing its directory failed: {e}", path.display()))?;
    Ok(())
}

/// Runs every code cell, on a session of its own or on `prestarted` (a spare's, whose output the
/// switch sends here meanwhile). Returns None on success, Some(message) when a cell failed (the
/// notebook is written either way), and the prestarted session back, to be recycled.
pub fn run(
    path: &Path,
    opts: &RunOptions,
    prestarted: Option<(Session, crate::engine::spare::SinkSwitch)>,
) -> anyhow::Result<(Option<String>, Option<Session>)> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut nb = parse_notebook(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    inject_parameters(&mut nb, &opts.params);
    let n_cells = nb["cells"].as_array().map(Vec::len).unwrap_or(0);
    let outputs = Arc::new(Mutex::new(Outputs { cells: vec![Vec::new(); n_cells], ..Default::default() }));
    let sink_outputs = outputs.clone();
    let sink: crate::engine::Sink = Arc::new(move |e| sink_outputs.lock().unwrap_or_else(|p| p.into_inner()).event(e));
    crate::engine::buildlog::set_sink(None);
    let adopted = prestarted.is_some();
    let mut session = match prestarted {
        Some((session, switch)) => {
            switch.set(sink);
            session
        }
        None => {
            let session = Session::start(SessionOptions::new(Frontend::Jupyter)?, sink)?;
            eprintln!("pivot-kernel run: engine ready in {:.1} s", session.startup.as_secs_f64());
            session
        }
    };
    let mut failure = None;
    let mut count = 0u64;
    let mut last_run = None;
    for i in 0..n_cells {
        let cell = nb["cells"][i].clone();
        if cell["cell_type"] != "code" {
            continue;
        }
        let code = source_text(&cell);
        {
            let mut o = outputs.lock().unwrap_or_else(|p| p.into_inner());
            o.current = i;
            o.cells[i].clear();
        }
        count += 1;
        last_run = Some(i);
        let r = if code.trim().is_empty() { Default::default() } else { session.execute(&code, &|_, _| String::new()) };
        let mut o = outputs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = r.value {
            o.push(json!({"output_type": "execute_result", "execution_count": count, "data": v, "metadata": {}}));
        }
        if let Some(e) = &r.error {
            o.push(json!({"output_type": "error", "ename": e.ename, "evalue": e.evalue, "traceback": e.traceback}));
        }
        nb["cells"][i]["execution_count"] = json!(count);
        eprintln!(
            "pivot-kernel run: cell {} {} in {:.2} s",
            i + 1,
            if r.error.is_some() { "failed" } else { "done" },
            r.duration.as_secs_f64()
        );
        if let Some(e) = r.error {
            if !opts.allow_errors {
                failure = Some(format!("cell {} failed: {}: {}", i + 1, e.ename, e.evalue));
                break;
            }
        }
    }
    let back = if adopted { Some(session) } else { None };
    let o = outputs.lock().unwrap_or_else(|p| p.into_inner());
    record_outputs(&mut nb, &o.cells, last_run, &crate::engine::paths::rustc_version());
    let out_path = opts.output.clone().unwrap_or_else(|| path.to_path_buf());
    write_atomic(&out_path, (serde_json::to_string_pretty(&nb)? + "\n").as_bytes())?;
    Ok((failure, back))
}

/// Writes the outputs of the cells that ran (up to `last_run`) and the kernel's metadata into a
/// notebook accepted by [`parse_notebook`].
fn record_outputs(nb: &mut Value, cells: &[Vec<Value>], last_run: Option<usize>, rustc_version: &str) {
    let n_cells = nb["cells"].as_array().map(Vec::len).unwrap_or(0).min(cells.len());
    for i in 0..n_cells {
        if nb["cells"][i]["cell_type"] == "code" && last_run.is_some_and(|l| i <= l) {
            let outs: Vec<Value> = cells[i]
                .iter()
                .map(|out| {
                    let mut out = out.clone();
                    if let Some(m) = out.as_object_mut() {
                        m.remove("transient");
                    }
                    out
                })
                .collect();
            nb["cells"][i]["outputs"] = Value::Array(outs);
        }
    }
    let meta = nb["metadata"].as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut meta: Map<String, Value> = meta;
    meta.insert("kernelspec".into(), json!({"name": super::install::KERNEL_NAME, "display_name": "Rust (PIVOT)", "language": "rust"}));
    meta.insert(
        "language_info".into(),
        json!({"name": "rust", "version": rustc_version, "mimetype": "text/rust",
               "file_extension": ".rs", "pygments_lexer": "rust", "codemirror_mode": "rust"}),
    );
    nb["metadata"] = Value::Object(meta);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_go_after_the_parameters_cell() {
        let mut nb = json!({"cells": [
            {"cell_type": "code", "source": "let a = 1;", "metadata": {}},
            {"cell_type": "code", "source": "let lr = 0.1;", "metadata": {"tags": ["parameters"]}},
            {"cell_type": "code", "source": "lr", "metadata": {}},
        ]});
        inject_parameters(&mut nb, &[("lr".into(), "0.5".into())]);
        assert_eq!(nb["cells"][2]["source"], "let lr = 0.5;\n");
        inject_parameters(&mut nb, &[("lr".into(), "0.25".into())]);
        assert_eq!(nb["cells"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn outputs_merge_streams_and_update_displays() {
        let mut o = Outputs { cells: vec![vec![], vec![]], ..Default::default() };
        o.event(Event::Stream { name: crate::engine::StreamName::Stdout, text: "a".into() });
        o.event(Event::Stream { name: crate::engine::StreamName::Stdout, text: "b".into() });
        let mut d = Map::new();
        d.insert("text/plain".into(), json!("v1"));
        o.event(Event::Display { data: d.clone(), metadata: json!({}), display_id: Some("x".into()), update: false });
        o.current = 1;
        d.insert("text/plain".into(), json!("v2"));
        o.event(Event::Display { data: d, metadata: json!({}), display_id: Some("x".into()), update: true });
        assert_eq!(o.cells[0].len(), 2);
        assert_eq!(o.cells[0][0]["text"], "ab");
        assert_eq!(o.cells[0][1]["data"]["text/plain"], "v2");
        assert!(o.cells[1].is_empty());
    }

    #[test]
    fn reader_names_the_bad_field() {
        let err = |t: &str| parse_notebook(t).unwrap_err().to_string();
        assert!(err("{\"cells\": [}").contains("line 1 column 12"), "{}", err("{\"cells\": [}"));
        assert_eq!(err("[1]"), "not a notebook: `(top level)` must be a JSON object");
        assert_eq!(err("{}"), "not a notebook: `cells` must be a list of cells");
        assert_eq!(err(r#"{"cells": [{"cell_type": "code", "source": "x"}, 5]}"#), "not a notebook: `cells[1]` must be an object");
        assert_eq!(
            err(r#"{"cells": [{"cell_type": "code", "source": ["a", 1]}]}"#),
            "not a notebook: `cells[0].source` must be a string or a list of strings"
        );
        assert_eq!(err(r#"{"cells": [], "metadata": "x"}"#), "not a notebook: `metadata` must be an object");
        assert_eq!(
            err(r#"{"cells": [{"cell_type": "raw", "metadata": {"tags": "parameters"}}]}"#),
            "not a notebook: `cells[0].metadata.tags` must be a list of strings"
        );
        assert!(parse_notebook(r#"{"cells": [{"cell_type": "markdown", "source": 7}], "nbformat": 4}"#).is_ok());
    }

    #[test]
    fn atomic_write_replaces_whole_files_and_keeps_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nb.ipynb");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new contents");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left behind");
        // A target that cannot be replaced (a directory) leaves everything as it was.
        let sub = dir.path().join("sub.ipynb");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("keep"), "x").unwrap();
        let e = write_atomic(&sub, b"y").unwrap_err().to_string();
        assert!(e.contains("sub.ipynb") && e.contains("left as it was"), "{e}");
        assert_eq!(std::fs::read_to_string(sub.join("keep")).unwrap(), "x");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                prop_oneof![Just("code"), Just("markdown"), Just("parameters"), Just("cells"), Just(""), Just("x\n")].prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec(
                        (prop_oneof![Just("cells"), Just("cell_type"), Just("source"), Just("metadata"), Just("tags"), Just("outputs"), Just("execution_count"), Just("k")], inner),
                        0..6
                    )
                    .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
                ]
            })
        }

        /// Everything the runner does to a notebook after reading it, minus the engine.
        fn process(nb: &mut Value) {
            inject_parameters(nb, &[("lr".into(), "0.5".into())]);
            let n = nb["cells"].as_array().map(Vec::len).unwrap_or(0);
            for i in 0..n {
                let _ = source_text(&nb["cells"][i]);
                if nb["cells"][i]["cell_type"] == "code" {
                    nb["cells"][i]["execution_count"] = json!(1);
                }
            }
            let outputs = vec![vec![json!({"output_type": "stream", "name": "stdout", "text": "x", "transient": {}})]; n];
            record_outputs(nb, &outputs, n.checked_sub(1), "rustc 1.95.0");
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

            /// Any JSON document: refused with a named field, or read and processed without a
            /// panic into a notebook that reads back with the same cells.
            #[test]
            fn any_json_is_refused_or_processed(doc in json()) {
                match parse_notebook(&doc.to_string()) {
                    Err(e) => prop_assert!(e.to_string().starts_with("not a notebook: "), "{e}"),
                    Ok(mut nb) => {
                        let before = nb["cells"].as_array().unwrap().len();
                        process(&mut nb);
                        let again = parse_notebook(&nb.to_string());
                        prop_assert!(again.is_ok(), "{:?}", again);
                        let after = nb["cells"].as_array().unwrap().len();
                        prop_assert!(after == before || after == before + 1);
                    }
                }
            }

            /// Damaged notebook text (bytes cut, flipped or inserted): never a panic.
            #[test]
            fn damaged_text_never_panics(cut in any::<prop::sample::Index>(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
                let good = r##"{"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["let a = 1;\n", "a"], "outputs": []},
                    {"cell_type": "markdown", "metadata": {}, "source": "# t"}], "metadata": {"kernelspec": {}}, "nbformat": 4, "nbformat_minor": 5}"##;
                let mut bytes = good.as_bytes().to_vec();
                for (at, b) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                let text = String::from_utf8_lossy(&bytes);
                if let Ok(mut nb) = parse_notebook(&text) {
                    process(&mut nb);
                }
            }
        }
    }
}
