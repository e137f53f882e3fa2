"""Set-up shared by tests/ and the notebooks.

nbval runs each notebook's kernel in ``notebooks/``, so a relative ``MINLM_DATA_DIR`` (the
README says ``../shared/data``, relative to the repo root) would point elsewhere there; it is
made absolute here, before any kernel starts, and the kernels inherit it.
"""

import os
from pathlib import Path

if os.environ.get("MINLM_DATA_DIR"):
    os.environ["MINLM_DATA_DIR"] = str(Path(os.environ["MINLM_DATA_DIR"]).expanduser().resolve())


def pytest_configure(config):
    """nbval compares the outputs of cells marked ``# NBVAL_CHECK_OUTPUT`` after the
    substitutions in notebooks/nbval_sanitize.cfg (float statistics, addresses)."""
    if getattr(config.option, "nbval_sanitize_with", "") is None:
        config.option.nbval_sanitize_with = str(Path(__file__).parent / "notebooks" / "nbval_sanitize.cfg")
