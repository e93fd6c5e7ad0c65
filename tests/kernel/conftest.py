"""Shared setup for the kernel tests: a kernelspec for the freshly built `pivot-kernel`.

The binary comes from PIVOT_KERNEL_BIN, else the kernel's cargo target dir. A session fixture
installs the spec into a private JUPYTER_PATH before the first test and removes it after the
last, so tests never touch the user's kernels and merely importing or collecting them changes
nothing. Build slots (PIVOT_CACHE_DIR, default ~/.cache/pivot-lab) are shared with normal use: a
warm slot 0 (`pivot-kernel warm`) makes the first kernel start take seconds instead of minutes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pivot_testing import Spare, built_binary, kernel_launch_env, private_kernelspec, stop_kernel_chain


@pytest.fixture(scope="session", autouse=True)
def pivot_kernelspec() -> Path:
    """The private JUPYTER_PATH holding the "pivot" spec (set in the environment meanwhile)."""
    with private_kernelspec("pivot-jupyter-") as path:
        yield path


@pytest.fixture(scope="package", autouse=True)
def kernel_chain_ends():
    """The spare left by the chain of kernels that share one configuration
    (`pivot_testing.chained_kernel_env`) ends after the last test here, so it does not hold a
    build slot through the suites that follow in the same run."""
    yield
    stop_kernel_chain()


@pytest.fixture(scope="session")
def kernel_bin_path() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")


@pytest.fixture(scope="session", autouse=True)
def adopt_spares(pivot_kernelspec):
    """PIVOT_TEST_SPARE=1: every "pivot" kernel a test starts (KernelManager.start_kernel) first
    gets a spare engine of its configuration (`pivot-kernel spare`) and must adopt it, so these
    tests check that an adopted kernel behaves as a normal one. Restarts start normally."""
    if os.environ.get("PIVOT_TEST_SPARE") != "1":
        yield
        return
    from jupyter_client.manager import KernelManager

    original = KernelManager.start_kernel
    spares: list[Spare] = []

    def start_kernel(self, **kw):
        if self.kernel_name != "pivot":
            return original(self, **kw)
        env, exe = kernel_launch_env(dict(kw.get("env") or os.environ))
        spare = Spare([exe, "spare"], env, cwd=str(kw.get("cwd") or os.getcwd()))
        spares.append(spare)
        r = original(self, **kw)
        deadline = time.time() + 30
        while not spare.adopted() and time.time() < deadline:
            time.sleep(0.05)
        assert spare.adopted(), "the kernel did not adopt its spare:\n" + "".join(spare.log)
        return r

    KernelManager.start_kernel = start_kernel
    try:
        yield
    finally:
        KernelManager.start_kernel = original
        for s in spares:
            s.stop()
