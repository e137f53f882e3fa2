"""The run folder: the unit that is compared, resumed, fine-tuned and shared.

``trained_models/<run>/`` holds ``model_config.json``, ``train_config.json`` (with a ``meta``
block: data source, tokenizer path and hash, library versions), ``model.safetensors``,
``log.csv``, a copy of the tokenizer, ``README.md`` and ``checkpoint-<step>.pt`` files for
exact resume. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from minlm.config import ModelConfig, TrainConfig
from minlm.data import data_dir
from minlm.distributed import resolve_device  # the one check that the device exists
from minlm.fileio import atomic_path, atomic_write_text
from minlm.outputs import is_run_folder
from minlm.model import LM
from minlm.modules.registry import check_recorded_experiment
from minlm.tokenizer import SentencePieceTokenizer, load_tokenizer

# The log's columns, for every kind of training (fine-tuning adds its own after these):
# step, tokens (processed so far), elapsed_s (wall clock, summed over resumes), lr,
# train_loss (mean over the step's micro-batches; without the MoE aux term), val_loss and
# val_bpb (at evaluations), tokens_per_s (since the previous row), grad_norm (before
# clipping), mfu (model FLOPs utilisation where the peak is known), aux_loss (MoE load
# balance), train_bpb (train_loss in bits per byte of the training text).
LOG_COLUMNS = ["step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_bpb",
               "tokens_per_s", "grad_norm", "mfu", "aux_loss", "train_bpb"]
WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "model-best.safetensors"  # keep_best=true: the best evaluation's weights
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
REQUIRED_FILES = ("model_config.json", "train_config.json", WEIGHTS)


class RunError(ValueError):
    """A run folder that is missing, incomplete or disagrees with what is being loaded."""


def default_runs_dir() -> Path:
    return Path(os.environ.get("MINLM_RUNS_DIR", "trained_models"))


def resolve_run_dir(name_or_path: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> Path:
    """A run given by path, or by name under ``runs_dir`` (default ``trained_models/``)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    base = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    candidate = base / str(name_or_path)
    if candidate.is_dir():
        return candidate
    raise RunError(f"no run folder {str(name_or_path)!r} (looked in {base}); available runs: "
                   f"{', '.join(run_names(base)) or 'none'}")


def run_names(base: str | os.PathLike) -> list[str]:
    """Names of the folders in ``base``, for messages that say which runs do exist."""
    base = Path(base)
    return sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []


def check_run_target(run_dir: str | os.PathLike, *, resume: bool = False,
                     overwrite: bool = False, resumable: bool = True,
                     overwrite_flag: str = "overwrite=true") -> bool:
    """May a run write ``run_dir`` (``out_dir/run_name``)? Asked before any work is done, by
    every command that writes a run. True when the folder holds a run (to resume or replace).

    The name must be a plain folder name (the check ``TrainConfig.run_name`` applies);
    ``resume`` needs the run to exist (the message lists those that do); an existing folder
    needs ``resume`` or ``overwrite``; ``overwrite`` only ever replaces a run folder.
    ``overwrite_flag`` is how the asking command spells overwrite (``--overwrite`` for import)."""
    from minlm.config import check_folder_name

    run_dir = Path(run_dir)
    check_folder_name("run_name", run_dir.name)
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and not exists:
        there = ", ".join(run_names(run_dir.parent)) or "none"
        raise RunError(f"cannot resume {run_dir.name!r}: there is no run of that name in "
                       f"{run_dir.parent}; runs there: {there}")
    if exists and not (resume or overwrite):
        again = "pass resume=true to continue it, " if resumable else "pass "
        raise RunError(f"run {run_dir.name!r} already exists in {run_dir.parent}; {again}"
                       f"{overwrite_flag} to start it again, or choose another run_name")
    if exists and overwrite and not is_run_folder(run_dir):
        raise RunError(f"refusing to overwrite {run_dir}: it does not look like a run folder "
                       "(no model_config.json and train_config.json); choose another run_name")
    if exists and overwrite:  # the rule every replaced output obeys (never the cwd, ...)
        from minlm.outputs import check_target

        check_target(run_dir, "run", overwrite=True, name="run", flag=overwrite_flag)
    return exists


def library_versions() -> dict[str, str]:
    import minlm  # here, not at the top: minlm/__init__ may still be importing when runs loads

    return {"minlm": minlm.__version__, "torch": str(torch.__version__),
            "python": platform.python_version()}


