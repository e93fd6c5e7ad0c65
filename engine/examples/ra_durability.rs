//! How much of a cell's rust-analyzer time is the durability of its source roots?
//!
//!     cargo run -p pivot-engine --example ra_durability -- PRELUDE_DYLIB_DIR LOCKFILE [CELLS [NOTEBOOK.ipynb]]
//!
//! evcxr puts every file of the crate graph (std, the prelude, its ~230 dependencies) into one
//! *local* source root, so rust-analyzer stores them at LOW durability and, after each edit of the
//! cell, re-verifies every memo it ever computed over them before it can answer. An IDE marks the
//! files a user does not edit as *library* roots (HIGH durability), whose memos stay valid without
//! a walk. This loads one cell crate (`[dependencies] pivot = { path = PRELUDE_DYLIB_DIR }`, the
//! slot's lock file, offline) twice, once with evcxr's layout and once with only the cell's folder
//! local, and times, for the same cells on each, what evcxr asks for per cell: the cell's module
//! (every cell) and the types of its top-level `let`s (cells with a `let`). The cells are the
//! benchmark's three kinds and, given a notebook, its code cells in order, each with the variables
//! the cells before it defined as parameters, typed as this analysis named them.
//!
//! It measured the design that `pivot_engine::analysis` (session 16) builds; the kernel does not run it.
use anyhow::{Context, Result, anyhow};
use pivot_engine::analysis::{Roots, load_host};
use ra_ap_hir::{HirDisplay, Semantics};
use ra_ap_ide::{AnalysisHost, Edition};
use ra_ap_paths::AbsPathBuf;
use ra_ap_syntax::ast::{self, AstNode, HasModuleItem, HasName};
use ra_ap_vfs::FileId;
use std::time::{Duration, Instant};

const WRAPPER: &str = "pivot_analysis_wrapper";

/// A rust-analyzer database over one cell crate.
struct Analysis {
    host: AnalysisHost,
    cell_file: FileId,
}

impl Analysis {
    /// Loads the crate in `dir`; `cell_only_local`: only the cell is a local root, the rest library.
    fn load(dir: &AbsPathBuf, cell_only_local: bool) -> Result<Analysis> {
        let (host, cell_file) = load_host(dir, if cell_only_local { Roots::CellLocal } else { Roots::AllLocal })?;
        Ok(Analysis { host, cell_file })
    }

    /// Sets the cell's text, then answers what evcxr asks of every cell: the wrapper's module, and
    /// the name of each top-level `let`'s type.
    fn cell(&mut self, text: &str) -> (Duration, Vec<(String, String)>) {
        let mut change = ra_ap_hir::ChangeWithProcMacros::default();
        change.change_file(self.cell_file, Some(text.to_string()));
        let started = Instant::now();
        self.host.apply_change(change);
        let db = self.host.raw_database();
        let sema = Semantics::new(db);
        let file = sema.parse(ra_ap_base_db::EditionedFileId::new(db, self.cell_file, Edition::Edition2024));
        let mut types = Vec::new();
        ra_ap_hir::attach_db(db, || {
            for item in file.items() {
                let ast::Item::Fn(f) = item else { continue };
                if f.name().is_none_or(|n| n.text() != WRAPPER) {
                    continue;
                }
                let module = sema.scope(f.syntax()).map(|s| s.module()).expect("the wrapper has a module");
                for stmt in f.body().into_iter().flat_map(|b| b.statements().collect::<Vec<_>>()) {
                    let ast::Stmt::LetStmt(l) = stmt else { continue };
                    let Some(pat) = l.pat() else { continue };
                    let name = pat.syntax().text().to_string();
                    let ty = sema
                        .type_of_pat(&pat)
                        .map(|t| t.original().display_source_code(db, module.into(), true).unwrap_or_else(|_| "?".into()))
                        .unwrap_or_else(|| "?".into());
                    types.push((name, ty));
                }
            }
        });
        (started.elapsed(), types)
    }
}

fn wrapper(vars: &[(String, String)], body: &str) -> String {
    let params: Vec<String> = vars.iter().map(|(n, t)| format!("{n}: {t}")).collect();
    format!(
        "#![allow(unused)]\nuse pivot::prelude::*;\nfn pivot_store<T: 'static>(_: T) {{}}\nasync fn {WRAPPER}({}) -> Result<(), Box<dyn std::error::Error>> {{\n{body}\nOk(())\n}}\n",
        params.join(", ")
    )
}

