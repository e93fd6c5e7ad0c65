//! `pivot-kernel run NOTEBOOK.ipynb`: executes a notebook headlessly with the engine (no
//! sockets, no Python) and writes the outputs back in nbformat 4.

use std::collections::HashMap;
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

/// Runs every code cell. Returns Ok(None) on success, Ok(Some(message)) when a cell failed
/// (the notebook is written either way).
pub fn run(path: &Path, opts: &RunOptions) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut nb: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not a notebook: {e}", path.display()))?;
    inject_parameters(&mut nb, &opts.params);
    let n_cells = nb["cells"].as_array().map(Vec::len).unwrap_or(0);
    let outputs = Arc::new(Mutex::new(Outputs { cells: vec![Vec::new(); n_cells], ..Default::default() }));
    let sink_outputs = outputs.clone();
    let sink: crate::engine::Sink = Arc::new(move |e| sink_outputs.lock().unwrap_or_else(|p| p.into_inner()).event(e));
    crate::engine::buildlog::set_sink(None);
    let mut session = Session::start(SessionOptions::new(Frontend::Jupyter)?, sink)?;
    eprintln!("pivot-kernel run: engine ready in {:.1} s", session.startup.as_secs_f64());
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
    drop(session);
    let o = outputs.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..n_cells {
        if nb["cells"][i]["cell_type"] == "code" && last_run.is_some_and(|l| i <= l) {
            let outs: Vec<Value> = o.cells[i]
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
        json!({"name": "rust", "version": crate::engine::paths::rustc_version(), "mimetype": "text/rust",
               "file_extension": ".rs", "pygments_lexer": "rust", "codemirror_mode": "rust"}),
    );
    nb["metadata"] = Value::Object(meta);
    let out_path = opts.output.clone().unwrap_or_else(|| path.to_path_buf());
    std::fs::write(&out_path, serde_json::to_string_pretty(&nb)? + "\n")?;
    Ok(failure)
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
}