def hardware(device: torch.device) -> str:
    """What a run trained on, for its record: the GPU's name, or the CPU's model and threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'' if threads == 1 else 's'} ({device.type})"


# --- writing -------------------------------------------------------------------------------

def save_configs(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 meta: dict[str, Any]) -> None:
    """Both configs, portable: no output folder, no absolute path (see ``portable``)."""
    model_cfg.to_json(run_dir / "model_config.json")
    train = {k: v for k, v in train_cfg.to_dict().items() if k != "out_dir"}
    payload = portable({**train, "meta": meta})
    atomic_write_text(run_dir / "train_config.json", json.dumps(payload, indent=2) + "\n")


def portable(value: Any, data_root: Path | None = None) -> Any:
    """``value`` (JSON-like) with every absolute path made machine-independent: a file under
    the data directory becomes its path relative to it, any other its name alone. A run
    folder is copied and shared; the machine that trained it should not show in it."""
    if isinstance(value, dict):
        return {k: portable(v, data_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, data_root) for v in value]
    if not isinstance(value, str) or not os.path.isabs(value) or any(c.isspace() for c in value):
        return value
    root = (data_root or data_dir()).resolve()
    path = Path(value)
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name


def absolute_paths(value: Any) -> list[str]:
    """The absolute paths inside a JSON-like value (what ``portable`` removes)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in absolute_paths(v)]
    if isinstance(value, str) and os.path.isabs(value) and not any(c.isspace() for c in value):
        return [value]
    return []


def data_files(paths: list[str | os.PathLike], hash_limit: int = 1 << 30) -> list[dict]:
    """What a run read: each file relative to the data directory, its size and sha256 (files
    over ``hash_limit`` bytes are not hashed: hashing a huge corpus at every start costs more
    than the record is worth)."""
    out = []
    for p in map(Path, paths):
        size = p.stat().st_size
        digest = None
        if size <= hash_limit:
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out.append({"path": portable(str(p.resolve())), "bytes": size, "sha256": digest})
    return out


def save_weights(run_dir: Path, model: LM, state_dict: dict | None = None,
                 filename: str = WEIGHTS) -> None:
    """Weights of the unwrapped model in safetensors (shared tensors, e.g. a tied head, once).

    ``state_dict`` (e.g. gathered from FSDP shards) is loaded into a CPU copy first."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)  # DistributedDataParallel
    sharded = any(type(p.data).__name__ == "DTensor" for p in model.parameters())  # FSDP2
    if state_dict is not None and sharded:
        model = LM(model.config)
        model.load_state_dict(state_dict)
    with atomic_path(run_dir / filename) as tmp, _write_errors(run_dir / filename):
        save_model(model, str(tmp))


def copy_tokenizer(run_dir: Path, tokenizer) -> Path:
    """Save the tokenizer into the run (``tokenizer.model`` or ``tokenizer.json``) so the folder
    is self-contained; its hash is recorded in train_config.json."""
    suffix = ".model" if isinstance(tokenizer, SentencePieceTokenizer) else ".json"
    dest = run_dir / f"tokenizer{suffix}"
    if not dest.exists() or dest.read_bytes() != tokenizer.to_bytes():
        tokenizer.save(dest)
    return dest


def write_log(run_dir: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """``log.csv`` with ``LOG_COLUMNS`` (fine-tuning runs pass them plus their own figures)."""
    columns = columns or LOG_COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    with _write_errors(run_dir / "log.csv"):
        atomic_write_text(run_dir / "log.csv", buf.getvalue())


def append_log_row(run_dir: Path, row: dict, columns: list[str] | None = None) -> None:
    """Append one row as it happens, for anyone watching; checkpoints rewrite the whole file."""
    columns = columns or LOG_COLUMNS
    with open(Path(run_dir) / "log.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=columns, extrasaction="ignore").writerow(
            {k: _fmt(row.get(k)) for k in columns})


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # exact round trip: resumed logs compare equal
    return v


def read_log(run_dir: Path):
    import pandas as pd  # lazy: heavy, and only listing and reading logs as frames need it

    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return pd.DataFrame(columns=LOG_COLUMNS)
    return pd.read_csv(path)


def read_log_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return float(v)


@contextlib.contextmanager
def _write_errors(path: Path, what: str = "", after: str = ""):
    """torch.save and safetensors report a failed write (a full disk, a file-size limit) as
    RuntimeError ("enforce fail at inline_container.cc") or SafetensorError; turn those, and
    a plain OSError, into an OSError that names the file and says why (``write_failure``)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - narrowed just below
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"could not write {what}{path}: {write_failure(path.parent, e)}{after}") from e


