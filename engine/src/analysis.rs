//! The engine's own analysis of cells: the types of a cell's new `let`s, completions and hover,
//! from rust-analyzer over the cell crate, with every file outside the slot's `src/` (the prelude,
//! its dependencies, the standard library) a *library* source root.
//!
//! Why our own: evcxr's rust-analyzer puts the whole crate graph into one local root, so every
//! edit of the cell makes it re-verify all it has computed over the ~230 crates before it
//! answers (0.11 s per trivial cell, 0.5 s per `let`). As library roots those crates are at high
//! durability and their results stay valid without a walk: 0.001 s and 0.02 s
//! (`examples/ra_durability.rs`, benches/README.md "Issue 16, session 15"). This analysis names
//! the types and `annotate` writes them into the cell; evcxr's rust-analyzer, which no longer sees
//! the dependencies (`racargo`), takes a `let`'s written type as it stands.
//!
//! How a type is written into the cell: after each top-level `let PAT = EXPR;` comes, on the same
//! line, ` let x: T = x;` for each variable `x` the pattern binds (with `mut` as it was bound).
//! The user's text is not changed, so every error in it keeps its line and column, and a
//! destructuring `let` gets its variables' types as a simple one does. The analysed source
//! mirrors evcxr's: the items and `use`s of earlier cells (from the last source evcxr compiled),
//! then a wrapper function whose parameters are the variables evcxr holds, and the cell's text as
//! its body.
//!
//! Written with rust-analyzer's crates (`ra_ap_*`, the versions evcxr pins, so one copy is
//! linked): nothing else names Rust types.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use ra_ap_base_db::SourceRoot;
use ra_ap_hir::{HirDisplay, Semantics};
use ra_ap_ide::{AnalysisHost, Edition, FilePosition, TextRange};
use ra_ap_ide_db::FxHashMap;
use ra_ap_paths::AbsPathBuf;
use ra_ap_project_model::{CargoConfig, ProjectManifest, ProjectWorkspace, RustLibSource};
use ra_ap_syntax::ast::{self, AstNode, HasModuleItem, HasName};
use ra_ap_syntax::SyntaxKind;
use ra_ap_vfs::loader::{self, Handle, LoadingProgress};
use ra_ap_vfs::{file_set::FileSetConfig, FileId, Vfs, VfsPath};

const EDITION: Edition = Edition::Edition2024;
/// The wrapper's name is evcxr's, so that a completion never offers it (evcxr filters it too).
const WRAPPER: &str = "evcxr_analysis_wrapper";
/// Items evcxr generates into the cell crate; left out of the earlier cells' items.
const GENERATED: [&str; 4] = ["evcxr_internal_runtime", "evcxr_variable_store", WRAPPER, "EvcxrUserCodeError"];

/// What a cell sees from the cells before it.
#[derive(Debug, Default, Clone)]
pub struct EarlierCells {
    /// The items and `use`s of earlier cells, as source text.
    pub items: String,
    /// The variables evcxr holds: (name, type as evcxr writes it).
    pub variables: Vec<(String, String)>,
}

impl EarlierCells {
    /// From the source evcxr compiled last (`src/lib.rs` of the slot) and its variables: the
    /// user's items and `use`s are everything in that file but what evcxr generates.
    pub fn from_last_source(last_source: &str, variables: Vec<(String, String)>) -> EarlierCells {
        let file = ast::SourceFile::parse(last_source, EDITION).tree();
        let mut items = String::new();
        for item in file.items() {
            let name = match &item {
                ast::Item::Fn(f) => f.name().map(|n| n.text().to_string()),
                ast::Item::Struct(s) => s.name().map(|n| n.text().to_string()),
                ast::Item::Module(m) => m.name().map(|n| n.text().to_string()),
                ast::Item::Impl(i) => i.self_ty().map(|t| t.syntax().text().to_string()),
                _ => None,
            };
            if name.as_deref().is_some_and(|n| GENERATED.contains(&n) || n.starts_with("run_user_code_")) {
                continue;
            }
            items.push_str(&item.syntax().text().to_string());
            items.push('\n');
        }
        EarlierCells { items, variables }
    }
}

