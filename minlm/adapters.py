"""LoRA adapters on disk in PEFT's format, so the Hugging Face ecosystem loads them.

    adapter/adapter_config.json        peft's LoraConfig (peft_type LORA, r, lora_alpha, ...)
    adapter/adapter_model.safetensors  base_model.model.<transformers module>.lora_A/B.weight

A LoRA fine-tune writes this folder beside its merged weights; on top of the parent run's
``transformers`` export (``minlm.export``) it loads with
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EXPORT), RUN / "adapter")``.

The adapters themselves stay minlm's ``LoRALinear`` (``minlm.lora``): it is the module that
training, tracing, DPO's reference and merging already share, so the format is written and read
here rather than training through ``peft``. Module names go through ``minlm.interop``'s name
table, the one place where minlm's names meet transformers'. GPT-2 computes q, k and v in one
``c_attn`` layer: adapters on minlm's separate projections become one adapter of the summed
rank there (A stacked, B block-diagonal), which is the same function; peft reads that rank and
its alpha from ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft puts before a module name in a saved adapter


def _module_map(cfg) -> dict[str, tuple[str, int, int]]:
    """minlm linear module -> (transformers module, its slot among the minlm modules stacked
    into it, how many are stacked), for every module the name table maps."""
    from minlm.interop import FAMILIES, _expand, family_of

    _, _, names = FAMILIES[family_of(cfg)]
    out = {}
    for hf, _how, ours in _expand(names, cfg.n_layers):
        if hf.endswith(".weight"):
            for slot, name in enumerate(ours):
                out[name.removesuffix(".weight")] = (hf.removesuffix(".weight"), slot, len(ours))
    return out


def _wrapped(model) -> dict[str, torch.nn.Module]:
    from minlm.lora import LoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model, base: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors under peft's names) of ``model``'s adapters."""
    from minlm.interop import family_of

    layers = _wrapped(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (add_lora first)")
    cfg = model.config
    family = family_of(cfg)
    where = _module_map(cfg)
    grouped: dict[str, list] = {}  # transformers module -> [(slot, of, LoRALinear)]
    for name, layer in layers.items():
        if name not in where:
            raise ValueError(f"LoRA layer {name!r} has no transformers counterpart in "
                             f"minlm.interop's {family} table")
        hf, slot, of = where[name]
        grouped.setdefault(hf, []).append((slot, of, layer))
    first = next(iter(layers.values()))
    rank, scale = first.rank, first.scale
    if any(m.rank != rank or m.scale != scale for m in layers.values()):
        raise ValueError("every LoRA layer must share one rank and alpha to be saved for peft")
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for hf, parts in sorted(grouped.items()):
        if parts[0][1] == 1:
            a, b = parts[0][2].lora_a.detach(), parts[0][2].lora_b.detach()  # (R, in), (out, R)
        else:  # stacked outputs (GPT-2's c_attn): slot s is block s of A and B, zero if unadapted
            rows = [m.out_features for m in _slot_modules(model, where, hf)]
            first_w = parts[0][2].lora_a
            a = torch.zeros(len(rows) * rank, first_w.shape[1], dtype=first_w.dtype)
            b = torch.zeros(sum(rows), len(rows) * rank, dtype=first_w.dtype)
            for slot, _, m in parts:
                start = sum(rows[:slot])
                a[slot * rank:(slot + 1) * rank] = m.lora_a.detach()
                b[start:start + rows[slot], slot * rank:(slot + 1) * rank] = m.lora_b.detach()
            rank_pattern[hf] = a.shape[0]
            alpha_pattern[hf] = scale * a.shape[0]  # the same alpha / r as every other layer
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous().cpu().clone()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous().cpu().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": rank, "lora_alpha": scale * rank, "lora_dropout": float(first.drop.p),
              "target_modules": sorted(grouped), "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern, "bias": "none",
              "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores (in, out)
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None}
    return config, tensors


def _slot_modules(model, where, hf: str) -> list[torch.nn.Module]:
    """The minlm linear layers stacked into transformers module ``hf``, in slot order."""
    from minlm.lora import LoRALinear

    names = sorted((s, n) for n, (h, s, _) in where.items() if h == hf)
    mods = [model.get_submodule(n) for _, n in names]
    return [m.base if isinstance(m, LoRALinear) else m for m in mods]


def save_adapter(model, path: str | os.PathLike, base: str = "") -> Path:
    """Write ``model``'s adapters as a peft adapter folder at ``path`` (replaced atomically);
    ``base`` names the model they go on (recorded as ``base_model_name_or_path``)."""
    from safetensors.torch import save_file

    from minlm.outputs import staged

    config, tensors = adapter_state(model, base)
    path = Path(path)
    with staged(path, None) as tmp:  # swapped in whole, unmarked
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return path


def load_adapter(model, path: str | os.PathLike) -> list[str]:
    """Add the adapters of the peft folder ``path`` to ``model`` (minlm ``LoRALinear`` layers,
    as ``add_lora`` makes them, holding the saved weights); returns the wrapped layers' names.
    An adapter minlm cannot hold exactly (another peft type, a bias, DoRA, a c_attn adapter that
    mixes q, k and v) is refused by name."""
    from safetensors.torch import load_file

    from minlm.lora import add_lora

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    tensors = load_file(str(path / WEIGHTS))
    for key, ok in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False),
                    ("use_rslora", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"{path / CONFIG}: {key}={config[key]!r} cannot be loaded into "
                             f"minlm's LoRA (it needs {key}={ok!r})")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    where = _module_map(model.config)
    back: dict[str, list[tuple[int, str]]] = {}
    for ours, (hf, slot, _) in where.items():
        back.setdefault(hf, []).append((slot, ours))
    targets = config["target_modules"]
    if isinstance(targets, str) or not all(t in back for t in targets):
        raise ValueError(f"{path / CONFIG}: target_modules={targets!r} must list full module "
                         "names of the transformers export, as minlm saves them")
    chosen = {}  # minlm layer -> (A, B) for it
    for hf in targets:
        a, b = tensors[f"{PREFIX}{hf}.lora_A.weight"], tensors[f"{PREFIX}{hf}.lora_B.weight"]
        slots = sorted(back[hf])
        if len(slots) == 1:
            chosen[slots[0][1]] = (a, b)
            continue
        rows = [model.get_submodule(n).out_features for _, n in slots]
        if a.shape[0] != len(rows) * rank:
            raise ValueError(f"{path / WEIGHTS}: the adapter on {hf} has rank {a.shape[0]}; "
                             f"minlm writes {len(rows)} blocks of rank {rank} there (q, k, v)")
        for s, (_, name) in enumerate(slots):
            start, cols = sum(rows[:s]), slice(s * rank, (s + 1) * rank)
            outside = torch.cat([b[:start, cols], b[start + rows[s]:, cols]])
            if outside.any():
                raise ValueError(f"{path / WEIGHTS}: the adapter on {hf} mixes the stacked "
                                 "q/k/v outputs; minlm's adapters sit on each projection")
            if a[cols].any():  # an all-zero block: that projection has no adapter
                chosen[name] = (a[cols], b[start:start + rows[s], cols])
    last_names = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    wrapped = add_lora(model, rank, alpha, last_names, float(config.get("lora_dropout", 0.0)))
    if sorted(chosen) != wrapped:
        raise ValueError(f"{path / CONFIG}: the adapter covers {len(chosen)} layers, not every "
                         f"layer named {', '.join(last_names)}; minlm adapts them all")
    with torch.no_grad():
        for name, (a, b) in chosen.items():
            layer = model.get_submodule(name)
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
    return wrapped
