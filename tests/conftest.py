"""Shared fixtures: where the real data lives, and tiny configs that train in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The shared real-data folder (``MINLM_DATA_DIR``, as CI sets it), else ../shared/data."""
    env = os.environ.get("MINLM_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "tinystories" / "train.txt").exists():
        pytest.fail(f"real data not found under {d}; set MINLM_DATA_DIR to the shared data folder")
    return d


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy shared CPU waiting for them costs
    seconds per test. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    ``MINLM_TEST_THREADS`` overrides the 1: CI's second pass over the ``numerics`` tests runs
    them at another thread count, where float sums come out in another order."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MINLM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shard_cache(tmp_path_factory):
    """Token shards cached per test module, outside the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MINLM_CACHE_DIR", str(tmp_path_factory.mktemp("shards")))
    yield
    mp.undo()
