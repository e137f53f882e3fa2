"""Every memory and disk estimate in one place: before a run starts (refuse what cannot fit,
in a second), when it runs out (advice that names a setting), and before each checkpoint
(room on disk for it). Estimates to within a factor of ~2, not measurements.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from minlm.config import ModelConfig, TrainConfig
from minlm.model import LM


def estimate_training_bytes(cfg: ModelConfig, batch_size: int, bytes_per_value: int = 4) -> int:
    """Weights + grads + AdamW moments (4 copies of the params) plus activations kept for backward.

    The activation term counts, per layer and token, the tensors a pre-norm block saves
    (about 16 x dim plus the MLP hidden width x 3 and the attention probabilities when they are
    materialised), then the logits, then what value embeddings and U-net skips keep. An
    estimate to within a factor of ~2, not a measurement.
    """
    params = LM.count_params(cfg)
    tokens = batch_size * cfg.block_size
    per_token_layer = 16 * cfg.dim + 3 * cfg.ffn_dim + cfg.n_heads * min(cfg.block_size, 1024) // 8
    activations = tokens * (cfg.n_layers * per_token_layer + 2 * cfg.vocab_size
                            + _tricks_per_token(cfg))
    return bytes_per_value * (4 * params + activations)


def _tricks_per_token(cfg: ModelConfig) -> int:
    """Values per token the speedrun tricks add: a value-embedding layer keeps its lookup and
    the values before mixing (K x D each), a U-net skip the skipped stream (dim)."""
    from minlm.modules.value_embed import value_table

    value_layers = sum(value_table(cfg, i) is not None for i in range(cfg.n_layers))
    skips = cfg.n_layers // 2 if cfg.unet_skips else 0
    return value_layers * 2 * cfg.kv_heads * cfg.head_size + skips * cfg.dim


def checkpoint_bytes(model: LM) -> int:
    """About what a checkpoint takes: fp32 weights plus two AdamW moments."""
    return 3 * 4 * model.num_params()


def disk_space_problem(run_dir: Path, model: LM) -> str:
    """Why a checkpoint cannot be written safely now, or "" if it can (room for two copies)."""
    need = 2 * checkpoint_bytes(model) + 4 * model.num_params() + (1 << 20)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        return (f"not enough disk space in {run_dir}: a checkpoint needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")
    return ""


def saved_values_per_token(module, *args, **kwargs) -> float:
    """Values per token that one forward of ``module`` saves for backward, measured: every
    tensor autograd packs (``saved_tensors_hooks``), counted once per storage, the module's
    own parameters excluded, in units of the first argument's element size, over its first
    two dimensions (B x T tokens). What a registration's ``memory(cfg, T)`` declares; the
    registry-generated tests compare the two."""
    x = args[0]
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return sum(saved.values()) / x.element_size() / (x.shape[0] * x.shape[1])


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def available_memory(device: torch.device) -> int:
    """Bytes free for a new run: free GPU memory, or available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS reports it
        return 1 << 62


def check_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, a run whose estimate exceeds the memory free."""
    est = estimate_training_bytes(model_cfg, train_cfg.batch_size)
    free = available_memory(device)
    if est > free:
        raise MemoryError(oom_message(None, train_cfg, model_cfg) + f"; {free / 2**30:.2f} GiB "
                          f"are free on {device}")


def oom_message(model: LM | None, train_cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    est = estimate_training_bytes(model_cfg, train_cfg.batch_size)
    n = model.num_params() if model is not None else LM.count_params(model_cfg)
    return (f"out of memory training {n:,} parameters at batch_size="
            f"{train_cfg.batch_size}, block_size={model_cfg.block_size} (estimated "
            f"{est / 2**30:.2f} GiB); try batch_size={max(1, train_cfg.batch_size // 2)} with "
            f"grad_accum_steps={train_cfg.grad_accum_steps * 2}, or a smaller block_size")
