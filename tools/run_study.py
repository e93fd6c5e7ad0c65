#!/usr/bin/env python3
"""Runs the whole study: every notebooks/[0-9][0-9]_*.ipynb, in order, on the "pivot" kernel, in
one output folder, then an HTML report. This is what `make demo` runs.

    python tools/run_study.py [--out out/study] [-p NAME=RUST_EXPR]... [--force] [--only 03]

Every notebook gets `out_dir` = the output folder (a `String::from("...")` injected after its
`parameters` cell, as tests/notebooks and papermill do), so later notebooks load the checkpoints
that earlier ones wrote there (02's base MLLM, 03's SFT and DPO models, ...). The kernel runs in
the output folder too. For each notebook the folder gets:

    NN_name.ipynb   the executed notebook (saved after every cell, so a long run can be watched)
    NN_name.html    `jupyter nbconvert --to html` of it, images embedded
and at the end index.html, which links the notebooks in order with their status and run time and
shows the study's table and forest plot (09 writes them: study_table.html). The last lines printed
are that table as text (study_table.txt), so `make demo` ends with the verdicts.

Resumable: a notebook whose executed copy is complete, error-free and made from the same source
and parameters is skipped, until one notebook has to run: every notebook after it runs again
(it may read what that one rewrote). --force runs them all.

A failing cell stops the run: the message names the notebook and the cell, the executed copy
keeps the error, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
KERNEL = "pivot"
META = "pivot_study"  # notebook metadata key holding the run's provenance
STUDY_TXT = "study_table.txt"  # 09's StudyTable as text: printed at the end of a run
STUDY_HTML = "study_table.html"  # 09's StudyTable as HTML with the forest plot: shown in index.html


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def declared_types(nb) -> dict[str, str]:
    """Each parameter's type as its notebook's `parameters` cell declares it (`let n_seeds: usize = 8;`
    gives usize), where it can be written as a `let` annotation; parsed as papermill's translator does."""
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return {}
    try:
        from papermill_rust.translator import _annotation, parse_parameters
    except ImportError:  # run from a checkout before `make papermill`: the package is beside this file
        sys.path.insert(0, str(ROOT / "tools" / "papermill_rust"))
        from papermill_rust.translator import _annotation, parse_parameters
    return {d.name: a for d in parse_parameters(cell.source) if (a := _annotation(d.type))}


def inject(nb, params: dict[str, str]) -> None:
    """papermill-style: a cell tagged `injected-parameters` right after the `parameters` cell. Each
    value is Rust source, annotated with the type its `parameters` cell declares, so `-p n_seeds=24`
    stays the `usize` the notebook's later cells use (unannotated, Rust would make it an i32)."""
    types = declared_types(nb)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_code_cell("".join(f"let {k}: {types[k]} = {v};\n" if k in types else f"let {k} = {v};\n" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), 0)
    nb.cells.insert(at, cell)


def rust_string(s: str) -> str:
    return "String::from(" + json.dumps(s, ensure_ascii=False) + ")"


def title_of(nb, fallback: str) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m:
                return m.group(1).strip()
    return fallback


def first_line(src: str) -> str:
    for line in src.splitlines():
        if line.strip() and not line.strip().startswith("//"):
            return line.strip()[:120]
    return src.strip().splitlines()[0][:120] if src.strip() else "(empty)"


