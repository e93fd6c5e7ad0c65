"""The papermill translator for Rust (tools/papermill_rust): literals, parameters-cell parsing,
registration through the installed entry points, and the emitted strings compiled by rustc."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

# Installed by `make papermill` (tools/papermill_rust): a missing package fails the suite, never skips it.
from papermill_rust import RustTranslator, codify_for_notebook, let_statement, parse_parameters, rust_literal, rust_string  # noqa: E402
from papermill_rust import RustTranslationError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

TRICKY = [
    "",
    "plain",
    'say "hi"',
    "back\\slash \\n not a newline",
    "C:\\temp\\new",
    "tab\there\nnewline\r\ncrlf",
    "nul\x00 bell\x07 esc\x1b del\x7f",
    "unicode: é ß 日本語 🦀 ∑",
    "line\u2028sep zero\u200bwidth",
    "{braces} and {{double}} and $dollar and 'single'",
    '\\"',
    'r#"raw"#',
]


# ---- literals -----------------------------------------------------------------------------


def test_strings_escape_quotes_backslashes_and_controls():
    assert rust_string('a"b') == r'"a\"b"'
    assert rust_string("a\\b") == r'"a\\b"'
    assert rust_string("a\nb\tc\rd") == r'"a\nb\tc\rd"'
    assert rust_string("\x00\x1b\x7f") == r'"\u{0}\u{1b}\u{7f}"'
    assert rust_string("é 日本 🦀") == '"é 日本 🦀"'  # printable Unicode stays readable
    assert rust_string("\u2028") == r'"\u{2028}"'
    with pytest.raises(RustTranslationError, match="surrogate"):
        rust_string("\ud800")


def test_untyped_values_get_their_own_literal():
    assert let_statement("out_dir", "/tmp/x") == 'let out_dir: String = String::from("/tmp/x");'
    assert let_statement("steps", 20) == "let steps = 20;"
    assert let_statement("lr", 0.001) == "let lr: f64 = 0.001;"
    assert let_statement("big", 1e20) == "let big: f64 = 1.0e20;"
    assert let_statement("small", 1e-5) == "let small: f64 = 1.0e-5;"
    assert let_statement("flag", True) == "let flag: bool = true;"
    assert let_statement("ids", [1, 2, 3]) == "let ids = vec![1, 2, 3];"
    assert let_statement("xs", [1, 2.5]) == "let xs: Vec<f64> = vec![1.0, 2.5];"
    assert let_statement("names", ["a", 'b"']) == 'let names: Vec<String> = vec![String::from("a"), String::from("b\\"")];'


def test_floats_always_have_a_decimal_point():
    for v, want in [(1.0, "1.0"), (3, "3.0"), (0.1, "0.1"), (1e-3, "0.001"), (2.5e-7, "2.5e-7"), (1e300, "1.0e300"), (-4.0, "-4.0")]:
        assert rust_literal("x", v, "f64") == want
    assert rust_literal("x", float("nan"), "f64") == "f64::NAN"
    assert rust_literal("x", float("-inf"), "f32") == "f32::NEG_INFINITY"
    assert rust_literal("x", "1e-3", "f64") == "0.001"


def test_declared_types_choose_the_literal():
    assert rust_literal("n", 20, "usize") == "20"
    assert rust_literal("n", 20.0, "u64") == "20"
    assert rust_literal("n", "1_000", "i64") == "1000"
    assert rust_literal("n", -3, "i64") == "-3"
    assert rust_literal("b", "True", "bool") == "true"
    assert rust_literal("s", 2024, "String") == 'String::from("2024")'
    assert rust_literal("s", "x", "&str") == '"x"'
    assert rust_literal("s", "x", "&'static str") == '"x"'
    assert rust_literal("p", "/a b", "PathBuf") == 'std::path::PathBuf::from("/a b")'
    assert rust_literal("c", "'", "char") == "'\\''"
    assert rust_literal("c", "é", "char") == "'é'"
    assert rust_literal("o", None, "Option<usize>") == "None"
    assert rust_literal("o", 5, "Option<usize>") == "Some(5)"
    assert rust_literal("v", [1, 2], "Vec<f64>") == "vec![1.0, 2.0]"
    assert rust_literal("v", [[1], []], "Vec<Vec<u8>>") == "vec![vec![1], vec![]]"
    assert rust_literal("v", ["a"], "Vec<Option<String>>") == 'vec![Some(String::from("a"))]'


@pytest.mark.parametrize(
    "value,rust_type,match",
    [
        (-1, "usize", "out of range"),
        (256, "u8", "out of range"),
        (2.5, "usize", "not an integer"),
        ("abc", "usize", "not an integer"),
        (True, "usize", "bool"),
        ("maybe", "bool", "not true or false"),
        ("ab", "char", "one character"),
        ("x", "f64", "not a number"),
        (None, "usize", "Option"),
        ("abc", "Vec<u8>", "give a list"),
        ([1, "a"], None, "mixes"),
        ([], None, "needs its type"),
        ({"a": 1}, None, "dict"),
        (None, None, "Rust has no null"),
    ],
)
def test_values_that_do_not_fit_are_clear_errors(value, rust_type, match):
    with pytest.raises(RustTranslationError, match=match):
        rust_literal("p", value, rust_type)


@pytest.mark.parametrize("name", ["2x", "a-b", "fn", "", "let x"])
def test_names_must_be_rust_identifiers(name):
    with pytest.raises(RustTranslationError, match="not a Rust identifier"):
        let_statement(name, 1)


# ---- the parameters cell ------------------------------------------------------------------

CELL = r"""
// Parameters: a header comment; "quotes" and ; inside comments do not split statements.
let seed: u64 = 0;
let device = Device::Cpu;          // `cuda_if_available()` on a GPU machine
let out_dir = String::from("out; not a split"); /* block ; */ // where things go
let tower_path = String::new();
let lr: f64 = 1e-3;
let steps = 6;
let big = 10_u64;
let ratio = 0.5;
let tags: Vec<String> = vec![String::from("a,b"), String::from("c")];
let sizes = vec![1.5, 2.0];
let limit: Option<usize> = None;
let mut name: &'static str = "x";
let fancy = if seed == 0 {
    String::from("zero")
} else { format!("{seed}") };
let ch = '\'';
"""


def test_parameters_cell_declared_and_inferred_types():
    got = {d.name: (d.type, d.expr) for d in parse_parameters(CELL)}
    assert got == {
        "seed": ("u64", False),
        "device": (None, True),
        "out_dir": ("String", False),
        "tower_path": ("String", False),
        "lr": ("f64", False),
        "steps": ("{integer}", False),
        "big": ("u64", False),
        "ratio": ("f64", False),
        "tags": ("Vec<String>", False),
        "sizes": ("Vec<f64>", False),
        "limit": ("Option<usize>", False),
        "name": ("&'static str", False),
        "fancy": (None, True),
        "ch": ("char", False),
    }
    helps = {d.name: d.help for d in parse_parameters(CELL)}
    assert helps["device"] == "`cuda_if_available()` on a GPU machine"
    assert helps["out_dir"] == "where things go"
    assert helps["seed"] == ""


def test_codify_follows_the_parameters_cell():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(CELL)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    src = codify_for_notebook(
        nb,
        {"seed": 7, "lr": 1, "steps": 20, "out_dir": '/tmp/a "b"', "device": "Device::Cuda(0)", "limit": None,
         "tags": ["x"], "sizes": [1, 2], "name": "n", "unknown": "u"},
    )
    assert src.splitlines() == [
        "// Parameters",
        "let seed: u64 = 7;",
        "let lr: f64 = 1.0;",
        "let steps = 20;",
        'let out_dir: String = String::from("/tmp/a \\"b\\"");',
        "let device = Device::Cuda(0);",
        "let limit: Option<usize> = None;",
        'let tags: Vec<String> = vec![String::from("x")];',
        "let sizes: Vec<f64> = vec![1.0, 2.0];",
        "let name: &'static str = \"n\";",
        'let unknown: String = String::from("u");',
    ]
    with pytest.raises(RustTranslationError, match="'seed' is u64"):
        codify_for_notebook(nb, {"seed": -1})


def test_inspect_then_codify_is_what_papermill_does():
    """papermill calls translator.inspect(parameters cell) right before codify(parameters)."""
    cell = nbformat.v4.new_code_cell("let steps: usize = 6;\nlet lr: f64 = 0.1; // learning rate\n")
    params = RustTranslator.inspect(cell)
    assert [(p.name, p.inferred_type_name, p.default, p.help) for p in params] == [
        ("steps", "usize", "6", ""), ("lr", "f64", "0.1", "learning rate")]
    assert RustTranslator.codify({"steps": 3, "lr": 2}) == "// Parameters\nlet steps: usize = 3;\nlet lr: f64 = 2.0;\n"
    # The declarations are used once: a later codify without inspect has no types.
    assert RustTranslator.codify({"steps": 3}) == "// Parameters\nlet steps = 3;\n"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_study_notebooks_parameters_are_understood(path):
    """Every parameter of the study notebooks has a known type or is an expression (device)."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    decls = parse_parameters(cell.source)
    names = [d.name for d in decls]
    assert {"seed", "device", "out_dir"} <= set(names), names
    assert len(names) == cell.source.count("\nlet ") + cell.source.startswith("let "), f"{path.name}: a `let` was missed"
    for d in decls:
        assert d.type is not None or d.expr, d
    assert {d.name: d.type for d in decls}["out_dir"] == "String"


