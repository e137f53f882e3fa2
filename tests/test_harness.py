"""lm-evaluation-harness scores minlm runs: its three requests agree with minlm's own paths,
and both command lines (``python -m minlm eval --tasks`` and lm_eval's own, through
``python -m minlm.harness``) score the shipped local task."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from lm_eval.api.instance import Instance

from minlm.evaluate import evaluate_tokens
from minlm.generate import complete
from minlm.harness import MinLMEval

pytestmark = pytest.mark.usefixtures("one_thread")

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play in the park "
         "with her red ball. One day, the ball rolled into the pond.")


@pytest.fixture(scope="module")
def lm():
    return MinLMEval(run="llama-1m", batch_size=3)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_is_the_models_log_probability_of_the_continuation(lm):
    pairs = [("Once upon a time, there was a little", " girl"),
             ("The cat sat on the ", "mat and slept."), ("", "Once upon a time")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    tok, model = lm.tok, lm.model
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        whole = [tok.bos_id] + tok.encode(context + continuation)
        n = len(whole) - 1 - (len(tok.encode(context)) if context else 0)
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]]))[0][0].log_softmax(-1)  # (T, V)
        want = logits[-n:].gather(-1, torch.tensor(whole[-n:])[:, None]).sum()
        assert logp == pytest.approx(float(want), abs=1e-4)
        assert greedy == bool((logits[-n:].argmax(-1) == torch.tensor(whole[-n:])).all())
    assert got[0][0] > math.log(0.05)  # "girl" after "a little" is likely for this model


def test_rolling_loglikelihood_is_minus_the_total_loss(lm):
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", STORY)])
    ids = [lm.tok.bos_id] + lm.tok.encode(STORY)  # shorter than the context: one window
    result = evaluate_tokens(lm.model, ids)
    assert rolling == pytest.approx(-result.loss * result.targets, rel=1e-5)
    long_text = " ".join([STORY] * 8)  # several windows of the 256-token context
    (long,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", long_text)])
    assert long < rolling * 6


def test_generate_until_is_minlms_greedy_completion_cut_at_the_stop(lm):
    prompts = ["Once upon a time", "Tom and Sue went to the"]
    got = lm.generate_until([request("generate_until", p, {"until": ["."], "max_gen_toks": 30,
                                                           "do_sample": False})
                             for p in prompts])
    want = [c.text for c in complete(lm.model, lm.tok, prompts, 30, stop=["."],
                                     temperature=0.0)]
    assert got == want and all(g and "." not in g for g in got)
    with pytest.raises(ValueError, match=r"generation settings \['num_beams'\] have no "
                                         "counterpart in minlm.generate"):
        lm.generate_until([request("generate_until", "Hi", {"until": ["."], "num_beams": 4})])


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def table_value(out: str, metric: str) -> float:
    (line,) = [x for x in out.splitlines() if f"|{metric} " in x]
    return float(line.split("|")[7])


def test_minlm_eval_tasks_and_lm_eval_cli_score_the_local_task():
    a = run_cli("-m", "minlm", "eval", "llama-1m", "--tasks", "tinystories_nextword",
                "--limit", "40")
    assert a.returncode == 0, a.stderr[-2000:]
    assert "tinystories_nextword" in a.stdout
    b = run_cli("-m", "minlm.harness", "--model", "minlm", "--model_args", "run=llama-1m",
                "--tasks", "tinystories_nextword", "--limit", "40")
    assert b.returncode == 0, b.stderr[-2000:]
    acc = table_value(a.stdout, "acc")
    assert acc == table_value(b.stdout, "acc") and 0.25 < acc <= 1.0  # above chance (1 in 4)
    c = run_cli("-m", "minlm", "eval", "llama-1m")
    assert c.returncode == 2 and "eval takes --data FILE" in c.stderr
