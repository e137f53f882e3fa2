"""The error every config check raises, in a module of its own so that ``minlm.config`` and
``minlm.modules`` (whose registrations validate their own options) can both import it
without importing each other, and ``report_errors``, which turns errors into a command's
one line and exit code (``python -m minlm`` and ``python -m minlm.tokenizer`` both use it)."""

import sys


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""


# a module only some commands import -> (the package that provides it, minlm's extra in
# pyproject.toml that installs it); tests/test_install.py checks this against pyproject
EXTRAS = {
    "transformers": ("transformers", "export"), "gguf": ("gguf", "export"),
    "google": ("protobuf", "export"),  # sentencepiece's model proto, for export
    "optuna": ("optuna", "search"), "datasets": ("datasets", "data"),
    "ipywidgets": ("ipywidgets", "notebooks"), "tensorboard": ("tensorboard", "loggers"),
    "mlflow": ("mlflow-skinny", "loggers"), "wandb": ("wandb", "wandb"),
    "peft": ("peft", "export"), "lm_eval": ("lm_eval", "eval"),
    "llama_cpp": ("llama-cpp-python", "llamacpp"),
}


def missing_module(e: ModuleNotFoundError) -> str:
    """One line for a module that is not installed: what provides it and the extra to
    install (``pip install .`` gives the core; each extra is named in pyproject.toml)."""
    top = (e.name or str(e)).split(".")[0]
    package, extra = EXTRAS.get(top, (top, None))
    if extra is None:
        return f"no module named {e.name!r}: pip install {package}"
    return (f"this needs {package} (no module named {e.name!r}), from minlm's {extra!r} extra: "
            f"pip install \"minlm[{extra}]\" (in a checkout: pip install -e \".[{extra}]\")")


def report_errors(fn, debug: bool = False) -> int:
    """Run a command: its own exit code (0 if it returns none); bad input one ``error:`` line
    and 2; anything unexpected one line and 1; Ctrl-C 130. ``debug`` re-raises instead."""
    try:
        code = fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional extra that is not installed
        if debug:
            raise
        print(f"error: {missing_module(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, OSError, MemoryError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - unexpected: one line, the traceback with --debug
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e}; this is a bug in minlm, not in your "
              "input: please report it with the command and the traceback that --debug shows",
              file=sys.stderr)
        return 1
    return code or 0
