"""tools/run_study.py (`make demo`) on two tiny notebooks and the real "pivot" kernel: a shared
`out_dir`, the HTML report with embedded figures, a failing cell that stops the run with the
notebook and cell named, and a re-run that reuses the notebook already done. As in `make demo`
(PIVOT_SPARE_ENGINE=1), the first notebook's engine is started before it (`pivot-kernel spare
--detach`) and its kernel adopts that engine."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from pivot_testing import SpareChain, built_binary

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tools" / "run_study.py"
import nbconvert  # noqa: E402,F401  (`make studydeps`: tools/requirements-study.txt)


def kernel_bin() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")


@pytest.fixture(scope="module")
def env():
    path = Path(tempfile.mkdtemp(prefix="pivot-study-jupyter-"))
    subprocess.run([str(kernel_bin()), "install", "--dir", str(path / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
    yield dict(os.environ, JUPYTER_PATH=str(path))
    shutil.rmtree(path, ignore_errors=True)


def notebook(path: Path, title: str, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pivot", "display_name": "Rust (PIVOT)", "language": "rust"}
    nb.metadata["language_info"] = {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"}
    params = nbformat.v4.new_code_cell('let out_dir = String::from("not/the/study/folder");')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}"), params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


WRITE = [
    'std::fs::write(format!("{out_dir}/from_01.txt"), "written by 01")?;',
    'let fig: Figure = curves("loss", "step", "loss", &[Series::from_values("train", &[2.0, 1.2, 0.9, 0.8])])?;\nfig',
]
READ = 'let got = std::fs::read_to_string(format!("{out_dir}/from_01.txt"))?;\nprintln!("02 read: {got}");'
# What 09 leaves for the report: its StudyTable as text and as HTML (a real one, on made-up numbers).
TABLE = """
let t = StudyTable::new(vec![PairedComparison::new("probe top-1", vec![0.31, 0.42, 0.50], vec![0.10, 0.21, 0.20])?], &StudyOptions::default())?;
std::fs::write(format!("{out_dir}/study_table.txt"), t.to_string())?;
std::fs::write(format!("{out_dir}/study_table.html"), t.to_html())?;
"""


def run(nb_dir: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "--notebooks", str(nb_dir), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)


def test_study_runs_in_order_reports_failures_and_resumes(tmp_path, env):
    nb_dir, out = tmp_path / "notebooks", tmp_path / "study out"
    nb_dir.mkdir()
    notebook(nb_dir / "01_write.ipynb", "Write", WRITE)
    notebook(nb_dir / "02_read.ipynb", "Read", [READ, 'assert_eq!(got.len(), 0, "checks fail here");', 'println!("not reached");'])

    chain = SpareChain(idle_s=300)
    env = {**env, **chain.env}
    try:
        check_runs(nb_dir, out, env)
    finally:
        chain.stop()


def check_runs(nb_dir: Path, out: Path, env: dict) -> None:
    r = run(nb_dir, out, env)
    log = r.stdout + r.stderr
    assert r.returncode == 1, log
    # The first notebook's kernel adopted the engine started before it (its own stderr is the runner's).
    started = re.search(r"engine ready in [0-9.]+ s: spare engine pid (\d+) started", log)
    assert started, log
    first = log.index("01_write.ipynb: running")
    assert log.index(started.group(0)) < first, log
    assert re.search(rf"handed .+? over to the spare engine pid {started.group(1)} \(", log[first:]), log
    assert "02_read.ipynb failed at cell 5 of 6 (code cell 4 of 5): assert_eq!(got.len(), 0" in log, log
    assert "checks fail here" in log, log
    # 01 wrote into the shared folder and 02 read it there (the injected out_dir, not the default).
    assert (out / "from_01.txt").read_text() == "written by 01"
    failed = nbformat.read(out / "02_read.ipynb", as_version=4)
    assert "02 read: written by 01" in str(failed.cells[3].outputs)
    assert any(o.get("output_type") == "error" for o in failed.cells[4].outputs)
    assert failed.metadata["pivot_study"]["status"] == "failed"
    page = (out / "01_write.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1
    index = (out / "index.html").read_text()
    assert index.index('href="01_write.html"') < index.index('href="02_read.html"')
    assert "FAILED" in index

    # Fix 02: the re-run reuses 01 (same source, same parameters) and runs 02 only.
    notebook(nb_dir / "02_read.ipynb", "Read", [READ, 'assert_eq!(got, "written by 01");', TABLE])
    r = run(nb_dir, out, env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "01_write.ipynb: up to date, reusing 01_write.ipynb" in log, log
    assert "02_read.ipynb: done" in log, log
    assert f"the report: {out / 'index.html'}" in log, log
    assert nbformat.read(out / "02_read.ipynb", as_version=4).metadata["pivot_study"]["status"] == "ok"
    # The run ends with the study's table in the terminal, and the report shows it.
    table = (out / "study_table.txt").read_text()
    assert "probe top-1" in table and "verdict" in table, table
    assert r.stdout.rstrip().endswith(table.rstrip()), r.stdout[-2000:]
    assert "Study: treatment − control per measure" in (out / "index.html").read_text()


def test_a_parameter_keeps_the_type_its_notebook_declares():
    """`-p n_seeds=24` on 09 (`let n_seeds: usize = 8;`) must stay a usize: an unannotated
    `let n_seeds = 24;` is an i32 and a later cell fails to compile (E0308)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_study", RUNNER)
    run_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_study)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('let n_seeds: usize = 8;   // paired seeds\nlet lr: f64 = 1e-3;\nlet device = Device::Cpu;\nlet name = String::from("a");')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("n_seeds * 2")]
    run_study.inject(nb, {"n_seeds": "24", "lr": "2e-4", "device": "Device::cuda_if_available()", "name": 'String::from("b")', "seed": "3"})
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and nb.cells.index(injected[0]) == 2
    assert injected[0].source.splitlines() == [
        "let n_seeds: usize = 24;",
        "let lr: f64 = 2e-4;",
        "let device = Device::cuda_if_available();",
        'let name: String = String::from("b");',
        "let seed = 3;",  # not a parameter of this notebook: no declared type
    ]
    # Injecting again replaces the cell rather than adding a second one.
    run_study.inject(nb, {"n_seeds": "4"})
    assert [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])] == ["let n_seeds: usize = 4;\n"]