# --- checkpoints ---------------------------------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, newest first."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*.pt"):
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    path = run_dir / f"checkpoint-{step:08d}.pt"
    with atomic_path(path) as tmp, _write_errors(path, "the checkpoint ",
                                                 "; the previous checkpoint is kept"):
        torch.save(state, tmp)
    for _, old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path, log=print) -> dict:
    """The newest checkpoint that loads; a torn or corrupted one is skipped with a message.

    Loading uses ``weights_only=True``: a checkpoint holding pickled code is refused.
    """
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise RunError(f"run {run_dir} has no checkpoint-*.pt to resume from")
    errors = []
    for step, path in checkpoints:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: try the next one
            errors.append(f"{path.name}: {_unreadable(e)}")
            log(f"checkpoint {path.name} is unreadable ({errors[-1]}); trying an older one")
            continue
        if errors:
            log(f"resuming from {path.name} (step {step})")
        return state
    raise RunError(f"no readable checkpoint in {run_dir}: " + "; ".join(errors))


def write_failure(folder: Path, e: BaseException) -> str:
    """Why a write failed, in words (torch reports a full disk as "enforce fail at
    inline_container.cc" with no errno): the disk, the file size limit, or the OS's reason."""
    import errno

    free = shutil.disk_usage(folder).free if Path(folder).exists() else 0
    where = f"{free / 2**20:.1f} MiB free in {folder}"
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return f"the disk is full ({where})"
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limited = limit != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        limit, limited = 0, False
    if code == errno.EFBIG or limited:
        return f"the file size limit was reached (ulimit -f: {limit:,} bytes; {where})"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({where})"
    return f"the disk is full or not writable ({where})"


def _unreadable(e: Exception) -> str:
    """Why torch could not load a checkpoint, without torch's advice to retry with
    ``weights_only=False``: that is exactly the unsafe step (it runs pickled code)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return ("it holds pickled Python objects besides tensors; refused, because loading "
                "them could run code (minlm checkpoints hold only tensors and plain values)")
    return text.splitlines()[0][:200] if text else type(e).__name__


# --- reading -------------------------------------------------------------------------------

@dataclass
class Run:
    """A loaded run: the model (eval mode), its tokenizer, configs and log."""

    path: Path
    model: LM
    tokenizer: Any
    model_config: ModelConfig
    train_config: TrainConfig
    meta: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def log(self):
        return read_log(self.path)


def read_configs(run_dir: Path, trust_experiment: bool = False
                 ) -> tuple[ModelConfig, TrainConfig, dict]:
    """The run's configs and meta. Building the model config imports the experiment it
    records, so that passes ``check_recorded_experiment`` first: a local experiment by name,
    anything else only with ``trust_experiment``."""
    missing = [f for f in ("model_config.json", "train_config.json") if not (run_dir / f).exists()]
    if missing:
        raise RunError(f"run folder {run_dir} is missing {', '.join(missing)}")
    model_data = _read_json_object(run_dir / "model_config.json")
    check_recorded_experiment(str(model_data.get("experiment") or ""),
                              str(run_dir / "model_config.json"), trust_experiment)
    model_cfg = _config_from(run_dir / "model_config.json", ModelConfig.from_dict, model_data)
    train_cfg, meta = _train_record(run_dir)
    return model_cfg, train_cfg, meta


def read_record(run_dir: Path) -> tuple[dict, TrainConfig, dict]:
    """The model config as the plain dict recorded, the train config and meta: what listing
    and comparing runs need, read without building the model config, so no experiment code a
    folder names is ever imported by them."""
    missing = [f for f in ("model_config.json", "train_config.json") if not (run_dir / f).exists()]
    if missing:
        raise RunError(f"run folder {run_dir} is missing {', '.join(missing)}")
    return (_read_json_object(run_dir / "model_config.json"),) + _train_record(run_dir)


def recorded_params(model_data: dict, meta: dict) -> int | None:
    """The parameter count a run recorded; counted from its config only when that imports no
    code (no experiment), else None."""
    if meta.get("params") or model_data.get("experiment"):
        return meta.get("params")
    try:
        return LM.count_params(ModelConfig.from_dict(model_data))
    except (ValueError, TypeError):
        return None


def _train_record(run_dir: Path) -> tuple[TrainConfig, dict]:
    data = _read_json_object(run_dir / "train_config.json")
    meta = data.pop("meta", {})
    known = set(TrainConfig.field_names())
    train_cfg = _config_from(run_dir / "train_config.json", TrainConfig.from_dict,
                             {k: v for k, v in data.items() if k in known})
    return train_cfg, meta


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: config JSON is not valid ({e}); the file is torn or was edited "
                       "by hand") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: config JSON is not valid: it holds a {type(data).__name__}, "
                       "expected an object of settings")
    return data


def _config_from(path: Path, build, data: dict | None = None):
    """A config built from ``path`` (or its already-read ``data``); errors name the file."""
    try:
        return build(_read_json_object(path) if data is None else data)
    except (ValueError, TypeError) as e:
        raise RunError(f"{path}: {e}") from None


def find_tokenizer_file(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("tokenizer*"))
    if not found:
        raise RunError(f"run folder {run_dir} has no tokenizer file (tokenizer.*)")
    return found[0]


def load_run(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
             runs_dir: str | os.PathLike | None = None, trust_experiment: bool = False) -> Run:
    """Model + tokenizer ready for inference, from a run folder or a run name.

    A run that records an experiment by path, or one not found locally, is refused unless
    ``trust_experiment=True``: importing it runs the code it names (``read_configs``)."""
    device = resolve_device(device) if isinstance(device, str) and ":" not in device else device
    run_dir = resolve_run_dir(name_or_path, runs_dir)
    missing = [f for f in REQUIRED_FILES if not (run_dir / f).exists()]
    if missing:
        raise RunError(f"run folder {run_dir} is missing {', '.join(missing)}")
    model_cfg, train_cfg, meta = read_configs(run_dir, trust_experiment)
    model = LM(model_cfg)
    try:
        load_model(model, str(run_dir / WEIGHTS), strict=True)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types; name the file
        why = weights_mismatch(model, run_dir / WEIGHTS) or str(e).splitlines()[0]
        raise RunError(f"cannot load weights from {run_dir / WEIGHTS}: {why}") from None
    tokenizer = load_tokenizer(find_tokenizer_file(run_dir))
    expected = meta.get("tokenizer_hash")
    if expected and tokenizer.hash != expected:
        raise RunError(f"tokenizer in {run_dir} has hash {tokenizer.hash[:12]}, but the run was "
                       f"trained with {expected[:12]}")
    return Run(run_dir, model.to(device).eval(), tokenizer, model_cfg, train_cfg, meta)


def weights_mismatch(model: LM, path: Path, shown: int = 4) -> str:
    """How a weights file disagrees with the model its config builds: the tensors missing,
    extra, or of another shape (torch says only "Error(s) in loading state_dict for LM")."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - not a readable safetensors file: the caller says so
        return ""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = [f"{k}: file {list(saved[k])}, config {list(v)}" for k, v in expected.items()
              if k in saved and saved[k] != v]
    missing = [k for k in expected if k not in saved and not _tied(model, k, saved)]
    extra = [k for k in saved if k not in expected]
    parts = []
    for what, items in (("shapes differ", shapes), ("missing", missing), ("unexpected", extra)):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            parts.append(f"{what}: {'; '.join(items[:shown])}{more}")
    if not parts:
        return ""
    return ("model_config.json does not match the weights (" + " | ".join(parts) + "); the "
            "config was changed after training, or the weights belong to another run")


