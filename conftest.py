"""Set-up shared by tests/ and the notebooks.

nbval runs each notebook's kernel in ``notebooks/``, so a relative ``MINLM_DATA_DIR`` (the
README says ``../shared/data``, relative to the repo root) would point elsewhere there; it is
made absolute here, before any kernel starts, and the kernels inherit it.
"""

import os
from pathlib import Path

if os.environ.get("MINLM_DATA_DIR"):
    os.environ["MINLM_DATA_DIR"] = str(Path(os.environ["MINLM_DATA_DIR"]).expanduser().resolve())
