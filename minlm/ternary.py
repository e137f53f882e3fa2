"""Export of BitLinear models with their ternary weights packed into 2 bits each.

``pack_ternary_model(model, path)`` writes one safetensors file: every ``BitLinear`` becomes a
``PackedBitLinear`` (uint8 bytes holding four weights each, plus one absmean scale), the rest
of the model (embeddings, norms, biases, router) is kept in ``dtype``, and the model config
rides along in the file's metadata. ``load_packed_model(path)`` rebuilds the ``LM`` from that
file alone; its BitLinear layers stay packed and unpack on each call, and in fp32 it gives the
same logits as the quantised model it came from.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from minlm.config import ModelConfig
from minlm.fileio import atomic_path
from minlm.model import LM
from minlm.modules.bitlinear import BitLinear, PackedBitLinear
from minlm.modules.registry import check_recorded_experiment

FORMAT = "minlm-ternary-2bit"
PACKED_NAME = "model.ternary.safetensors"  # the packed weights inside a run folder


def _replace_bitlinears(model: nn.Module, make) -> int:
    """Swap every BitLinear (each shared one once) for ``make(bitlinear)``; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(m))
    return len(targets)


def pack_ternary_model(model: LM, path: str | os.PathLike,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` with 2-bit ternary weights to ``path`` (safetensors); returns the path.

    ``dtype`` is used for everything that is not a ternary weight (``torch.bfloat16`` halves
    the embeddings; fp32 keeps the loaded model's logits identical to the original's).
    """
    from safetensors.torch import save_model

    model = getattr(model, "_orig_mod", model)
    packed = copy.deepcopy(model).cpu()
    if _replace_bitlinears(packed, PackedBitLinear.from_bitlinear) == 0:
        raise ValueError("the model has no BitLinear layers to pack; build it with linear='bitlinear'")
    packed.to(dtype)
    for m in packed.modules():
        if isinstance(m, PackedBitLinear):
            m.scale.data = m.scale.data.float()  # one number per matrix: keep it exact
    metadata = {"format": FORMAT, "dtype": str(dtype).replace("torch.", ""),
                "model_config": json.dumps(model.config.to_dict())}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_model(packed, str(tmp), metadata=metadata)
    return path


def load_packed_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                      trust_experiment: bool = False) -> LM:
    """An ``LM`` in eval mode whose BitLinear layers run from the packed 2-bit weights.

    ``path`` is the packed file, or a run folder holding it as ``model.ternary.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    if Path(path).is_dir():
        folder, path = Path(path), Path(path) / PACKED_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {PACKED_NAME}; write one with "
                                    "pack_ternary_model(model, folder / '" + PACKED_NAME + "')")
    elif not Path(path).is_file():
        raise FileNotFoundError(f"no packed model at {path}: no such file or run folder")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a packed ternary minlm model (format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    recorded = json.loads(metadata["model_config"])
    check_recorded_experiment(str(recorded.get("experiment") or ""), str(path), trust_experiment)
    cfg = ModelConfig.from_dict(recorded)
    model = LM(cfg)
    _replace_bitlinears(model, lambda m: PackedBitLinear(m.in_features, m.out_features,
                                                         m.bias is not None, m.norm.eps))
    load_model(model, str(path), strict=True)
    return model.to(device).eval()


def checkpoint_sizes(model: LM, folder: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of the same model as fp32, bf16 and packed-ternary safetensors files."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        path = folder / f"model.{name}.safetensors"
        save_model(copy.deepcopy(model).to(dtype), str(path))
        sizes[name] = path.stat().st_size
    for name, dtype in (("ternary", torch.float32), ("ternary+bf16", torch.bfloat16)):
        sizes[name] = pack_ternary_model(model, folder / f"model.{name}.safetensors", dtype).stat().st_size
    return sizes
