"""A Hugging Face Llama or GPT-2 checkpoint as an ordinary minlm run folder.

    python -m minlm import path/to/hf-folder --name my-llama
    python -m minlm import hf:owner/name            # downloads from the Hub first

The folder (``config.json``, safetensors weights, tokenizer files) is read by ``transformers``
itself, its weights mapped by the same table that exports (``minlm.interop``), and the run
written like any trained run: both configs, ``model.safetensors``, the tokenizer, an empty
``log.csv`` and a model card. ``generate``, ``eval``, ``trace``, ``sft`` and ``dpo`` then take
it by name.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_PREFIX = "hf:"
# what a checkpoint folder needs; no pickled ``.bin`` weights (not safe to load)
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json",
             "vocab.json", "merges.txt"]


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint folder, or ``hf:owner/name`` downloaded (safetensors only) from the
    Hugging Face Hub into its usual cache."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        repo = text[len(HUB_PREFIX):]
        if repo.count("/") != 1:
            raise ValueError(f"{text!r}: a Hub source is hf:owner/name, e.g. "
                             "hf:HuggingFaceTB/SmolLM2-135M")
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a Hugging Face checkpoint folder "
                                "(config.json + safetensors + tokenizer) or hf:owner/name")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face checkpoint")
    return path


def _tokenizer(folder: Path):
    """The checkpoint's tokenizer as minlm loads it: ``tokenizer.json`` (what ``AutoTokenizer``
    uses) first, else a sentencepiece ``tokenizer.model`` or ``vocab.json`` + ``merges.txt``."""
    from minlm.tokenizer import HFTokenizer, load_tokenizer

    if (folder / "tokenizer.json").exists():
        return HFTokenizer.load(folder / "tokenizer.json")
    return load_tokenizer(folder)


def _check_weight_files(folder: Path, source) -> None:
    """Only safetensors weights are read: a pickled ``.bin`` can run code as it loads."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
    raise ValueError(f"cannot import {source}: it holds {found} and no .safetensors file; minlm "
                     "loads safetensors only (a pickled file can run code when loaded): convert "
                     "it where you trust it (save_pretrained(..., safe_serialization=True))")


def _check_complete(info: dict, source) -> None:
    """Every tensor the model needs came from the checkpoint, and nothing was left unused:
    ``transformers`` fills a missing one with random values and drops an unknown one."""
    for what, key in (("is missing", "missing_keys"), ("has unexpected", "unexpected_keys")):
        names = sorted(info.get(key) or [])
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if names[4:] else "")
            raise ValueError(f"cannot import {source}: the checkpoint {what} tensors {shown}; "
                             "import a complete checkpoint of this architecture")


def import_checkpoint(source: str | os.PathLike, name: str | None = None,
                      runs_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint at ``source`` as run ``name`` (default: the folder's or repo's
    name) under ``runs_dir`` (default ``trained_models/``); returns the run folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from minlm import runs
    from minlm.config import TrainConfig, check_folder_name
    from minlm.outputs import staged
    from minlm.interop import from_hf, model_config_from_hf
    from minlm.modelcard import write_model_card

    name = name or str(source).rstrip("/").split("/")[-1]
    check_folder_name("name", name)  # base / "../x" would name the folder "x" one level up
    base = Path(runs_dir) if runs_dir is not None else runs.default_runs_dir()
    run_dir = base / name
    # first, before any download: the one check every command that writes a run makes (a
    # plain folder name, no ../ or absolute path; a run replaced only when asked, only a run)
    runs.check_run_target(run_dir, overwrite=overwrite, resumable=False,
                          overwrite_flag="--overwrite")
    folder = resolve_source(source)
    hf_cfg = AutoConfig.from_pretrained(folder)
    try:
        model_config_from_hf(hf_cfg)  # refuse an unsupported model before loading its weights
    except ValueError as e:
        raise ValueError(f"cannot import {source}: {e}") from None
    _check_weight_files(folder, source)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by _check_complete's line
    hf_logging.disable_progress_bar()
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        use_safetensors=True,
                                                        output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    _check_complete(info, source)
    model = from_hf(hf)
    del hf
    tokenizer = _tokenizer(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"cannot import {source}: its tokenizer has {tokenizer.vocab_size} "
                         f"tokens but the model only {model.config.vocab_size} embeddings")

    with staged(run_dir, None) as tmp:  # a run: its configs mark it
        tok_path = runs.copy_tokenizer(tmp, tokenizer)
        train_cfg = TrainConfig(run_name=name, out_dir=str(base), data=str(source),
                                max_iters=1, max_minutes=0.0)
        meta = {"kind": "import", "imported_from": str(source),
                "params": model.num_params(),
                "params_non_embedding": model.num_params(non_embedding=True),
                "tokenizer_path": tok_path.name, "tokenizer_hash": tokenizer.hash,
                "versions": runs.library_versions(),
                "status": f"imported from {source} ({hf_cfg.model_type})"}
        runs.save_configs(tmp, model.config, train_cfg, meta)
        runs.save_weights(tmp, model)
        runs.write_log(tmp, [])
    write_model_card(run_dir)
    return run_dir
