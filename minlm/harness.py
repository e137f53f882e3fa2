"""Any run scored by EleutherAI's lm-evaluation-harness, the field's common yardstick.

    python -m minlm eval llama-1m --tasks tinystories_nextword
    python -m minlm.harness --model minlm --model_args run=llama-1m --tasks tinystories_nextword

Importing this module registers the model class ``minlm`` with ``lm_eval``'s registry, so
``lm_eval.simple_evaluate(model="minlm", model_args="run=llama-1m", ...)`` works in any
program that imported it. The ``lm_eval`` command itself has no way to find models outside
its own table (no plugin entry points), so ``python -m minlm.harness ARGS`` is that command
(``lm_eval ARGS``, every option the same) with minlm registered and minlm's own tasks on its
``--include_path`` (and ``--device cpu`` unless given, as ``minlm eval``). Hub tasks (hellaswag, lambada, ...) load as lm_eval loads them.

The three requests go through minlm's own paths: log-likelihoods through
``minlm.evaluate.score_continuations`` (batched forward passes), rolling log-likelihoods
through the same on lm_eval's windows of the model's context, and generation through
``minlm.generate.complete`` (batched, KV-cached, with stop strings).

minlm's own tasks live in ``minlm/eval_tasks/`` (a task YAML over a JSON file shipped with
the package): ``tinystories_nextword``, 200 TinyStories validation stories cut before a word,
with the true next word among four choices (``make_items.py`` there builds it).
"""

from __future__ import annotations

import sys
from pathlib import Path

# a missing lm_eval is a ModuleNotFoundError, which the CLI words as the extra to install
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

TASKS_DIR = Path(__file__).parent / "eval_tasks"


@register_model("minlm")
class MinLMEval(LM):
    """A minlm run as an ``lm_eval`` model: ``run`` is a run name or folder; the experiment it
    records is imported only as ``runs.load_run`` allows (``trust_experiment=true`` opts in)."""

    def __init__(self, run: str = "llama-1m", device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 64, trust_experiment: bool | str = False, **_ignored):
        super().__init__()
        from minlm.runs import load_run

        if str(batch_size).startswith("auto"):
            batch_size = 16  # no search: the models are small
        trust = str(trust_experiment).lower() in ("1", "true", "yes")  # model_args are text
        self.run = load_run(run, device=device, trust_experiment=trust)
        self.model, self.tok = self.run.model.eval(), self.run.tokenizer
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.block = self.model.config.block_size

    # --- tokens -----------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """BOS + context + continuation ids (cut on the left to the context window) and how
        many are the continuation's; spaces at the context's end move to the continuation, and
        the continuation is what encoding both adds, as lm_eval's own HF model does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        head = [self.tok.bos_id] + (self.tok.encode(context) if context else [])
        whole = [self.tok.bos_id] + self.tok.encode(context + continuation)
        n = len(whole) - len(head)
        if n < 1:
            raise ValueError(f"continuation {continuation!r} adds no token after its context")
        return whole[-(self.block + 1):], min(n, self.block)

    # --- the three requests -------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from minlm.evaluate import score_continuations

        rows = [self._pair(*r.args) for r in requests]
        return score_continuations(self.model, rows, self.batch_size, self.tok.pad_id)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from minlm.evaluate import score_continuations

        out = []
        for r in requests:
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(text), prefix_token=self.tok.bos_id, max_seq_len=self.block,
                context_len=1)]
            rows = [(ctx + cont, len(cont)) for ctx, cont in windows]
            out.append(sum(lp for lp, _ in score_continuations(self.model, rows, self.batch_size,
                                                               self.tok.pad_id)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from minlm.generate import complete

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same settings run as one batch
        for k, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(k)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0))
            sampling = {"temperature": temperature if kwargs.pop("do_sample", temperature > 0)
                        else 0.0}  # lm_eval's default: greedy
            for key in ("top_k", "top_p", "seed"):
                if key in kwargs:
                    sampling[key] = kwargs.pop(key)
            if kwargs:
                raise ValueError(f"generation settings {sorted(kwargs)} have no counterpart in "
                                 "minlm.generate (it takes until, max_gen_toks, do_sample, "
                                 "temperature, top_k, top_p, seed)")
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                done = complete(self.model, self.tok, [requests[k].args[0] for k in part], new,
                                stop=until, **sampling)  # the context slides past block_size
                for k, c in zip(part, done):
                    out[k] = c.text
        return out


def evaluate_tasks(run, tasks: list[str], limit: float | None = None, batch_size: int = 16,
                   device: str = "cpu", num_fewshot: int | None = None,
                   trust_experiment: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` of ``run`` on ``tasks`` (minlm's own tasks included);
    returns lm_eval's results dict (``lm_eval.utils.make_table`` prints it)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="minlm", model_args={"run": str(run), "device": device, "batch_size": batch_size,
                                   "trust_experiment": trust_experiment},
        tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
        task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=False)


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line with the ``minlm`` model registered and minlm's tasks on
    the include path."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" in argv:
        at = argv.index("--include_path") + 1
        argv[at] = f"{argv[at]}:{TASKS_DIR}"  # lm_eval splits include paths at ':'
    else:
        argv += ["--include_path", str(TASKS_DIR)]
    if "--device" not in argv:  # lm_eval's own default is cuda:0; minlm's eval runs on the CPU
        argv += ["--device", "cpu"]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