def error_of(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return None


def is_complete(path: Path, source_sha: str, params: dict[str, str]) -> bool:
    """The executed copy at `path` ran every code cell of this source with these parameters."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:
        return False
    meta = nb.metadata.get(META, {})
    if meta.get("status") != "ok" or meta.get("source_sha1") != source_sha or meta.get("params") != params:
        return False
    code = [c for c in nb.cells if c.cell_type == "code"]
    return all(c.execution_count is not None and error_of(c) is None for c in code)


class StudyFailure(Exception):
    pass


def prestart_engine(out: Path, timeout: int) -> None:
    """With PIVOT_SPARE_ENGINE=1 (`make demo`), starts the first notebook's engine before it: a
    spare engine (`pivot-kernel spare --detach`) in the environment and working directory its
    kernel will have, so that kernel adopts a ready engine (engine/src/spare.rs); every later
    notebook's kernel adopts the engine its predecessor left. Without it the first kernel starts
    its own engine (~40 s, most of it rust-analyzer loading the prelude's crate graph) after the
    notebook began. A failure here only costs that: the notebook starts its engine itself."""
    if os.environ.get("PIVOT_SPARE_ENGINE") != "1":
        return
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    env = {**os.environ, **(spec.env or {})}
    cmd = [spec.argv[0], "spare", "--detach", "--timeout", str(timeout)]
    t0 = time.monotonic()
    log("starting the first notebook's engine (a spare engine its kernel adopts)")
    r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"  the engine could not be pre-started (exit {r.returncode}); the first notebook starts its own:\n{r.stderr[-2000:]}")
        return
    log(f"  engine ready in {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")


class Runner:
    def __init__(self, out: Path, params: dict[str, str], timeout: int, startup_timeout: int):
        self.out = out
        self.params = params
        self.timeout = timeout
        self.startup_timeout = startup_timeout

    def run(self, src: Path, dst: Path, source_sha: str) -> float:
        nb = nbformat.read(src, as_version=4)
        inject(nb, self.params)
        nb.metadata[META] = {"source": src.name, "source_sha1": source_sha, "params": self.params, "status": "running",
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        code_idx = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        n_code = len(code_idx)
        state = {"cell": None, "t0": time.monotonic(), "t_cell": time.monotonic()}

        def save():
            nbformat.write(nb, dst)

        def on_cell_start(cell, cell_index, **_):
            state["cell"], state["t_cell"] = cell_index, time.monotonic()

        def on_cell_executed(cell, cell_index, **_):
            k = code_idx.index(cell_index) + 1 if cell_index in code_idx else 0
            err = error_of(cell)
            log(f"  {src.stem} cell {k}/{n_code} {'FAILED' if err else 'done'} in {time.monotonic() - state['t_cell']:.1f} s  {first_line(cell.source)}")
            save()

        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            timeout=self.timeout,
            startup_timeout=self.startup_timeout,
            allow_errors=False,
            resources={"metadata": {"path": str(self.out)}},
            on_cell_start=on_cell_start,
            on_cell_executed=on_cell_executed,
        )
        failure = None
        try:
            client.execute()
        except CellExecutionError as e:
            failure = f"the cell raised {e.ename}: {e.evalue}"
        except CellTimeoutError:
            failure = f"the cell ran past the {self.timeout} s cell timeout (--timeout)"
        except DeadKernelError as e:
            failure = f"the kernel died: {e}"
        except Exception as e:  # kernel start-up failure, ZMQ trouble, ...
            failure = f"{type(e).__name__}: {e}"
        seconds = time.monotonic() - state["t0"]
        if failure is None:
            bad = [i for i in code_idx if error_of(nb.cells[i])]
            if bad:
                state["cell"], failure = bad[0], f"the cell has an error output: {error_of(nb.cells[bad[0]])}"
        nb.metadata[META].update(status="failed" if failure else "ok", seconds=round(seconds, 1),
                                 finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        save()
        if failure:
            i = state["cell"]
            where = "before its first cell (kernel start-up)"
            if i is not None:
                where = f"at cell {i + 1} of {len(nb.cells)} (code cell {code_idx.index(i) + 1} of {n_code}): {first_line(nb.cells[i].source)}"
            raise StudyFailure(f"{src.name} failed {where}\n    {failure}\n    the executed notebook, with the error, is {dst}")
        return seconds


def nbconvert(paths: list[Path], out: Path) -> None:
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--embed-images", "--output-dir", str(out), *map(str, paths)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise StudyFailure(f"jupyter nbconvert --to html failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    # Every figure of a notebook must be in its HTML as an embedded image, not a link.
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        n_png = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        page = (out / p.with_suffix(".html").name).read_text(encoding="utf-8")
        n_embedded = page.count('src="data:image/png;base64,')
        if n_embedded < n_png:
            raise StudyFailure(f"{p.with_suffix('.html').name}: {n_png} figures in the notebook, {n_embedded} embedded in the HTML")


def write_index(out: Path, rows: list[dict], params: dict[str, str], total: float) -> Path:
    items = []
    for r in rows:
        status = {"ok": "ran", "skipped": "up to date (reused)", "failed": "FAILED", "not run": "not run"}[r["status"]]
        links = f'<a href="{html.escape(r["html"])}">report</a> · <a href="{html.escape(r["ipynb"])}">notebook</a>' if r.get("html") else ""
        secs = f'{r["seconds"]:.0f} s' if r.get("seconds") is not None else ""
        items.append(
            f'<tr class="{r["status"].replace(" ", "-")}"><td>{html.escape(r["name"])}</td><td><a href="{html.escape(r.get("html") or "")}">'
            f'{html.escape(r["title"])}</a></td><td>{status}</td><td>{secs}</td><td>{r.get("figures", 0)}</td><td>{links}</td></tr>'
        )
    saved = []
    for f in sorted(out.iterdir()):
        if f.name == "index.html" or (f.suffix in (".ipynb", ".html") and re.match(r"\d\d_", f.name)):
            continue
        label = f.name + ("/" if f.is_dir() else "")
        saved.append(f'<a href="{html.escape(f.name)}">{html.escape(label)}</a>')
    saved_html = f"<p>Files the notebooks saved here (checkpoints, CSVs, figures): {' · '.join(saved)}</p>" if saved else ""
    # 09's statistics: the StudyTable as HTML with its forest plot (images embedded).
    table = out / STUDY_HTML
    study_html = f"<h2>DPO − SFT: the study's table</h2>\n{table.read_text(encoding='utf-8')}" if table.is_file() else ""
    param_list = "".join(f"<li><code>{html.escape(k)} = {html.escape(v)}</code></li>" for k, v in params.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PIVOT Lab study report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ text-align: left; padding: .4em .6em; border-bottom: 1px solid #ddd; }}
tr.failed td {{ background: #fde8e8; }} code {{ background: #f4f4f4; padding: 0 .2em; }}
</style></head><body>
<h1>PIVOT Lab: the study</h1>
<p>Reproducing <i>RL makes MLLMs see better than SFT</i> (Song et al., arXiv 2510.16333) on the embedded
ShapesWorld data. The notebooks ran in this order, in this folder, sharing their checkpoints.</p>
<table><thead><tr><th>#</th><th>notebook</th><th>status</th><th>time</th><th>figures</th><th></th></tr></thead>
<tbody>
{chr(10).join(items)}
</tbody></table>
{study_html}
{saved_html}
<p>Parameters given to every notebook:</p><ul>{param_list}</ul>
<p>Generated {datetime.now().strftime("%Y-%m-%d %H:%M")} · total run time {total:.0f} s · <code>{html.escape(str(out))}</code></p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/study"), help="output folder (default out/study)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME=RUST_EXPR",
                    help="extra parameter for every notebook, a Rust expression: -p seed=3 -p 'device=cuda_if_available()'")
    ap.add_argument("--force", action="store_true", help="run every notebook, even those already done")
    ap.add_argument("--only", action="append", default=[], metavar="PREFIX",
                    help="run only notebooks whose name starts with this (repeatable); the others keep their last run")
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("PIVOT_STUDY_CELL_TIMEOUT", "7200")),
                    help="seconds one cell may run (default 7200)")
    ap.add_argument("--startup-timeout", type=int, default=1800, help="seconds to wait for the kernel (a cold build slot needs ~20 min)")
    ap.add_argument("--no-html", action="store_true", help="skip the HTML report")
    ap.add_argument("--notebooks", default=str(NB_DIR), help="folder of the NN_*.ipynb notebooks (default notebooks/)")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nb_dir = Path(args.notebooks)
    notebooks = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        log(f"no notebooks in {nb_dir}")
        return 1
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        log(f'the "{KERNEL}" kernel is not installed for {sys.executable}: run `make kernel` first')
        return 1

    params = {"out_dir": rust_string(str(out))}
    for kv in args.param:
        k, sep, v = kv.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k.strip()):
            log(f"-p wants NAME=RUST_EXPR, got {kv!r}")
            return 2
        params[k.strip()] = v
    log(f"{len(notebooks)} notebooks → {out}")
    runner = Runner(out, params, args.timeout, args.startup_timeout)
    rows: list[dict] = []
    t0 = time.monotonic()
    rerun_rest = args.force
    failure = None
    prestarted = False
    for src in notebooks:
        dst = out / src.name
        source_sha = sha1(src.read_bytes())
        title = title_of(nbformat.read(src, as_version=4), src.stem)
        row = {"name": src.stem.split("_")[0], "title": title, "ipynb": src.name}
        selected = not args.only or any(src.name.startswith(p) for p in args.only)
        if failure is not None:
            row["status"] = "not run"
        elif not selected or (not rerun_rest and is_complete(dst, source_sha, params)):
            if not dst.exists():
                log(f"{src.name}: not selected and never run")
                row["status"] = "not run"
            else:
                log(f"{src.name}: up to date, reusing {dst.name}" if selected else f"{src.name}: not selected, keeping its last run")
                row["status"] = "skipped"
                row["seconds"] = nbformat.read(dst, as_version=4).metadata.get(META, {}).get("seconds")
        else:
            if not prestarted:
                prestart_engine(out, args.startup_timeout)
                prestarted = True
            rerun_rest = True
            log(f"{src.name}: running ({title})")
            try:
                row["seconds"] = runner.run(src, dst, source_sha)
                row["status"] = "ok"
                log(f"{src.name}: done in {row['seconds']:.0f} s")
            except StudyFailure as e:
                row["status"], failure = "failed", str(e)
                row["seconds"] = nbformat.read(dst, as_version=4).metadata.get(META, {}).get("seconds") if dst.exists() else None
        rows.append(row)

    total = time.monotonic() - t0
    index = None
    done = [out / (r["ipynb"]) for r in rows if r["status"] in ("ok", "skipped", "failed")]
    if not args.no_html and done:
        log("writing the HTML report (jupyter nbconvert --to html)")
        try:
            nbconvert(done, out)
        except StudyFailure as e:
            failure = failure or str(e)
        for r in rows:
            p = out / r["ipynb"]
            if p in done and (out / p.with_suffix(".html").name).exists():
                r["html"] = p.with_suffix(".html").name
                nb = nbformat.read(p, as_version=4)
                r["figures"] = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        index = write_index(out, rows, params, total)
    if failure:
        print(f"\n[study] FAILED: {failure}", file=sys.stderr, flush=True)
        return 1
    print(f"\n[study] done in {total:.0f} s. Everything is in {out}:")
    for r in rows:
        status = {"ok": "ran", "skipped": "reused (up to date)"}.get(r["status"], r["status"])
        print(f"  {r['ipynb']:<28} {r.get('html', ''):<28} {status}")
    print("  beside them: the checkpoints (sub-folders), CSVs and PNGs the notebooks saved")
    if index is not None:
        print(f"  the report: {index}  (open it in a browser)")
    table = out / STUDY_TXT
    if table.is_file():
        print(f"\n{table.read_text(encoding='utf-8').rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
