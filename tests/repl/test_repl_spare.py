"""`pivot-repl --spare` (engine/src/spare.rs): a REPL launched with the spare's configuration runs on
the spare's engine (its stdin, stdout and stderr handed over), prints its results, and exits with
its status; the spare is gone afterwards (without PIVOT_SPARE_ENGINE=1), or recycled for the next
REPL (with it). Cost: two engine starts."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from pivot_testing import STARTUP_TIMEOUT, Spare, built_binary, stop_pids

BIN = built_binary("pivot-repl", "PIVOT_REPL_BIN")


def test_a_repl_adopts_a_spare_and_exits_with_its_status(tmp_path: Path):
    env = dict(os.environ, NO_COLOR="1", PIVOT_FIGURES_DIR=str(tmp_path / "figs"), PIVOT_REPL_TIMINGS="1")
    spare = Spare([str(BIN), "--spare"], env, cwd=str(tmp_path))
    try:
        script = tmp_path / "params.rs"
        script.write_text('let lr = 3e-4;\nlet steps: usize = 20;\n// %%\nprintln!("lr={lr}");\nsteps * 2 + 1\n// %%\nlet bad: u8 = "x";\n')
        r = subprocess.run([str(BIN), "params.rs"], capture_output=True, text=True, timeout=STARTUP_TIMEOUT, cwd=tmp_path, env=env)
        assert f"adopted spare engine pid {spare.pid}" in r.stderr, (r.stdout, r.stderr)
        assert "lr=0.0003" in r.stdout and "41" in r.stdout, (r.stdout, r.stderr)
        # The third cell fails to compile: the script's status (1) comes back through the launcher.
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert "E0308" in r.stdout + r.stderr, (r.stdout, r.stderr)
        assert spare.proc.wait(timeout=60) == 1
    finally:
        spare.stop()


def test_a_recycled_spare_serves_one_repl_after_another_with_nothing_of_the_last(tmp_path: Path):
    """PIVOT_SPARE_ENGINE=1: when an adopted REPL ends with its engine idle, the engine is recycled
    (a fresh child process and evcxr state; rust-analyzer and the build slot stay warm) and serves
    the next `pivot-repl` of the same configuration. Each launcher exits with its own REPL's
    status; nothing of one REPL reaches the next: neither its variables nor the piped input it
    left unread. Cost: one spare's start and two recycles."""
    env = dict(os.environ, NO_COLOR="1", PIVOT_FIGURES_DIR=str(tmp_path / "figs"), PIVOT_SPARE_ENGINE="1", PIVOT_SPARE_WAIT_SECS="300")
    r = subprocess.run([str(BIN), "--spare", "--detach", "--timeout", str(int(STARTUP_TIMEOUT))], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=STARTUP_TIMEOUT + 60)
    ready = re.search(r"^spare engine pid (\d+) started, ready after [0-9.]+ s$", r.stdout, re.M)
    assert r.returncode == 0 and ready, (r.returncode, r.stdout, r.stderr)
    pid = int(ready.group(1))

    def repl(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN), *args], input=stdin, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, cwd=tmp_path, env=env)
        # The same engine every time: the spare's, recycled.
        assert f"adopted spare engine pid {pid}" in r.stderr, (r.stdout, r.stderr)
        return r

    try:
        (tmp_path / "one.rs").write_text('let secret = 41;\n// %%\nprintln!("one {}", secret + 1);\n// %%\nlet bad: u8 = "x";\n')
        one = repl("one.rs")
        assert "one 42" in one.stdout, (one.stdout, one.stderr)
        assert one.returncode == 1 and "E0308" in one.stdout + one.stderr, (one.returncode, one.stdout, one.stderr)

        # Piped input that quits before its end: the status is 0 and the rest is never read.
        two = repl(stdin='println!("two {}", 1 + 1);\n:quit\nprintln!("left unread");\n')
        assert two.returncode == 0, (two.returncode, two.stdout, two.stderr)
        assert "two 2" in two.stdout and "left unread" not in two.stdout, (two.stdout, two.stderr)

        # `secret` was one's: unknown here. The line two left unread is not run either.
        three = repl(stdin='println!("three");\nsecret + 1\n')
        assert "three" in three.stdout and "left unread" not in three.stdout, (three.stdout, three.stderr)
        assert three.returncode == 1, (three.returncode, three.stdout, three.stderr)
        assert "E0425" in three.stdout + three.stderr, (three.stdout, three.stderr)
        assert Path(f"/proc/{pid}").exists()
    finally:
        stop_pids([pid])