/// A type written into the cell: `text` goes at byte `at` of the cell (right after a `let`).
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    pub at: usize,
    pub text: String,
    /// The variables it types.
    pub variables: usize,
}

/// The cell's text with the annotations inserted.
pub fn annotated(cell: &str, annotations: &[Annotation]) -> String {
    let mut out = String::with_capacity(cell.len() + annotations.iter().map(|a| a.text.len()).sum::<usize>());
    let mut from = 0;
    for a in annotations {
        out.push_str(&cell[from..a.at]);
        out.push_str(&a.text);
        from = a.at;
    }
    out.push_str(&cell[from..]);
    out
}

/// Completions: the byte range of the cell they replace (start, end), and each candidate's code and kind.
pub type Completions = (usize, usize, Vec<(String, String)>);

/// rust-analyzer over the slot's cell crate (module doc).
pub struct CellAnalysis {
    host: AnalysisHost,
    cell_file: FileId,
    slot: PathBuf,
    /// The Cargo.toml loaded; evcxr rewrites it for each `:dep`, and then the graph is loaded again.
    manifest: Vec<u8>,
}

impl CellAnalysis {
    /// Loads the crate graph of the cell crate in `slot` (Cargo.toml, Cargo.lock, src/lib.rs).
    pub fn load(slot: &Path) -> Result<CellAnalysis> {
        let manifest = std::fs::read(slot.join("Cargo.toml")).with_context(|| format!("reading {}", slot.join("Cargo.toml").display()))?;
        let dir = AbsPathBuf::try_from(slot.to_str().context("the slot's path is not UTF-8")?).map_err(|p| anyhow!("{p} is not absolute"))?;
        let (host, cell_file) = load_host(&dir, Roots::CellLocal)?;
        Ok(CellAnalysis { host, cell_file, slot: slot.to_path_buf(), manifest })
    }

    /// Loads the graph again if evcxr changed the cell crate's Cargo.toml (a `:dep`).
    fn refresh(&mut self) -> Result<()> {
        let now = std::fs::read(self.slot.join("Cargo.toml")).unwrap_or_default();
        if now != self.manifest {
            *self = CellAnalysis::load(&self.slot)?;
        }
        Ok(())
    }

    /// Sets the analysed source: the context, then the wrapper around `body`. Returns the offset
    /// of `body` in it.
    fn set_source(&mut self, ctx: &EarlierCells, body: &str) -> Result<usize> {
        self.refresh()?;
        let params: String = ctx.variables.iter().map(|(n, t)| format!("mut {n}: {t},\n")).collect();
        let head = format!(
            "#![allow(unused_imports, unused_mut, dead_code)]\n{}\nstruct EvcxrUserCodeError {{}}\nimpl<T: std::fmt::Display> From<T> for EvcxrUserCodeError {{ fn from(_: T) -> Self {{ EvcxrUserCodeError {{}} }} }}\nfn evcxr_variable_store<T: 'static>(_: T) {{}}\n#[allow(unused_variables)]\nasync fn {WRAPPER}(\n{params}) -> Result<(), EvcxrUserCodeError> {{\n",
            ctx.items
        );
        let text = format!("{head}{}\n;\nOk(())\n}}\n", without_commands(body));
        let mut change = ra_ap_hir::ChangeWithProcMacros::default();
        change.change_file(self.cell_file, Some(text));
        self.host.apply_change(change);
        Ok(head.len())
    }

