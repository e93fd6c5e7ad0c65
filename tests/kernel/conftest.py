"""Shared setup for the kernel tests: a kernelspec for the freshly built `pivot-kernel`.

The binary comes from PIVOT_KERNEL_BIN, else the kernel's cargo target dir. The spec is
installed into a private JUPYTER_PATH, so tests never touch the user's kernels. Build slots
(PIVOT_CACHE_DIR, default ~/.cache/pivot-lab) are shared with normal use: a warm slot 0
(`pivot-kernel warm`) makes the first kernel start take seconds instead of minutes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from pivot_testing import built_binary

ROOT = Path(__file__).resolve().parents[2]


def kernel_bin() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")


BIN = kernel_bin()
_JUPYTER_PATH = Path(tempfile.mkdtemp(prefix="pivot-jupyter-"))
subprocess.run(
    [str(BIN), "install", "--dir", str(_JUPYTER_PATH / "kernels" / "pivot")],
    check=True,
    stdout=subprocess.DEVNULL,
)
os.environ["JUPYTER_PATH"] = str(_JUPYTER_PATH)
# The first cell of a kernel in a warm slot waits for the prelude (seconds); a cold slot needs
# minutes. Tests wait this long for their first reply.
STARTUP_TIMEOUT = float(os.environ.get("PIVOT_TEST_STARTUP_TIMEOUT", "1500"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_JUPYTER_PATH, ignore_errors=True)


@pytest.fixture(scope="session")
def kernel_bin_path() -> Path:
    return BIN
