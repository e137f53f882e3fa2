"""Record the logits of shipped models into shipped_logits.safetensors, for the models named
(the others' entries are kept). Run it when a model is re-shipped, never to make a failing
test pass after a change to the forward: that test exists to catch such a change.

    python tests/golden/record_shipped_logits.py llama-1m matmulfree-1m
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minlm.runs import load_run

HERE = Path(__file__).resolve().parent
FILE = HERE / "shipped_logits.safetensors"


def record(names: list[str]) -> None:
    entries = load_file(FILE) if FILE.exists() else {}
    torch.set_num_threads(1)
    for name in names:
        run = load_run(HERE.parents[1] / "trained_models" / name)
        idx = torch.randint(0, run.model_config.vocab_size, (2, 12),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, _ = run.model(idx)
        entries[f"{name}.idx"] = idx
        entries[f"{name}.logits"] = logits[:, :, :64].contiguous()
    save_file(entries, FILE)


if __name__ == "__main__":
    record(sys.argv[1:])
