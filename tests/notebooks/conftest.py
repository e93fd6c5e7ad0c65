"""Shared fixtures of the notebook suites (test_notebooks.py, test_real_inputs.py)."""
from __future__ import annotations

import pytest
from pivot_testing import private_kernelspec


@pytest.fixture(scope="session")
def jupyter_path():
    """The "pivot" kernelspec from the freshly built binary, in a private JUPYTER_PATH for the session."""
    with private_kernelspec("pivot-nb-jupyter-") as path:
        yield path
