"""A kernelspec for the freshly built `pivot-kernel` in a private JUPYTER_PATH (as tests/notebooks
does), so papermill runs against the real kernel without touching the user's kernels."""
from __future__ import annotations

import pytest
from pivot_testing import private_kernelspec


@pytest.fixture(scope="session")
def jupyter_path():
    with private_kernelspec("pivot-pm-jupyter-") as path:
        yield path
