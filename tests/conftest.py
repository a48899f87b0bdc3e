"""Test setup shared by every test module."""

import os
import sys
import warnings

# Tests run on the CPU (GPU kernels through interpreters); keep JAX from probing for CUDA.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Helper modules beside the tests (oracle.py) import as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_tables(tmp_path, monkeypatch):
    """Each test sees no user tuned folder, no $ATTNBENCH_TUNED unless it sets one, and a
    cache folder of its own."""
    from attnbench.kernels import lookup

    monkeypatch.delenv(lookup.TUNED_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    lookup.clear_caches()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="attnbench: no tuned config")
        yield
    lookup.clear_caches()
