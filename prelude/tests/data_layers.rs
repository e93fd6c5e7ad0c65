//! The prelude's modules import one another downwards only.
//!
//! - Across folders, the developers' guide's layers: `data/` and `plot/` at the bottom (they import
//!   neither each other nor anything above), `model/` above them (its tokenizer uses `data/`'s
//!   vocabulary), `train/` and `probe/` above `model/` (independent of each other), and `analysis/`
//!   on top (it reuses probes and the DPO loss). The crate-root helpers `error`, `device` and
//!   `runtime` may be imported by anyone and import no folder. A report type's Display, Rich and
//!   plots therefore live beside the type, and `plot/` draws from plain numbers.
//! - Within every folder, the files form a DAG (no circle such as world ⇄ render ⇄ text in `data/`,
//!   or mllm ⇄ batch in `model/`).
//!
//! Reads the sources: a folder is imported when a file names `crate::folder` (also inside
//! `crate::{..}`); a sibling is imported when a file names `super::m`, `crate::data::m`, or an
//! item that `data/mod.rs` re-exports from `m` (`pub use m::{..}` or `pub use m::*`). Costs
//! milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const IDENT: fn(char) -> bool = |c| c.is_ascii_alphanumeric() || c == '_';

fn strip_comments(source: &str) -> String {
    source.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The leading identifier of each top-level, comma-separated part of `super::{...}` etc.
fn brace_heads(body: &str) -> Vec<String> {
    let (mut parts, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts.iter().map(|p| p.trim().chars().take_while(|&c| IDENT(c)).collect()).filter(|s: &String| !s.is_empty()).collect()
}

/// Every name that follows one of `prefixes` (`super::x`, `super::{x, y::z}`).
fn names_after(source: &str, prefixes: &[&str]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in prefixes {
        let mut rest = source;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            if let Some(inner) = rest.strip_prefix('{') {
                let mut depth = 1;
                let end = inner
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map(|(i, _)| i)
                    .expect("balanced braces");
                names.extend(brace_heads(&inner[..end]));
            } else {
                names.insert(rest.chars().take_while(|&c| IDENT(c)).collect());
            }
        }
    }
    names
}

/// Names a module file declares `pub` (for `pub use m::*`).
fn public_items(source: &str) -> BTreeSet<String> {
    let mut items = BTreeSet::new();
    for line in source.lines() {
        let line = line.trim_start();
        for kind in ["pub struct ", "pub enum ", "pub fn ", "pub trait ", "pub type ", "pub const ", "pub static "] {
            if let Some(rest) = line.strip_prefix(kind) {
                items.insert(rest.chars().take_while(|&c| IDENT(c)).collect());
            }
        }
    }
    items
}

/// Sibling-module import graph of one module directory.
fn import_graph(dir: &Path, crate_path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.extension().is_some_and(|e| e == "rs") && stem != "mod" {
            sources.insert(stem, strip_comments(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    // Which sibling defines each name that mod.rs re-exports.
    let parent = strip_comments(&std::fs::read_to_string(dir.join("mod.rs")).unwrap());
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for module in sources.keys() {
        let reexport = format!("pub use {module}::");
        if parent.contains(&format!("{reexport}*")) {
            for item in public_items(&sources[module]) {
                owner.insert(item, module.clone());
            }
        }
        for name in names_after(&parent, &[&reexport]) {
            owner.insert(name, module.clone());
        }
    }
    let crate_prefix = format!("{crate_path}::");
    sources
        .iter()
        .map(|(module, source)| {
            let imported = names_after(source, &["super::", &crate_prefix])
                .into_iter()
                .filter_map(|name| if sources.contains_key(&name) { Some(name) } else { owner.get(&name).cloned() })
                .filter(|m| m != module)
                .collect();
            (module.clone(), imported)
        })
        .collect()
}

/// A circle in the graph, as the path of modules that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn data_modules_import_each_other_as_a_dag() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data");
    let graph = import_graph(&dir, "crate::data");
    // The scanner must see the imports that exist, or the check below proves nothing.
    for (from, to) in [("world", "render"), ("world", "text"), ("export", "world"), ("world", "samples")] {
        assert!(graph[from].contains(to), "scanner missed {from} → {to}: {graph:?}");
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import circle in prelude/src/data: {}\ngraph: {graph:#?}", cycle.join(" → "));
    }
}

/// The folders of the crate (each a module directory with a mod.rs).
const FOLDERS: &[&str] = &["data", "plot", "model", "train", "probe", "analysis"];

/// Circles known and still open, per folder: none today (the vision towers' circle, vision ⇄ clip,
/// dinov2, vit, timm, was untied by moving `VisionConfig` below the families, into
/// `model/vision_config.rs`). Each group is contracted to one node, so a circle through any other
/// module still fails, and so does a group that no longer is one.
const KNOWN_TANGLES: &[(&str, &[&str])] = &[];

/// `graph` with the modules of `group` merged into one node (edges inside the group dropped).
fn contract(graph: &BTreeMap<String, BTreeSet<String>>, group: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let name = |m: &String| if group.contains(&m.as_str()) { format!("{{{}}}", group.join("+")) } else { m.clone() };
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in graph {
        let entry = out.entry(name(from)).or_default();
        entry.extend(tos.iter().map(name).filter(|to| *to != name(from)));
    }
    out
}

#[test]
fn no_folder_has_an_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graphs: BTreeMap<&str, BTreeMap<String, BTreeSet<String>>> =
        FOLDERS.iter().map(|f| (*f, import_graph(&src.join(f), &format!("crate::{f}")))).collect();
    // The scanner must see imports in every folder, or the check below proves nothing: one known
    // edge per folder (named through `super::m`, a re-exported item, or `crate::folder::m`).
    for (folder, from, to) in [("model", "mllm", "batch"), ("model", "vision", "clip"), ("model", "timm", "vision_config"), ("probe", "encoder", "seg"), ("probe", "encoder", "features")] {
        assert!(graphs[folder][from].contains(to), "scanner missed {folder}/{from} → {to}: {:?}", graphs[folder]);
    }
    let mut circles = Vec::new();
    for (folder, graph) in &graphs {
        let mut graph = graph.clone();
        for (_, group) in KNOWN_TANGLES.iter().filter(|(f, _)| f == folder) {
            // A known tangle stays listed only while it is one: every member in a circle with the first.
            for m in &group[1..] {
                let mut sub = graph.clone();
                sub.retain(|k, _| group.contains(&k.as_str()));
                let reach = |a: &str, b: &str| -> bool {
                    let (mut seen, mut todo) = (BTreeSet::new(), vec![a.to_string()]);
                    while let Some(n) = todo.pop() {
                        for next in sub.get(&n).into_iter().flatten() {
                            if next == b { return true; }
                            if seen.insert(next.clone()) { todo.push(next.clone()); }
                        }
                    }
                    false
                };
                assert!(reach(group[0], m) && reach(m, group[0]), "{folder}/{m} is no longer in a circle with {}: shrink KNOWN_TANGLES", group[0]);
            }
            graph = contract(&graph, group);
        }
        if let Some(c) = find_cycle(&graph) {
            circles.push(format!("prelude/src/{folder}: {}", c.join(" → ")));
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_scanner_finds_circles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(brace_heads(" CaptionDataset, render::{owner_map, render}, Split "), ["CaptionDataset", "render", "Split"]);
}

/// Top-level modules in layers, lowest first: a folder may import only folders of lower layers.
const LAYERS: &[&[&str]] = &[&["data", "plot"], &["model"], &["train", "probe"], &["analysis"]];
/// Crate-root helpers: importable from anywhere, importing no folder.
const ROOT_HELPERS: &[&str] = &["error", "device", "runtime"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `.rs` files under `path` (the file itself when it is one), relative to `src`.
fn rust_files(src: &Path, path: &Path, out: &mut Vec<(String, String)>) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for entry in entries {
            rust_files(src, &entry, out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        let relative = path.strip_prefix(src).unwrap().to_string_lossy().to_string();
        out.push((relative, strip_comments(&std::fs::read_to_string(path).unwrap())));
    }
}

/// Every `(file, imported top-level module)` of the crate at `src`, and the breaches of the layer
/// rule among them. A top-level module that is neither in `LAYERS` nor a root helper is a breach
/// too (a new folder must be given its place), as is any use of `crate::prelude` inside the crate.
fn layer_check(src: &Path) -> (BTreeSet<(String, String)>, Vec<String>) {
    let (mut edges, mut breaches) = (BTreeSet::new(), Vec::new());
    let mut entries: Vec<_> = std::fs::read_dir(src).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for entry in entries {
        let module = entry.file_stem().unwrap().to_string_lossy().to_string();
        // `src/bin/*` are crates of their own on the prelude's public API (`pivot::…`), not modules of it.
        if module == "lib" || module == "bin" || !(entry.is_dir() || entry.extension().is_some_and(|e| e == "rs")) {
            continue;
        }
        let own_layer = layer_of(&module);
        if own_layer.is_none() && !ROOT_HELPERS.contains(&module.as_str()) {
            breaches.push(format!("src/{module} has no layer: add it to LAYERS in tests/data_layers.rs"));
            continue;
        }
        let mut files = Vec::new();
        rust_files(src, &entry, &mut files);
        for (file, source) in files {
            for target in names_after(&source, &["crate::"]) {
                if target == module || ROOT_HELPERS.contains(&target.as_str()) {
                    continue;
                }
                let allowed = match (own_layer, layer_of(&target)) {
                    (Some(own), Some(theirs)) => theirs < own,
                    (None, Some(_)) => false,
                    // `crate::prelude`, `crate::PivotError` (lib.rs's re-export) and the like.
                    (_, None) => target != "prelude",
                };
                if layer_of(&target).is_some() || target == "prelude" {
                    edges.insert((module.clone(), target.clone()));
                }
                if !allowed {
                    breaches.push(format!("src/{file} imports crate::{target}"));
                }
            }
        }
    }
    breaches.dedup();
    (edges, breaches)
}

#[test]
fn folders_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (edges, breaches) = layer_check(&src);
    // The scanner must see the imports that exist, or the check below proves nothing.
    for (from, to) in [("analysis", "probe"), ("analysis", "train"), ("probe", "model"), ("train", "data"), ("model", "data"), ("train", "plot")] {
        assert!(edges.contains(&(from.to_string(), to.to_string())), "scanner missed {from} → {to}: {edges:?}");
    }
    let layers: Vec<String> = LAYERS.iter().map(|l| l.join(", ")).collect();
    assert!(breaches.is_empty(), "imports against the layers ({}):\n{}", layers.join(" < "), breaches.join("\n"));
}

#[test]
fn the_layer_check_finds_upward_imports() {
    let src = std::env::temp_dir().join(format!("pivot-layer-check-{}", std::process::id()));
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod plot; pub mod probe; pub mod runtime;");
    write("runtime.rs", "use crate::error::Result;");
    write("plot/mod.rs", "pub mod reports;");
    // An upward import hidden in a brace group and a comment that must not count.
    write("plot/reports.rs", "use crate::{runtime::Rich, probe::ProbeReport};\n// crate::analysis::AlignmentGrid");
    write("probe/mod.rs", "use crate::plot::Figure;");
    write("probe/linear.rs", "fn f() -> crate::prelude::Tensor { todo!() }");
    write("scratch/mod.rs", "");
    let (edges, breaches) = layer_check(&src);
    std::fs::remove_dir_all(&src).unwrap();
    assert!(edges.contains(&("probe".to_string(), "plot".to_string())), "{edges:?}");
    assert_eq!(
        breaches,
        [
            "src/plot/reports.rs imports crate::probe",
            "src/probe/linear.rs imports crate::prelude",
            "src/scratch has no layer: add it to LAYERS in tests/data_layers.rs"
        ]
    );
}