    /// The annotations that name the type of every variable the cell's top-level `let`s bind,
    /// where rust-analyzer can name it as valid Rust (module doc). Closures and types it cannot
    /// name get none: evcxr then says what it always said about them.
    pub fn annotations(&mut self, ctx: &EarlierCells, cell: &str) -> Result<Vec<Annotation>> {
        let offset = self.set_source(ctx, cell)?;
        let db = self.host.raw_database();
        let sema = Semantics::new(db);
        let file = sema.parse(ra_ap_base_db::EditionedFileId::new(db, self.cell_file, EDITION));
        let mut out = Vec::new();
        ra_ap_hir::attach_db(db, || {
            let Some(wrapper) = file.items().find_map(|i| match i {
                ast::Item::Fn(f) if f.name().is_some_and(|n| n.text() == WRAPPER) => Some(f),
                _ => None,
            }) else {
                return;
            };
            let Some(module) = sema.scope(wrapper.syntax()).map(|s| s.module()) else { return };
            for stmt in wrapper.body().into_iter().flat_map(|b| b.statements().collect::<Vec<_>>()) {
                let ast::Stmt::LetStmt(l) = stmt else { continue };
                let (Some(pat), Some(_), Some(semi)) = (l.pat(), l.initializer(), l.semicolon_token()) else { continue };
                let end = usize::from(semi.text_range().end());
                if end <= offset || end > offset + cell.len() {
                    continue;
                }
                let (mut text, mut variables) = (String::new(), 0);
                let binds: Vec<ast::IdentPat> = match &pat {
                    ast::Pat::IdentPat(p) => vec![p.clone()],
                    _ => pat.syntax().descendants().filter_map(ast::IdentPat::cast).collect(),
                };
                for bind in binds {
                    let Some(name) = bind.name() else { continue };
                    if bind.at_token().is_some() || sema.resolve_bind_pat_to_const(&bind).is_some() {
                        continue;
                    }
                    let ty = if binds_whole(&pat, &bind) { sema.type_of_pat(&pat).map(|t| t.original()) } else { sema.type_of_binding_in_pat(&bind) };
                    let Some(ty) = ty.filter(|t| !t.is_closure()) else { continue };
                    let Ok(name_of_ty) = ty.display_source_code(db, module.into(), true) else { continue };
                    if !nameable(&name_of_ty) {
                        continue;
                    }
                    let m = if bind.mut_token().is_some() { "mut " } else { "" };
                    let n = name.text();
                    text.push_str(&format!(" let {m}{n}: {name_of_ty} = {n};"));
                    variables += 1;
                }
                if !text.is_empty() {
                    out.push(Annotation { at: end - offset, text, variables });
                }
            }
        });
        Ok(out)
    }

    /// Completions at byte `pos` of `cell`: (start, end, candidates as (code, kind)).
    pub fn completions(&mut self, ctx: &EarlierCells, cell: &str, pos: usize) -> Result<Completions> {
        let offset = self.set_source(ctx, cell)?;
        let config = completion_config();
        let position = FilePosition { file_id: self.cell_file, offset: ((offset + pos) as u32).into() };
        let items = self.host.analysis().completions(&config, position, None).map_err(|_| anyhow!("the analysis was cancelled"))?.unwrap_or_default();
        let text = self.host.analysis().file_text(self.cell_file).map_err(|_| anyhow!("the analysis was cancelled"))?;
        let mut range: Option<TextRange> = None;
        let mut out = Vec::new();
        for item in items {
            let mut edits = item.text_edit.iter();
            let Some(edit) = edits.next() else { continue };
            if edits.next().is_some() || range.is_some_and(|r| r != edit.delete) {
                continue;
            }
            let deleted = &text[edit.delete];
            if !item.lookup().starts_with(deleted) {
                continue;
            }
            let code = without_snippet_placeholders(&edit.insert);
            if GENERATED.contains(&code.as_str()) {
                continue;
            }
            range = Some(edit.delete);
            out.push((code, completion_kind(item.kind).to_string()));
        }
        let (start, end) = match range {
            Some(r) => (usize::from(r.start()).saturating_sub(offset), usize::from(r.end()).saturating_sub(offset)),
            None => (pos, pos),
        };
        Ok((start.min(cell.len()), end.min(cell.len()), out))
    }

