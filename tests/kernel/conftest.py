"""Shared setup for the kernel tests: a kernelspec for the freshly built `pivot-kernel`.

The binary comes from PIVOT_KERNEL_BIN, else the kernel's cargo target dir. A session fixture
installs the spec into a private JUPYTER_PATH before the first test and removes it after the
last, so tests never touch the user's kernels and merely importing or collecting them changes
nothing. Build slots (PIVOT_CACHE_DIR, default ~/.cache/pivot-lab) are shared with normal use: a
warm slot 0 (`pivot-kernel warm`) makes the first kernel start take seconds instead of minutes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pivot_testing import built_binary, private_kernelspec


@pytest.fixture(scope="session", autouse=True)
def pivot_kernelspec() -> Path:
    """The private JUPYTER_PATH holding the "pivot" spec (set in the environment meanwhile)."""
    with private_kernelspec("pivot-jupyter-") as path:
        yield path


@pytest.fixture(scope="session")
def kernel_bin_path() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")