/// A notebook's code cells as wrapper bodies (a final expression gets a `;`).
fn notebook_cells(path: &str) -> Result<Vec<String>> {
    let nb: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?)?;
    let mut cells = Vec::new();
    for cell in nb["cells"].as_array().context("no cells")? {
        if cell["cell_type"] != "code" {
            continue;
        }
        let text: String = cell["source"].as_array().map(|l| l.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();
        let mut body = text.trim_end().to_string();
        if !body.ends_with(';') && !body.ends_with('}') {
            body.push(';');
        }
        cells.push(body);
    }
    Ok(cells)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dylib, lock) = (args.get(1).context("PRELUDE_DYLIB_DIR")?, args.get(2).context("LOCKFILE")?);
    // The cell crate lives in a temporary folder: a relative path would resolve from there.
    let dylib = std::fs::canonicalize(dylib).with_context(|| format!("{dylib} is not a folder"))?;
    let dylib = dylib.display();
    let cells: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let notebook = args.get(4).map(|p| notebook_cells(p)).transpose()?;
    let dir = std::env::temp_dir().join(format!("pivot-ra-durability-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!("[package]\nname = \"ctx\"\nversion = \"1.0.0\"\nedition = \"2024\"\n\n[lib]\npath = \"src/lib.rs\"\n\n[dependencies]\npivot = {{ path = \"{dylib}\", package = \"pivot-dylib\" }}\n"),
    )?;
    std::fs::copy(lock, dir.join("Cargo.lock"))?;
    std::fs::write(dir.join("src/lib.rs"), wrapper(&[], ""))?;
    // SAFETY: set before any thread of ours starts.
    unsafe { std::env::set_var("CARGO_NET_OFFLINE", "true") };
    let dir = AbsPathBuf::try_from(dir.to_str().context("temp dir is not UTF-8")?).map_err(|p| anyhow!("{p} is not absolute"))?;

    for cell_only_local in [false, true] {
        let layout = if cell_only_local { "cell local, rest library (IDE)" } else { "all local (evcxr)" };
        let t = Instant::now();
        let mut a = Analysis::load(&dir, cell_only_local)?;
        let loaded = t.elapsed();
        let params = vec![("lr".to_string(), "f64".to_string()), ("steps".to_string(), "usize".to_string()), ("run_name".to_string(), "String".to_string())];
        let (first, types) = a.cell(&wrapper(&params, "let t = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));"));
        println!("{layout}: workspace loaded in {:.1} s; first cell {:.1} s, types {types:?}", loaded.as_secs_f64(), first.as_secs_f64());
        let (mut trivial, mut lets, mut tensors) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..cells {
            trivial.push(a.cell(&wrapper(&params, &format!("{i} * 2 + 1;"))).0);
            let (d, types) = a.cell(&wrapper(&params, &format!("let x{i} = {i};\nx{i} + 1;")));
            assert_eq!(types, vec![(format!("x{i}"), "i32".to_string())]);
            lets.push(d);
            let (d, types) = a.cell(&wrapper(&params, &format!("let t{i} = Tensor::ones([2, {i} + 1], (Kind::Float, Device::Cpu)).sum(Kind::Float);")));
            assert_eq!(types.len(), 1);
            tensors.push(d);
        }
        println!(
            "{layout}: per cell, median of {cells}: trivial {:.4} s, `let` {:.4} s, tensor `let` {:.4} s",
            median(trivial),
            median(lets),
            median(tensors)
        );
        if let Some(nb) = &notebook {
            // Three rounds over the notebook's cells: the first computes what no earlier cell
            // needed (the user's first pass), the later two mostly re-verify.
            let mut times = vec![Vec::new(); nb.len()];
            for _ in 0..3 {
                let mut params: Vec<(String, String)> = Vec::new();
                for (i, body) in nb.iter().enumerate() {
                    let (took, types) = a.cell(&wrapper(&params, body));
                    times[i].push(took);
                    // A type this analysis cannot name would make the next cells' parameters invalid.
                    for (name, ty) in types.into_iter().filter(|(_, ty)| ty != "?") {
                        params.retain(|(n, _)| *n != name);
                        params.push((name, ty));
                    }
                }
            }
            let first: Vec<String> = times.iter().map(|t| format!("{:.3}", t[0].as_secs_f64())).collect();
            let again: Vec<String> = times.iter().map(|t| format!("{:.3}", median(t[1..].to_vec()))).collect();
            println!("{layout}: the notebook's {} code cells, s, first pass: {}; again (the slower of 2 more rounds): {}", nb.len(), first.join(" "), again.join(" "));
        }
    }
    let _ = std::fs::remove_dir_all(dir.as_path());
    Ok(())
}