    /// Documentation of what ends at byte `pos` of `cell` (plain text, markdown), as evcxr looks
    /// it up: the code up to the cursor, completed to a statement.
    pub fn hover(&mut self, ctx: &EarlierCells, cell: &str, pos: usize) -> Result<Option<(String, String)>> {
        let upto = &cell[..pos];
        let (code, at) = if upto.ends_with('(') { (format!("{upto});"), pos - 1) } else { (format!("{upto};"), pos) };
        let offset = self.set_source(ctx, &code)?;
        let at = ((offset + at) as u32).into();
        let range = ra_ap_ide::FileRange { file_id: self.cell_file, range: TextRange::new(at, at) };
        let mut found = Vec::new();
        for format in [ra_ap_ide::HoverDocFormat::PlainText, ra_ap_ide::HoverDocFormat::Markdown] {
            let r = self.host.analysis().hover(&hover_config(format), range).map_err(|_| anyhow!("the analysis was cancelled"))?;
            found.push(r.map(|r| r.info.markup.to_string()));
        }
        Ok(match (found.remove(0), found.remove(0)) {
            (Some(plain), Some(md)) => Some((plain, md)),
            _ => None,
        })
    }
}

/// How the files of a crate graph are given to rust-analyzer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// The cell's `src/` local, everything else library (high durability): this module's layout.
    CellLocal,
    /// Every file local, as evcxr gives them (for measurements: `examples/ra_durability.rs`).
    AllLocal,
}

/// The cell crate in `dir` (its `src/lib.rs`), its dependencies and the standard library, loaded
/// into a rust-analyzer database; returns it and the cell file's id.
pub fn load_host(dir: &AbsPathBuf, roots: Roots) -> Result<(AnalysisHost, FileId)> {
    let manifest = ProjectManifest::from_manifest_file(dir.join("Cargo.toml"))?;
    let mut extra_env = FxHashMap::default();
    extra_env.insert(crate::racargo::FULL_GRAPH_ENV.to_string(), Some("1".to_string()));
    let config = CargoConfig { sysroot: Some(RustLibSource::Discover), extra_env, ..CargoConfig::default() };
    let workspace = ProjectWorkspace::load(manifest, &config, &|_| {})?;
    let (sender, receiver) = crossbeam_channel::unbounded();
    let mut loader = ra_ap_vfs_notify::NotifyHandle::spawn(sender);
    let load = workspace
        .to_roots()
        .iter()
        .map(|r| loader::Entry::Directories(loader::Directories { extensions: vec!["rs".into()], include: r.include.clone(), exclude: r.exclude.clone() }))
        .collect();
    loader.set_config(loader::Config { version: 1, load, watch: vec![] });
    let mut vfs = Vfs::default();
    let cell_path: VfsPath = dir.join("src/lib.rs").into();
    // The cell's file may not exist yet; the loader only reports files it found.
    vfs.set_file_contents(cell_path.clone(), Some(Vec::new()));
    for message in &receiver {
        match message {
            loader::Message::Progress { n_done: LoadingProgress::Finished, .. } => break,
            loader::Message::Progress { .. } => {}
            loader::Message::Loaded { files } | loader::Message::Changed { files } => {
                for (path, contents) in files {
                    vfs.set_file_contents(path.to_path_buf().into(), contents);
                }
            }
        }
    }
    let (cell_file, _) = vfs.file_id(&cell_path).ok_or_else(|| anyhow!("{cell_path} was not loaded"))?;
    let mut change = ra_ap_hir::ChangeWithProcMacros::default();
    for (file_id, changed) in vfs.take_changes() {
        let text = match changed.change {
            ra_ap_vfs::Change::Create(v, _) | ra_ap_vfs::Change::Modify(v, _) => String::from_utf8(v).ok(),
            ra_ap_vfs::Change::Delete => None,
        };
        change.change_file(file_id, text);
    }
    let mut sets = FileSetConfig::builder();
    sets.add_file_set(vec![VfsPath::from(dir.join("src"))]);
    let roots = sets
        .build()
        .partition(&vfs)
        .into_iter()
        .enumerate()
        .map(|(i, set)| if i == 0 || roots == Roots::AllLocal { SourceRoot::new_local(set) } else { SourceRoot::new_library(set) })
        .collect();
    change.set_roots(roots);
    let (graph, _) = workspace.to_crate_graph(&mut |path| vfs.file_id(&path.to_path_buf().into()).map(|(id, _)| id), &FxHashMap::default());
    change.set_crate_graph(graph);
    let mut host = AnalysisHost::default();
    host.apply_change(change);
    Ok((host, cell_file))
}

