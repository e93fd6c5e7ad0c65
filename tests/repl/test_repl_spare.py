"""`pivot-repl --spare` (engine/src/spare.rs): a REPL launched with the spare's configuration runs on
the spare's engine (its stdin, stdout and stderr handed over), prints its results, and exits with
its status; the spare is gone afterwards. Cost: one engine start."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pivot_testing import STARTUP_TIMEOUT, Spare, built_binary

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
