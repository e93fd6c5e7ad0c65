"""Shared fixtures of the notebook suites (test_notebooks.py, test_real_inputs.py)."""
from __future__ import annotations

import pytest
from pivot_testing import private_kernelspec, spare_chain


@pytest.fixture(scope="session")
def jupyter_path():
    """The "pivot" kernelspec from the freshly built binary, in a private JUPYTER_PATH for the session."""
    with private_kernelspec("pivot-nb-jupyter-") as path:
        yield path


@pytest.fixture(scope="session")
def kernel_cwd(tmp_path_factory):
    """The working directory of every notebook kernel of the session. One folder for both suites, so
    that all their kernels have one configuration and run on one recycled engine (`chain`); each
    notebook still writes where its `out_dir` parameter says."""
    return tmp_path_factory.mktemp("kernel-cwd")


@pytest.fixture(scope="session")
def chain(jupyter_path, kernel_cwd):
    """Spare engines as `make demo` chains them (PIVOT_SPARE_ENGINE=1): the first notebook's kernel
    starts a spare, and each later kernel adopts the engine the one before left, recycled."""
    with spare_chain() as c:
        yield c
