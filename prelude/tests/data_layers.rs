//! The modules of `data/` import one another as a DAG (no circle such as world ⇄ render ⇄ text).
//! Reads the sources: a sibling is imported when a file names `super::m`, `crate::data::m`, or an
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

#[test]
fn the_scanner_finds_circles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(brace_heads(" CaptionDataset, render::{owner_map, render}, Split "), ["CaptionDataset", "render", "Split"]);
}
