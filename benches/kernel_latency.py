#!/usr/bin/env python3
"""Kernel latency as a researcher feels it, through a real Jupyter client (jupyter_client).

    python benches/kernel_latency.py [--kernel-bin PATH] [--cells 50] [--out benches/results]

Measures, for the "pivot" kernel installed from the built binary into a private JUPYTER_PATH:
- start -> kernel_info reply (the client can talk to the kernel),
- warm start: start -> the first cell done, a parameters cell (`let lr = ...; let steps: usize = ...;
  let run_name = String::from(..);`, no result), with a warm build slot (the prelude compiled already),
- trivial cells `N * 2 + 1` (no `let`): p50 / p95 / max over --cells cells, after one warm-up cell,
- cells with a new `let` each, `let xN = N; xN + 1`, likewise,
- a tensor cell `Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).sum(Kind::Float)` likewise (--tensor-cells),
- CPU seconds per cell (user + system of the kernel process and everything it started: cargo,
  rustc, the linker, the evcxr child), which unlike wall time hardly depends on what else the
  machine runs, with the load average before and after.
Writes benches/results/kernel-latency-<label>-<time>.json with machine details. It reports; it never
fails on speed.

--spare (with our kernel, or with --repl) first starts a spare engine (`pivot-kernel spare`,
`pivot-repl --spare`) with the launch's configuration, waits until it is ready, then measures the
launch that adopts it; the start's CPU-s are then the spare's CPU from the launch to the first
result (the spare's own start, paid before, is reported apart as spare_start_s).

Stock `evcxr_jupyter` side by side (built outside the repository, e.g.
`cargo install evcxr_jupyter@0.22.0 --locked --root /tmp/stock-evcxr`):

    python benches/kernel_latency.py --stock-evcxr /tmp/stock-evcxr/bin/evcxr_jupyter            # no deps
    python benches/kernel_latency.py --stock-evcxr /tmp/stock-evcxr/bin/evcxr_jupyter --with-prelude \
        --stock-tmpdir /tmp/stock-slot   # our setup + `:dep pivot`, typed in as a user would

A change whose effect is smaller than the spread between two runs (often 10-15 % here) is measured
interleaved, in one run:

    python benches/kernel_latency.py --ab PIVOT_CELL_THINLTO=1 --cells 30 --tensor-cells 16

starts two of our kernels at once, A with the environment as it is and B with NAME=VALUE added, and
runs each cell on both, alternating which goes first (ABBA), so that whatever else the machine does
falls on both alike. It reports each side's p50 and, for each kind of cell, the paired difference
B - A: its median, a 95 % bootstrap interval of that median, and the Wilcoxon signed-rank test.

--with-prelude runs, as the first cell, the settings and `:dep` our kernel runs at start; with a copy of a
warm build slot as --stock-tmpdir (EVCXR_TMPDIR) the stock kernel finds the prelude compiled, as ours does.
Without the prelude there is no `Tensor`, so the tensor cells are skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client import KernelManager

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pivot_testing import Spare, built_binary, kernel_launch_env  # noqa: E402


TRIVIAL_CELL = "{i} * 2 + 1"
LET_CELL = "let x{i} = {i};\nx{i} + 1"
TENSOR_CELL = "Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).sum(Kind::Float)"
PARAMS_CELL = 'let lr = 3e-4;\nlet steps: usize = 20;\nlet run_name = String::from("warm-start");'


def run_cell(kc, code: str, timeout: float = 600.0, want_result: bool = True) -> float:
    t0 = time.perf_counter()
    msg_id = kc.execute(code, store_history=True)
    ok = None
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            raise RuntimeError(f"cell failed: {msg['content'].get('evalue')}")
        if msg["msg_type"] == "execute_result":
            ok = True
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    dt = time.perf_counter() - t0
    if want_result and not ok:
        raise RuntimeError(f"no result for {code!r}")
    return dt


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of `pid` and its live descendants, including their reaped children
    (Linux /proc; None elsewhere)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return None
    total, todo, seen = 0.0, [pid], 0
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        seen += 1
        total += sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
        # Children are listed under the thread that started them (evcxr starts rustc and its
        # child process from the kernel's engine thread).
        for t in tasks:
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                pass
    return total if seen else None


def stock_prelude_setup() -> tuple[str, dict[str, str]]:
    """The cell that gives a stock evcxr what our kernel sets up at start (engine/session.rs):
    the same fixed settings, the same torch-sys build environment (so a copied warm slot stays
    fresh), `:dep` on the prelude and its import; and the child's library path to libtorch."""
    py = os.environ.get("PIVOT_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    torch_dir = subprocess.run([py, "-c", "import torch,os;print(os.path.dirname(torch.__file__))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    path = os.environ.get("PATH", "")
    bin_dir = str(Path(py).parent)
    if path.split(":")[0] != bin_dir:
        path = f"{bin_dir}:{path}"
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    host = [l.split(": ", 1)[1] for l in subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines() if l.startswith("host: ")][0]
    ld = f"{torch_dir}/lib:{sysroot}/lib/rustlib/{host}/lib"
    setup = (":offline 1\n:opt 2\n:linker system\n:build_env LIBTORCH_USE_PYTORCH=1\n"
             f":build_env PATH={path}\n:dep pivot = {{ path = {json.dumps(str(ROOT / 'prelude'))} }}\nuse pivot::prelude::*;")
    return setup, {"LD_LIBRARY_PATH": ld, "PATH": path}


def install_our_kernel(kernel_bin: str | None) -> None:
    """Installs the "pivot" kernel of `kernel_bin` (default: the built one) into a private
    JUPYTER_PATH, where KernelManager finds it."""
    binary = Path(kernel_bin) if kernel_bin else built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")
    env_path = Path(tempfile.mkdtemp(prefix="pivot-latency-"))
    subprocess.run([str(binary), "install", "--dir", str(env_path / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
    os.environ["JUPYTER_PATH"] = str(env_path)


def machine(**extra) -> dict:
    """What a result file records of the machine and the code it measured."""
    return {
        "cpu_cores": os.cpu_count(),
        **extra,
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }


def write_results(out_dir: str, name: str, res: dict) -> None:
    """Writes `res` as OUT_DIR/NAME-<time>.json and says where."""
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"results: {path}")


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def repl_warm_start(binary: Path, out_dir: str, spare: bool = False, recycled: int = 0) -> None:
    """`pivot-repl SCRIPT` on a script whose first cell is the parameters cell: the REPL's own
    timing line gives engine start and start -> that cell done (PIVOT_REPL_TIMINGS=1; with a
    spare, from the handover). `recycled` > 0 (with a spare, PIVOT_SPARE_ENGINE=1): that many
    more launches follow back to back, each adopting the spare's engine recycled after the one
    before (a launch that comes before the recycling is done waits for it: counted)."""
    import re

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "params.rs"
        script.write_text(PARAMS_CELL + "\n// %%\nsteps * 2 + 1\n")
        env = dict(os.environ, PIVOT_REPL_TIMINGS="1", NO_COLOR="1")
        if recycled:
            env.update(PIVOT_SPARE_ENGINE="1", PIVOT_SPARE_WAIT_SECS="120")
        sp, spare_start = None, None
        if spare:
            t = time.perf_counter()
            sp = Spare([str(binary), "--spare"], env, cwd=tmp)
            spare_start = time.perf_counter() - t
        t0 = time.perf_counter()
        r = subprocess.run([str(binary), str(script)], capture_output=True, text=True, cwd=tmp, env=env, timeout=3600)
        wall = time.perf_counter() - t0
        again = []
        for _ in range(recycled if sp is not None else 0):
            t = time.perf_counter()
            ra = subprocess.run([str(binary), str(script)], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
            w = time.perf_counter() - t
            ma = re.search(r"first result ([0-9.]+) s", ra.stderr)
            if ra.returncode != 0 or not ma or f"adopted spare engine pid {sp.pid}" not in ra.stderr:
                raise RuntimeError(f"a launch after the first did not run on the recycled engine ({ra.returncode}):\n{ra.stderr}")
            again.append({"process_wall_s": w, "start_to_params_cell_done_s": float(ma.group(1))})
        if sp is not None:
            sp.stop()
    m = re.search(r"engine ready ([0-9.]+) s, first result ([0-9.]+) s", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pivot-repl failed ({r.returncode}):\n{r.stderr}")
    res = {"kernel": "pivot-repl" + ("-spare" if spare else ""), "engine_ready_s": float(m.group(1)), "start_to_params_cell_done_s": float(m.group(2)),
           "process_wall_s": wall, "spare_start_s": spare_start, "timing_lines": [l for l in r.stderr.splitlines() if "[timings]" in l],
           "recycled_launches": again, "machine": machine()}
    if again:
        res["kernel"] += "-recycled"
    print(f"{res['kernel']}: engine ready {res['engine_ready_s']:.2f} s, warm start to the parameters cell done "
          f"{res['start_to_params_cell_done_s']:.2f} s (whole script {wall:.2f} s)")
    if again:
        walls = [x["process_wall_s"] for x in again]
        firsts = [x["start_to_params_cell_done_s"] for x in again]
        print(f"  {len(again)} launches back to back on the recycled engine: whole script p50 {statistics.median(walls):.2f} s "
              f"(max {max(walls):.2f}), launch to the parameters cell done p50 {statistics.median(firsts):.2f} s (max {max(firsts):.2f})")
    write_results(out_dir, "repl-warm-start", res)


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """B - A cell by cell: the median difference, a 95 % percentile-bootstrap interval of that
    median (10,000 resamples of the pairs) and the two-sided Wilcoxon signed-rank test."""
    import numpy as np
    from scipy.stats import wilcoxon
    d = np.asarray(b) - np.asarray(a)
    rng = np.random.default_rng(seed)
    boot = np.median(d[rng.integers(0, len(d), size=(10_000, len(d)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "n": int(len(d)),
        "median_b_minus_a_s": float(np.median(d)),
        "ci95_s": [float(lo), float(hi)],
        "median_ratio_b_over_a": float(np.median(b) / np.median(a)),
        "wilcoxon_p": float(wilcoxon(d).pvalue),
    }


def ab_interleaved(a) -> None:
    """Two of our kernels, A (this environment) and B (plus --ab NAME=VALUE), started together
    and given the same cells alternately (ABBA order), so that slow phases of the machine fall on
    both; see the module's doc."""
    name, _, value = a.ab.partition("=")
    if not name or not _:
        raise SystemExit(f"--ab wants NAME=VALUE, got {a.ab!r}")
    install_our_kernel(a.kernel_bin)
    sides = {}
    for side, extra in (("A", {}), ("B", {name: value})):
        env = dict(os.environ)
        env["PIVOT_NO_SPARE"] = "1"  # each side starts its own engine, in its own build slot
        env.update(extra)
        km = KernelManager(kernel_name="pivot")
        km.start_kernel(env=env)
        kc = km.client()
        kc.start_channels()
        sides[side] = (km, kc)
    for side, (km, kc) in sides.items():
        kc.kernel_info()
        kc.get_shell_msg(timeout=600)
        run_cell(kc, PARAMS_CELL, timeout=3600, want_result=False)
    kinds = [("trivial", TRIVIAL_CELL, a.cells), ("let", LET_CELL, a.cells),
             ("tensor", TENSOR_CELL, a.tensor_cells)]
    times = {side: {k: [] for k, _, _ in kinds} for side in sides}
    for kind, cell, n in kinds:
        for side, (_, kc) in sides.items():
            run_cell(kc, cell.replace("{i}", "0"))  # warm-up, not counted
        for i in range(n):
            order = ("A", "B") if i % 4 in (0, 3) else ("B", "A")
            for side in order:
                times[side][kind].append(run_cell(sides[side][1], cell.replace("{i}", str(i + 1))))
    for km, kc in sides.values():
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    res = {"a": "environment as is", "b": a.ab, "cells": {}, "machine": machine()}
    print(f"A = environment as is, B = {a.ab}; cells interleaved ABBA")
    for kind, _, _ in kinds:
        ta, tb = times["A"][kind], times["B"][kind]
        diff = paired_difference(ta, tb)
        res["cells"][kind] = {"a_s": ta, "b_s": tb, "a_p50_s": statistics.median(ta), "b_p50_s": statistics.median(tb), **diff}
        lo, hi = diff["ci95_s"]
        print(f"{kind:8s} A p50 {statistics.median(ta):.3f} s, B p50 {statistics.median(tb):.3f} s; "
              f"B - A median {diff['median_b_minus_a_s']*1000:+.0f} ms (95 % CI {lo*1000:+.0f} .. {hi*1000:+.0f} ms), "
              f"B/A {diff['median_ratio_b_over_a']:.2f}, Wilcoxon p = {diff['wilcoxon_p']:.3g}; n={diff['n']}")
    write_results(a.out, f"kernel-latency-{a.label or 'ab-' + name.lower()}", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel-bin", default=None)
    ap.add_argument("--kernel-name", default="pivot")
    ap.add_argument("--cells", type=int, default=30, help="cells of each of the trivial and `let` kinds")
    ap.add_argument("--tensor-cells", type=int, default=10)
    ap.add_argument("--label", default=None, help="name for the result file (default: the kernel's)")
    ap.add_argument("--stock-evcxr", default=None, help="path of a stock evcxr_jupyter binary to measure instead of ours")
    ap.add_argument("--stock-tmpdir", default=None, help="EVCXR_TMPDIR for the stock kernel (a copy of a warm slot)")
    ap.add_argument("--with-prelude", action="store_true", help="stock kernel: first run our start-up settings and `:dep pivot`")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results"))
    ap.add_argument("--repl", default=None, help="measure the warm start of this pivot-repl binary instead")
    ap.add_argument("--spare", action="store_true", help="start a spare engine first and measure the launch that adopts it")
    ap.add_argument("--ab", default=None, metavar="NAME=VALUE", help="our kernel: interleave cells on two kernels, B with NAME=VALUE in its environment")
    ap.add_argument("--recycled", type=int, default=0, help="with --repl --spare: this many more launches back to back on the recycled engine")
    a = ap.parse_args()
    if a.repl:
        repl_warm_start(Path(a.repl), a.out, a.spare, a.recycled)
        return
    if a.ab:
        ab_interleaved(a)
        return

    env_path = None
    setup = None
    label = a.label or a.kernel_name
    if a.stock_evcxr:
        label = a.label or ("evcxr-stock" + ("-prelude" if a.with_prelude else ""))
        a.kernel_name = "evcxr-stock"
        env_path = Path(tempfile.mkdtemp(prefix="evcxr-latency-"))
        spec_dir = env_path / "kernels" / a.kernel_name
        spec_dir.mkdir(parents=True)
        env = {"EVCXR_TMPDIR": a.stock_tmpdir} if a.stock_tmpdir else {}
        if a.with_prelude:
            setup, env_extra = stock_prelude_setup()
            env.update(env_extra)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [str(Path(a.stock_evcxr).resolve()), "--control_file", "{connection_file}"],
            "display_name": "Rust (stock evcxr)", "language": "rust", "interrupt_mode": "message", "env": env,
        }))
        os.environ["JUPYTER_PATH"] = str(env_path)
    elif a.kernel_name == "pivot":
        install_our_kernel(a.kernel_bin)

    spare, spare_start, spare_cpu0 = None, None, None
    if a.spare:
        label = a.label or a.kernel_name + "-spare"
        env, exe = kernel_launch_env(dict(os.environ))
        t = time.perf_counter()
        spare = Spare([exe, "spare"], env, cwd=os.getcwd())
        spare_start = time.perf_counter() - t
        spare_cpu0 = cpu_seconds(spare.pid)

    t0 = time.perf_counter()
    km = KernelManager(kernel_name=a.kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.kernel_info()
    kc.get_shell_msg(timeout=600)
    t_info = time.perf_counter() - t0
    t_setup = None
    if setup:
        t = time.perf_counter()
        run_cell(kc, setup, timeout=3600)
        t_setup = time.perf_counter() - t
    run_cell(kc, PARAMS_CELL, timeout=3600, want_result=False)
    t_first = time.perf_counter() - t0
    with_tensor = a.kernel_name == "pivot" or a.with_prelude

    pid = getattr(getattr(km, "provisioner", None), "process", None)
    pid = getattr(pid, "pid", None)
    # CPU of the start on the critical path: the kernel process and its children from launch to
    # the first result, or with a spare the spare's CPU over that time plus the launcher's.
    launcher_cpu = cpu_seconds(pid) if pid else None
    if spare is not None:
        assert spare.adopted(), "the kernel did not adopt the spare:\n" + "".join(spare.log)
        c = cpu_seconds(spare.pid)
        start_cpu = (c - spare_cpu0) + (launcher_cpu or 0.0) if None not in (c, spare_cpu0) else None
        pid = spare.pid
    else:
        start_cpu = launcher_cpu
    load_before = os.getloadavg()

    def timed(cells: list[str]) -> tuple[list[float], float | None]:
        run_cell(kc, cells[0].replace("{i}", "0"))  # warm-up, not counted
        c0 = cpu_seconds(pid) if pid else None
        times = [run_cell(kc, c.replace("{i}", str(i + 1))) for i, c in enumerate(cells)]
        c1 = cpu_seconds(pid) if pid else None
        return times, ((c1 - c0) / len(times) if None not in (c0, c1) else None)

    trivial, trivial_cpu = timed([TRIVIAL_CELL] * a.cells)
    lets, let_cpu = timed([LET_CELL] * a.cells)
    tensor, tensor_cpu = timed([TENSOR_CELL] * a.tensor_cells) if with_tensor else ([], None)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    if spare is not None:
        spare.stop()

    res = {
        "kernel": label,
        "kernel_binary": a.stock_evcxr,
        "setup_cell": setup,
        "setup_cell_s": t_setup,
        "start_to_kernel_info_s": t_info,
        "start_to_first_result_s": t_first,
        "start_cpu_s": start_cpu,
        "spare_start_s": spare_start,
        "params_cell": PARAMS_CELL,
        "trivial_cell": "N * 2 + 1",
        "let_cell": "let xN = N; xN + 1",
        "trivial_cells": len(trivial),
        "trivial_p50_s": statistics.median(trivial),
        "trivial_p95_s": pct(trivial, 0.95),
        "trivial_max_s": max(trivial),
        "trivial_s": trivial,
        "let_p50_s": statistics.median(lets),
        "let_p95_s": pct(lets, 0.95),
        "let_max_s": max(lets),
        "let_s": lets,
        "let_cpu_per_cell_s": let_cpu,
        "tensor_p50_s": statistics.median(tensor) if tensor else None,
        "tensor_p95_s": pct(tensor, 0.95) if tensor else None,
        "tensor_s": tensor,
        "trivial_cpu_per_cell_s": trivial_cpu,
        "tensor_cpu_per_cell_s": tensor_cpu,
        "machine": machine(load_average_before=load_before),
    }
    tensor_p50 = "-" if not tensor else f"{res['tensor_p50_s']:.3f} s"
    cpu = lambda c: "-" if c is None else f"{c:.3f} s"  # noqa: E731
    tensor_p95 = "-" if not tensor else f"{res['tensor_p95_s']:.3f} s"
    start_cpu_text = "-" if start_cpu is None else f"{start_cpu:.1f}"
    print(f"{label}: kernel_info {t_info:.2f} s, warm start to the parameters cell done {t_first:.2f} s ({start_cpu_text} CPU-s); p50 / p95 (CPU per cell): "
          f"trivial {res['trivial_p50_s']:.3f} / {res['trivial_p95_s']:.3f} s ({cpu(trivial_cpu)}), "
          f"let {res['let_p50_s']:.3f} / {res['let_p95_s']:.3f} s ({cpu(let_cpu)}), "
          f"tensor {tensor_p50} / {tensor_p95} ({cpu(tensor_cpu)}); n={len(trivial)}/{len(lets)}/{len(tensor)}; "
          f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    write_results(a.out, f"kernel-latency-{label}", res)


if __name__ == "__main__":
    main()