/// True when `bind` is the whole of `pat` (`let x = ..` or `let mut x = ..`).
fn binds_whole(pat: &ast::Pat, bind: &ast::IdentPat) -> bool {
    matches!(pat, ast::Pat::IdentPat(p) if p == bind)
}

/// A type rust-analyzer named that can be written in a `let`: it parses as a type, and holds no
/// placeholder, no inferred part and no `impl Trait`.
fn nameable(ty: &str) -> bool {
    if ty.contains("{unknown}") || ty.contains('{') {
        return false;
    }
    let parsed = ast::SourceFile::parse(&format!("type T = {ty};"), EDITION);
    parsed.errors().is_empty()
        && !parsed
            .syntax_node()
            .descendants()
            .any(|n| matches!(n.kind(), SyntaxKind::ERROR | SyntaxKind::INFER_TYPE | SyntaxKind::IMPL_TRAIT_TYPE))
}

/// The cell with evcxr's command lines (`:dep ...`) blanked, so offsets stay those of the cell.
fn without_commands(cell: &str) -> String {
    cell.split_inclusive('\n')
        .map(|line| if line.trim_start().starts_with(':') { line.chars().map(|c| if c == '\n' { c } else { ' ' }).collect() } else { line.to_string() })
        .collect()
}

/// A completion's snippet as plain code: `${1:name}` becomes `name`, `$0` goes.
fn without_snippet_placeholders(snippet: &str) -> String {
    let mut out = String::with_capacity(snippet.len());
    let mut rest = snippet;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(inner) = tail.strip_prefix('{').and_then(|t| t.find('}').map(|j| &t[..j])) {
            // `${N:text}` or `${N}`
            if let Some((n, text)) = inner.split_once(':').filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit())) {
                let _ = n;
                out.push_str(text);
                rest = &tail[inner.len() + 2..];
                continue;
            }
            if inner.chars().all(|c| c.is_ascii_digit()) {
                rest = &tail[inner.len() + 2..];
                continue;
            }
        }
        let digits = tail.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 {
            rest = &tail[digits..];
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

fn completion_kind(kind: ra_ap_ide::CompletionItemKind) -> &'static str {
    use ra_ap_ide::CompletionItemKind as K;
    use ra_ap_ide_db::SymbolKind as S;
    match kind {
        K::SymbolKind(S::Function | S::Method) => "function",
        K::SymbolKind(S::Struct | S::Enum | S::Union | S::Trait | S::TypeAlias | S::TypeParam | S::SelfType) => "class",
        K::SymbolKind(S::Module | S::CrateRoot | S::ToolModule) => "module",
        K::SymbolKind(S::Macro | S::ProcMacro | S::Derive | S::DeriveHelper | S::Attribute | S::BuiltinAttr) => "function",
        K::Keyword => "keyword",
        K::Snippet => "snippet",
        _ => "instance",
    }
}

