"""Spare engines (`pivot-kernel spare`, engine/src/spare.rs) through a real Jupyter client: a kernel
whose configuration differs from the waiting spare's starts normally and says which field differs;
a kernel of the same configuration adopts the spare (its log and the PIVOT_CELL_STATS file say so)
and runs a parameters cell, and both processes end when the kernel shuts down. With
PIVOT_SPARE_ENGINE=1 (`make demo`'s chain) the adopted engine is recycled at shutdown instead: the
next kernel adopts the same process within seconds and sees nothing of the last one.

Cost: two spare starts and one normal kernel start (about three kernel starts in all)."""
from __future__ import annotations

import json
import os
import time

import pytest
from jupyter_client.manager import KernelManager

from pivot_testing import STARTUP_TIMEOUT, Spare, kernel_launch_env

PARAMS_CELL = 'let lr = 3e-4;\nlet steps: usize = 20;\nlet run_name = String::from("spare");'


def run(kc, code: str, timeout: float = STARTUP_TIMEOUT):
    outputs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    return reply["content"], outputs


def result_text(msgs) -> str:
    return "".join(m["content"]["data"].get("text/plain", "") for m in msgs if m["msg_type"] == "execute_result")


def stats_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def start(env: dict[str, str], cwd: str, log_path):
    km = KernelManager(kernel_name="pivot")
    log = open(log_path, "w")
    km.start_kernel(env=env, cwd=cwd, stderr=log)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc, log


def stop(km, kc, log) -> int | None:
    """Shuts the kernel down; returns the launched process's exit status."""
    proc = km.provisioner.process
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    log.close()
    return proc.wait(timeout=60)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


def test_a_mismatched_spare_is_left_alone_and_a_matching_one_is_adopted(workdir):
    stats = workdir / "cell-stats.jsonl"
    base = {**os.environ, "PIVOT_CELL_STATS": str(stats)}
    spare_env, kernel_exe = kernel_launch_env({**base, "PIVOT_TEST_SPARE_MARK": "a"})
    spare = Spare([kernel_exe, "spare"], spare_env, cwd=str(workdir))
    try:
        # Another value of one variable: another configuration, so a normal start.
        km, kc, log = start({**base, "PIVOT_TEST_SPARE_MARK": "b"}, str(workdir), workdir / "kernel-b.log")
        try:
            reply, _ = run(kc, PARAMS_CELL)
            assert reply["status"] == "ok", reply
        finally:
            stop(km, kc, log)
        text = (workdir / "kernel-b.log").read_text()
        assert "no spare engine for this configuration" in text and "env:PIVOT_TEST_SPARE_MARK" in text, text
        assert "serving " in text, text
        assert not spare.adopted() and spare.proc.poll() is None, "".join(spare.log)
        assert not any("adopted" in line for line in stats_lines(stats))

        # The spare's own configuration: adopted.
        km, kc, log = start({**base, "PIVOT_TEST_SPARE_MARK": "a"}, str(workdir), workdir / "kernel-a.log")
        try:
            assert spare.adopted(), "".join(spare.log)
            reply, _ = run(kc, PARAMS_CELL, timeout=120)
            assert reply["status"] == "ok", reply
            reply, msgs = run(kc, "steps * 2 + 1", timeout=120)
            assert reply["status"] == "ok" and result_text(msgs) == "41", (reply, msgs)
            # The warm-up left nothing behind: only the parameters cell's variables exist.
            reply, msgs = run(kc, ":vars", timeout=120)
            shown = "".join(m["content"].get("text", "") + json.dumps(m["content"].get("data", {})) for m in msgs)
            assert "run_name" in shown and "steps" in shown and "lr" in shown, shown
            for name in ("a", "b", "c", "v", "t", "n", "p"):
                assert f'"{name}"' not in shown and f"\\n{name}:" not in shown, shown
        finally:
            code = stop(km, kc, log)
        text = (workdir / "kernel-a.log").read_text()
        assert "handed " in text and f"over to the spare engine pid {spare.pid}" in text, text
        assert f"adopted spare engine pid {spare.pid}" in text, text
        adopted = [line for line in stats_lines(stats) if "adopted" in line]
        assert len(adopted) == 1 and adopted[0]["pid"] == spare.pid, stats_lines(stats)
        cells = [line for line in stats_lines(stats) if line["pid"] == spare.pid and line["cell"] > 0]
        assert cells and cells[0]["cell"] == 1, cells  # numbered as in a normal start
        # The kernel's shutdown ends the spare too, and the launcher exits with its status.
        spare.proc.wait(timeout=60)
        assert code == 0, (code, text)
    finally:
        spare.stop()


def test_a_recycled_engine_serves_the_next_kernel_with_nothing_of_the_last(workdir):
    stats = workdir / "cell-stats.jsonl"
    base = {**os.environ, "PIVOT_CELL_STATS": str(stats), "PIVOT_SPARE_ENGINE": "1", "PIVOT_TEST_SPARE_MARK": "recycle"}
    spare_env, kernel_exe = kernel_launch_env(base)
    spare = Spare([kernel_exe, "spare"], spare_env, cwd=str(workdir))
    try:
        km, kc, log = start(base, str(workdir), workdir / "kernel-1.log")
        try:
            assert spare.adopted(), "".join(spare.log)
            reply, _ = run(kc, 'let secret = String::from("first kernel");\nfn helper() -> usize { 41 }\nhelper() + secret.len()', timeout=120)
            assert reply["status"] == "ok", reply
        finally:
            code = stop(km, kc, log)
        assert code == 0, (workdir / "kernel-1.log").read_text()
        # The launcher is gone; the engine is not: it recycles itself into the next spare.
        assert spare.proc.poll() is None, "the engine ended with its kernel instead of being recycled"

        t0 = time.time()
        km, kc, log = start(base, str(workdir), workdir / "kernel-2.log")
        try:
            reply, msgs = run(kc, PARAMS_CELL + "\nsteps * 2 + 1", timeout=120)
            first_result = time.time() - t0
            assert reply["status"] == "ok" and result_text(msgs) == "41", (reply, msgs)
            for code_ in ("secret.len()", "helper()"):
                reply, msgs = run(kc, code_, timeout=120)
                assert reply["status"] == "error" and reply["ename"].startswith("CompileError"), (code_, reply)
        finally:
            code = stop(km, kc, log)
        text = (workdir / "kernel-2.log").read_text()
        assert f"over to the spare engine pid {spare.pid}" in text, text
        lines = stats_lines(stats)
        adopted = [line["adopted"] for line in lines if "adopted" in line]
        assert [a["kernel_of_this_engine"] for a in adopted] == [1, 2], lines
        recycled = [line["recycled"] for line in lines if "recycled" in line]
        assert recycled and all(r["wall_s"] < 120 for r in recycled), lines
        # Cells of the second kernel count from the prelude's again, as in a normal start.
        second = [line for line in lines if line["pid"] == spare.pid and line["cell"] > 0]
        assert [c["cell"] for c in second].count(1) >= 2, second
        # Not a fresh engine start: no start line after the spare's own.
        assert len([line for line in lines if line.get("start_phases") and line["pid"] == spare.pid]) == 1, lines
        print(f"recycled engine: first result of kernel 2 after {first_result:.1f} s")
        assert code == 0
    finally:
        spare.stop()
