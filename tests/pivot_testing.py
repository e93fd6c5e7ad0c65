"""Helpers shared by the Python test suites (kernel, REPL, notebooks, lab)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# How long a first cell may take: a cold build slot compiles the prelude (minutes on 2 cores).
STARTUP_TIMEOUT = float(os.environ.get("PIVOT_TEST_STARTUP_TIMEOUT", "1500"))


def built_binary(name: str, env_var: str) -> Path:
    """A binary of the kernel workspace: `$env_var` if set, else the first cargo target dir that has it
    (CARGO_TARGET_DIR, the Makefile's kernel target dir, the clone's own target/)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    for target in (
        os.environ.get("CARGO_TARGET_DIR"),
        str(Path.home() / ".cache/pivot-lab/target-kernel"),
        str(ROOT / "target"),
    ):
        if target and (Path(target) / "debug" / name).exists():
            return Path(target) / "debug" / name
    raise RuntimeError(f"{name} is not built: run `make kernel` (or `cargo build -p {name}`) or set {env_var}")


@contextlib.contextmanager
def private_kernelspec(prefix: str):
    """Installs the "pivot" kernelspec from the built binary into a temporary JUPYTER_PATH for the
    duration, so tests never depend on, or touch, the user's kernels. Yields that folder."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    binary = built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")
    subprocess.run([str(binary), "install", "--dir", str(path / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
        shutil.rmtree(path, ignore_errors=True)