fn completion_config<'a>() -> ra_ap_ide::CompletionConfig<'a> {
    use ra_ap_ide_db::imports::insert_use::{ImportGranularity, InsertUseConfig};
    ra_ap_ide::CompletionConfig {
        enable_postfix_completions: true,
        enable_imports_on_the_fly: false,
        enable_self_on_the_fly: true,
        enable_private_editable: true,
        enable_term_search: true,
        term_search_fuel: 400,
        full_function_signatures: true,
        callable: Some(ra_ap_ide::CallableSnippets::FillArguments),
        add_semicolon_to_unit: true,
        snippet_cap: ra_ap_ide_db::SnippetCap::new(true),
        insert_use: InsertUseConfig {
            granularity: ImportGranularity::Item,
            enforce_granularity: false,
            prefix_kind: ra_ap_hir::PrefixKind::ByCrate,
            group: false,
            skip_glob_imports: false,
        },
        prefer_no_std: false,
        prefer_prelude: false,
        prefer_absolute: false,
        snippets: vec![],
        limit: None,
        fields_to_resolve: ra_ap_ide::CompletionFieldsToResolve::empty(),
        exclude_flyimport: vec![],
        exclude_traits: &[],
        enable_auto_iter: true,
        enable_auto_await: true,
        ra_fixture: ra_ap_ide::RaFixtureConfig::default(),
        add_colons_to_module: true,
    }
}