def _tied(model: LM, key: str, saved: dict) -> bool:
    """A tensor safetensors stored once under another name (e.g. a tied head)."""
    params = dict(model.state_dict(keep_vars=True))
    return any(k in saved and params[k] is params[key] for k in params if k != key)


def list_runs(runs_dir: str | os.PathLike | None = None):
    """One row per run folder with its size and final figures, best val bits per byte first."""
    import pandas as pd  # lazy: heavy, and only listing and reading logs as frames need it

    base = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    rows = []
    for d in sorted(base.glob("*/model_config.json")):
        run_dir = d.parent
        try:
            model_data, train_cfg, meta = read_record(run_dir)  # imports no experiment code
        except Exception:  # noqa: BLE001 - a broken folder is listed, not fatal
            rows.append({"run": run_dir.name, "status": "unreadable config"})
            continue
        log = read_log(run_dir)
        evals = log.dropna(subset=["val_loss"]) if len(log) else log
        last = log.iloc[-1] if len(log) else None
        last_eval = evals.iloc[-1] if len(evals) else None
        rows.append({
            "run": run_dir.name,
            "preset": train_cfg.preset,
            "params": meta.get("params"),
            "vocab_size": model_data.get("vocab_size"),
            "steps": int(last["step"]) if last is not None else 0,
            "tokens": int(last["tokens"]) if last is not None else 0,
            "elapsed_min": round(float(last["elapsed_s"]) / 60, 2) if last is not None else None,
            "kind": meta.get("kind", "pretrain"),
            # a DPO loss is not a language-model loss: it gets a column of its own
            "val_loss": (float(last_eval["val_loss"]) if last_eval is not None
                         and meta.get("kind") != "dpo" else None),
            "val_dpo_loss": (float(last_eval["val_loss"]) if last_eval is not None
                             and meta.get("kind") == "dpo" else None),
            "val_bpb": float(last_eval["val_bpb"]) if last_eval is not None else None,
            # an objective whose figure is an upper bound (masked diffusion) says so, as data
            "val_bpb_is_bound": bool(meta.get("bpb_is_bound", False)),
            "status": meta.get("status", ""),
            "path": str(run_dir),
        })
    df = pd.DataFrame(rows)
    if len(df) and "val_bpb" in df:
        df = df.sort_values("val_bpb", na_position="last").reset_index(drop=True)
    return df
