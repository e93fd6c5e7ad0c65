"""papermill executes a Rust notebook on the real "pivot" kernel with injected parameters.

The notebook's parameters cell declares types; the values given to papermill are chosen so that a
wrongly typed injection does not compile (an `i32` where `vec![0; n]` wants a `usize`, an integer
where `lr * 2.0` wants an `f64`), and the notebook writes what it saw into `out_dir`, which must be
the injected folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

# Installed by `make papermill` (tools/papermill_rust): a missing package fails the suite, never skips it.
import papermill  # noqa: E402
import papermill_rust  # noqa: E402,F401

STARTUP_TIMEOUT = int(os.environ.get("PIVOT_TEST_STARTUP_TIMEOUT", "1500"))

PARAMS = """\
// Parameters
let steps: usize = 3;
let lr: f64 = 0.5;
let label = String::from("default");
let out_dir = String::from("out/default");   // relative to the kernel's cwd
let verbose: bool = false;
let widths: Vec<u32> = vec![1];
let limit: Option<u64> = Some(7);
"""

USE = """\
let buf: Vec<u8> = vec![0u8; steps];          // needs a usize
let scaled: f64 = lr * 2.0;                   // needs an f64
let total: u32 = widths.iter().sum();
let report = format!("steps={} scaled={:?} label={} verbose={} total={} limit={:?}", buf.len(), scaled, label, verbose, total, limit);
std::fs::create_dir_all(&out_dir)?;
std::fs::write(format!("{out_dir}/seen.txt"), &report)?;
println!("{report}");
"""


def make_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pivot", "display_name": "Rust (PIVOT)", "language": "rust"}
    nb.metadata["language_info"] = {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"}
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# papermill on Rust"), params, nbformat.v4.new_code_cell(USE)]
    nbformat.write(nb, path)


def test_papermill_executes_with_typed_injected_parameters(tmp_path, jupyter_path):
    src, dst = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    make_notebook(src)
    out_dir = tmp_path / "injected out"
    label = 'q "x" \\ é 🦀 {braces}'
    nb = papermill.execute_notebook(
        str(src),
        str(dst),
        parameters={"steps": 20, "lr": 1, "label": label, "out_dir": str(out_dir), "verbose": True, "widths": [2, 3], "limit": None},
        cwd=str(tmp_path),
        start_timeout=STARTUP_TIMEOUT,
        execution_timeout=STARTUP_TIMEOUT,
        progress_bar=False,
    )
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert injected.source.splitlines()[1:] == [
        "let steps: usize = 20;",
        "let lr: f64 = 1.0;",
        'let label: String = String::from("q \\"x\\" \\\\ é 🦀 {braces}");',
        f'let out_dir: String = String::from("{out_dir}");',
        "let verbose: bool = true;",
        "let widths: Vec<u32> = vec![2, 3];",
        "let limit: Option<u64> = None;",
    ]
    want = f"steps=20 scaled=2.0 label={label} verbose=true total=5 limit=None"
    # The notebook ran with the injected values: the file is in the injected folder, not out/default.
    assert (out_dir / "seen.txt").read_text(encoding="utf-8") == want
    assert not (tmp_path / "out" / "default").exists()
    assert want in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert nbformat.read(dst, as_version=4).metadata["papermill"]["parameters"]["steps"] == 20