fn hover_config<'a>(format: ra_ap_ide::HoverDocFormat) -> ra_ap_ide::HoverConfig<'a> {
    ra_ap_ide::HoverConfig {
        links_in_hover: true,
        memory_layout: None,
        documentation: true,
        keywords: true,
        format,
        max_trait_assoc_items_count: None,
        max_fields_count: Some(5),
        max_enum_variants_count: Some(5),
        max_subst_ty_len: ra_ap_ide::SubstTyLen::Unlimited,
        show_drop_glue: false,
        ra_fixture: ra_ap_ide::RaFixtureConfig::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_go_in_after_their_let() {
        let cell = "let x = f();\nlet (a, b) = g(); // pair\nx";
        let at = cell.find("; //").unwrap() + 1;
        let a = [Annotation { at: 12, text: " let x: T = x;".into(), variables: 1 }, Annotation { at, text: " let a: A = a; let b: B = b;".into(), variables: 2 }];
        assert_eq!(annotated(cell, &a), "let x = f(); let x: T = x;\nlet (a, b) = g(); let a: A = a; let b: B = b; // pair\nx");
        assert_eq!(annotated(cell, &[]), cell);
    }

    #[test]
    fn earlier_items_leave_out_what_evcxr_generates() {
        let last = "#![allow(unused_imports)]\nuse pivot::prelude::*;\nstruct EvcxrUserCodeError {}\nimpl<T: std::fmt::Display> From<T> for EvcxrUserCodeError { fn from(_: T) -> Self { EvcxrUserCodeError {} } }\nmod evcxr_internal_runtime { pub fn x() {} }\nfn helper() -> u8 { 1 }\nstruct Point { x: f32 }\nimpl Point { fn norm(&self) -> f32 { self.x } }\n#[unsafe(no_mangle)]\npub extern \"C\" fn run_user_code_7(x: *mut u8) -> *mut u8 { x }\n";
        let ctx = EarlierCells::from_last_source(last, vec![("lr".into(), "f64".into())]);
        assert_eq!(ctx.items, "use pivot::prelude::*;\nfn helper() -> u8 { 1 }\nstruct Point { x: f32 }\nimpl Point { fn norm(&self) -> f32 { self.x } }\n");
        assert_eq!(ctx.variables, vec![("lr".to_string(), "f64".to_string())]);
    }

    #[test]
    fn only_writable_types_are_nameable() {
        assert!(nameable("Vec<(Tensor, f64)>"));
        assert!(nameable("Box<dyn Fn(i32) -> i32>"));
        assert!(nameable("&'static str"));
        assert!(!nameable("{unknown}"));
        assert!(!nameable("Vec<{unknown}>"));
        assert!(!nameable("impl Iterator<Item = u8>"));
        assert!(!nameable("Vec<_>"));
        assert!(!nameable("{closure#0}"));
    }

    #[test]
    fn commands_are_blanked_in_place() {
        let cell = ":dep regex = \"1\"\nlet x = 1;\n  :vars\n";
        let blanked = without_commands(cell);
        assert_eq!(blanked.len(), cell.len());
        assert_eq!(blanked.lines().map(str::trim).collect::<Vec<_>>(), ["", "let x = 1;", ""]);
    }

    #[test]
    fn snippets_become_code() {
        assert_eq!(without_snippet_placeholders("ones(${1:size}, ${2:options})$0"), "ones(size, options)");
        assert_eq!(without_snippet_placeholders("push(${1})$0"), "push()");
        assert_eq!(without_snippet_placeholders("cost_$5"), "cost_");
        assert_eq!(without_snippet_placeholders("a$b"), "a$b");
    }

    /// rust-analyzer over a real crate graph: a cell crate with a path dependency, the standard
    /// library from the toolchain.
    #[test]
    fn names_the_types_of_a_cells_lets_over_its_dependencies() {
        let root = std::env::temp_dir().join(format!("pivot-analysis-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (dep, cell) = (root.join("dep"), root.join("cell"));
        std::fs::create_dir_all(dep.join("src")).unwrap();
        std::fs::create_dir_all(cell.join("src")).unwrap();
        std::fs::write(dep.join("Cargo.toml"), "[package]\nname = \"dep\"\nversion = \"0.1.0\"\nedition = \"2021\"\n").unwrap();
        std::fs::write(
            dep.join("src/lib.rs"),
            "pub mod prelude {\n    /// A model.\n    pub struct Model { pub w: Vec<f32> }\n    impl Model {\n        pub fn new() -> Model { Model { w: vec![] } }\n        pub fn pair(&self) -> (Model, u8) { (Model::new(), 1) }\n        pub fn width(&self) -> usize { self.w.len() }\n    }\n}\n",
        )
        .unwrap();
        std::fs::write(cell.join("Cargo.toml"), "[package]\nname = \"ctx\"\nversion = \"1.0.0\"\nedition = \"2024\"\n\n[dependencies]\ndep = { path = \"../dep\" }\n").unwrap();
        std::fs::write(cell.join("src/lib.rs"), "").unwrap();
        let mut a = CellAnalysis::load(&cell).expect("loads");
        let last = "#![allow(unused)]\nuse dep::prelude::*;\nmod evcxr_internal_runtime {}\nfn helper() -> i64 { 1 }\n";
        let earlier = EarlierCells::from_last_source(last, vec![("lr".into(), "f64".into())]);
        let cell_text = ":vars\nlet m = Model::new();\nlet (a, n) = m.pair(); // both\nlet mut v = Vec::new(); v.push(n);\nlet f = |x: u8| x + 1;\nlet None = Some(1).filter(|_| false) else { panic!() };\nlet k;\nk = 1;\nlet s = lr * 2.0 + helper() as f64;\n{ let inner = 1; }\nm.width()";
        let anns = a.annotations(&earlier, cell_text).unwrap();
        let after = |needle: &str| cell_text.find(needle).unwrap() + needle.len();
        assert_eq!(
            anns,
            vec![
                Annotation { at: after("Model::new();"), text: " let m: Model = m;".into(), variables: 1 },
                Annotation { at: after("m.pair();"), text: " let a: Model = a; let n: u8 = n;".into(), variables: 2 },
                Annotation { at: after("Vec::new();"), text: " let mut v: Vec<u8> = v;".into(), variables: 1 },
                Annotation { at: after("as f64;"), text: " let s: f64 = s;".into(), variables: 1 },
            ]
        );
        let earlier = EarlierCells::from_last_source(last, vec![("lr".into(), "f64".into()), ("m".into(), "Model".into())]);
        let (start, end, found) = a.completions(&earlier, "m.wi", 4).unwrap();
        assert_eq!((start, end), (2, 4));
        assert!(found.iter().any(|(code, kind)| code.starts_with("width") && kind == "function"), "{found:?}");
        let (_, _, found) = a.completions(&earlier, "Mod", 3).unwrap();
        assert!(found.iter().any(|(code, _)| code == "Model"), "{found:?}");
        assert!(!found.iter().any(|(code, _)| GENERATED.contains(&code.as_str())));
        let (plain, _) = a.hover(&earlier, "Model", 5).unwrap().expect("hover finds the struct");
        assert!(plain.contains("A model."), "{plain}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
