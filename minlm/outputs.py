"""The one rule for every folder or file a command writes where the user names it.

``export --out``, ``prepare --out``, ``import --name``, the ``search`` folder and a run's
``out_dir/run_name`` all ask ``check_target`` before any work, and all write through
``staged``: the output is built in a temp sibling and swapped in whole, and an old target
goes only after the new one is complete (a crash leaves the old one or the new one).

A target may be replaced only when minlm itself wrote it: every such output carries a marker
naming its kind and its source (``minlm-output.json`` in a folder, listing the files written;
the ``minlm.output`` key in a GGUF header; a run folder is marked by its two configs). Never
replaced, whatever the flags: the current directory or a folder holding it, the source being
read or a folder holding it, a run folder (except a run by the ``overwrite=true`` rule for
runs), a folder holding anything minlm did not write there, and an output of another kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

MARKER = "minlm-output.json"
GGUF_KEY = "minlm.output"
KINDS = ("hf-export", "gguf-export", "shards", "search", "run")


class TargetError(ValueError):
    """A target that minlm will not write or replace; the message says what to do instead."""


def marker(kind: str, source) -> dict:
    import minlm

    return {"kind": kind, "source": str(source), "minlm": minlm.__version__}


def is_run_folder(path: Path) -> bool:
    """A run folder is marked by its two configs (its file list is open-ended)."""
    return (path / "model_config.json").is_file() and (path / "train_config.json").is_file()


def read_marker(target: Path) -> dict | None:
    """What minlm recorded when it wrote ``target``; None when it did not write it."""
    if target.is_file():
        return _gguf_marker(target) if target.suffix == ".gguf" else None
    if is_run_folder(target):
        return {"kind": "run"}
    try:
        mark = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        mark = None
    if isinstance(mark, dict) and mark.get("kind") in KINDS:
        return mark
    return _legacy_marker(target)


def _legacy_marker(target: Path) -> dict | None:
    """Folders minlm wrote before it marked them: a shard folder (``meta.json`` lists its
    files) and a search folder (its study, lock or results)."""
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and "key" in meta and "files" in meta:
        names = [n for fs in meta["files"].values() for n, _ in fs]
        names += [n.replace(".bin", ".mask.bin") for n in names] if meta.get("loss_mask") else []
        return {"kind": "shards", "source": meta.get("source"),
                "files": ["meta.json", ".lock", *names]}
    if any((target / f).is_file() for f in ("study.db", "study.lock", "results.csv")):
        return {"kind": "search"}
    return None


def _gguf_marker(path: Path) -> dict | None:
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get(GGUF_KEY)
        return json.loads(field.contents()) if field is not None else None
    except Exception:  # noqa: BLE001 - not a GGUF file (or none minlm can read): not marked
        return None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_target(target: str | os.PathLike, kind: str, *, overwrite: bool, source=None,
                 name: str = "--out", flag: str = "--overwrite") -> bool:
    """May a command write ``target`` (an output of ``kind`` made from ``source``)? Asked
    before any work. True when ``target`` exists and may be replaced, False when it is new
    (or an empty folder); otherwise a one-line ``TargetError`` (``FileExistsError`` when only
    ``flag`` is missing) naming the path as given and what to do.

    ``overwrite`` is the command's replace flag (``prepare`` and ``search`` pass True: they
    may always rewrite their own earlier output, which is what they would make again)."""
    given = Path(target)
    real = given.resolve()
    cwd = Path.cwd().resolve()
    other = "name a new path"
    if _within(cwd, real):
        raise TargetError(f"{name} {given} is the current directory or holds it; minlm never "
                          f"replaces that: {other}")
    for src in source if isinstance(source, (list, tuple)) else [source]:
        if src is None or str(src).startswith("hf:"):
            continue
        if _within(Path(src).resolve(), real):
            raise TargetError(f"{name} {given} is "
                              f"{'' if Path(src).resolve() == real else 'a folder holding '}"
                              f"the source {src}; minlm never writes over what it reads: "
                              f"{other}")
    if not (given.exists() or given.is_symlink()):
        return False
    if given.is_dir() and not any(given.iterdir()):
        return True  # an empty folder: replacing it loses nothing
    mark = read_marker(given)
    if mark is not None and mark["kind"] == "run" and kind != "run":
        raise TargetError(f"{name} {given} is a run folder; minlm replaces a run only by "
                          f"training or importing it again with overwrite: {other}")
    if not overwrite:
        raise FileExistsError(f"{name} {given} already exists; pass {flag} to replace it, or "
                              f"{other}")
    if mark is None:
        what = "file" if given.is_file() else "folder"
        raise TargetError(f"refusing to replace {name} {given}: minlm did not write that {what} "
                          f"(it has no {MARKER if given.is_dir() else 'minlm marker'}); "
                          f"{other}, or move it away first")
    if mark["kind"] != kind:
        raise TargetError(f"refusing to replace {name} {given}: it holds a minlm {mark['kind']}, "
                          f"not a {kind}; {other}")
    if "files" in mark and given.is_dir():
        extra = sorted(p.name for p in given.iterdir()
                       if p.name not in set(mark["files"]) | {MARKER})
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if extra[3:] else "")
            raise TargetError(f"refusing to replace {name} {given}: it holds {shown}, which "
                              f"minlm did not write there; move them out, or {other}")
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale(target: Path) -> None:
    """Remove the temp siblings of ``target`` that a killed writer left."""
    prefix = f".{target.name}.staging-"
    for p in target.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def swap_in(staged: Path, target: Path) -> None:
    """Put the complete ``staged`` folder (or file) at ``target``; an old target is renamed
    aside first and removed only once the new one is in place."""
    from minlm.fileio import _crash_point, _fsync_dir

    _crash_point(target)
    if staged.is_file():
        os.replace(staged, target)
    else:
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.replaced-{os.getpid()}"
            os.replace(target, old)
        os.replace(staged, target)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    _fsync_dir(target.parent)


@contextlib.contextmanager
def staged(target: str | os.PathLike, kind: str | None, source=None, *,
           file: bool = False) -> Iterator[Path]:
    """Yield a temp sibling of ``target`` (an empty folder, or a file path with ``file``) to
    write into; on success mark it (``kind`` None: the caller marks it itself, as a run's
    configs do) and swap it in (``swap_in``); on failure remove it, leaving ``target`` as it
    was."""
    from minlm.fileio import _umask

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(target)
        prefix = f".{target.name}.staging-{os.getpid()}-"
        if file:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())
        else:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=target.parent)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give it normal permissions
    except OSError as e:
        raise OSError(f"cannot write {target}: {e.strerror or e} in {target.parent}; choose a "
                      "folder you can write to") from None
    tmp = Path(tmp)
    try:
        try:
            yield tmp
        except Exception as e:  # noqa: BLE001 - re-raised as is unless the disk is full
            full = _full(target.parent, e)
            if full:  # numpy, safetensors and gguf each word a full disk their own way
                raise OSError(f"cannot write {target}: the disk is full ({full}); free some "
                              "space or write elsewhere (nothing was replaced)") from None
            raise
        if not file:  # writers that stage through mkstemp leave 0600 (safetensors)
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    os.chmod(f, 0o666 & ~_umask())
        if kind is not None and not file:
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / MARKER).write_text(json.dumps({**marker(kind, source), "files": files},
                                                 indent=1) + "\n")
        if file:
            os.chmod(tmp, 0o666 & ~_umask())  # a writer may have replaced the file
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        swap_in(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _full(folder: Path, error: Exception) -> str:
    """How full the disk holding ``folder`` is when ``error`` came from it filling up (an
    ENOSPC anywhere in its words, as safetensors and numpy give it, or under 64 KiB left),
    else ''."""
    import errno

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    said = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        w in str(error) for w in ("No space left on device", "os error 28"))
    return f"{free:,} bytes free" if said or free < 1 << 16 else ""


def mark_folder(folder: str | os.PathLike, kind: str, source=None) -> None:
    """Mark a folder minlm keeps adding to in place (a search folder) as its own."""
    path = Path(folder) / MARKER
    if not path.exists():
        from minlm.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(marker(kind, source), indent=1) + "\n")
