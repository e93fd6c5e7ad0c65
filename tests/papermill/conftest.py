"""A kernelspec for the freshly built `pivot-kernel` in a private JUPYTER_PATH (as tests/notebooks
does), so papermill runs against the real kernel without touching the user's kernels."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from pivot_testing import built_binary


def kernel_bin() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")


@pytest.fixture(scope="session")
def jupyter_path():
    path = Path(tempfile.mkdtemp(prefix="pivot-pm-jupyter-"))
    subprocess.run([str(kernel_bin()), "install", "--dir", str(path / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(path)
    yield path
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old
    shutil.rmtree(path, ignore_errors=True)