# ---- registration -------------------------------------------------------------------------


def test_papermill_finds_the_translator_through_entry_points():
    """A fresh interpreter that imports only papermill gets our translator for kernel "pivot" and
    language "rust" (the installed package's entry points, not this test's import)."""
    code = (
        "import papermill.translators as t\n"
        "print(t.papermill_translators.find_translator('pivot', 'rust').__module__)\n"
        "print(t.papermill_translators.find_translator('evcxr', 'rust').__module__)\n"
    )
    for first in ("", "import papermill_rust\n"):  # either import order (papermill's entry point re-enters us)
        out = subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True, check=True).stdout.split()
        assert out == ["papermill_rust.translator", "papermill_rust.translator"], first


# ---- rustc: the literals compile to the same values ----------------------------------------


def test_string_literals_round_trip_through_rustc(tmp_path):
    rustc = shutil.which("rustc")
    if rustc is None:
        pytest.skip("rustc is not on PATH")
    body = "\n".join(f"    let s{i}: String = {rust_literal('s', s, 'String')};\n    out.push(s{i});" for i, s in enumerate(TRICKY))
    chars = "\n".join(f"    outc.push({rust_literal('c', c, 'char')});" for c in ["'", "\\", '"', "\n", "é", "🦀"])
    floats = "\n".join(f"    outf.push({rust_literal('f', f, 'f64')});" for f in [0.1, 1e-5, 3, 1e300, -2.5e-7])
    (tmp_path / "main.rs").write_text(
        "fn main() {\n    let mut out: Vec<String> = Vec::new();\n    let mut outc: Vec<char> = Vec::new();\n"
        "    let mut outf: Vec<f64> = Vec::new();\n"
        f"{body}\n{chars}\n{floats}\n"
        "    for s in &out { let h: Vec<String> = s.bytes().map(|b| format!(\"{:02x}\", b)).collect(); println!(\"s {}\", h.join(\"\")); }\n"
        "    for c in &outc { println!(\"c {:x}\", *c as u32); }\n"
        "    for f in &outf { println!(\"f {:e}\", f); }\n"
        "}\n",
        encoding="utf-8",
    )
    subprocess.run([rustc, "--edition", "2021", "-O", "-o", str(tmp_path / "rt"), str(tmp_path / "main.rs")], check=True, capture_output=True)
    lines = subprocess.run([str(tmp_path / "rt")], capture_output=True, text=True, check=True).stdout.splitlines()
    strings = [bytes.fromhex(l[2:]).decode("utf-8") for l in lines if l.startswith("s ")]
    assert strings == TRICKY
    assert [chr(int(l[2:], 16)) for l in lines if l.startswith("c ")] == ["'", "\\", '"', "\n", "é", "🦀"]
    assert [float(l[2:]) for l in lines if l.startswith("f ")] == [0.1, 1e-5, 3.0, 1e300, -2.5e-7]

