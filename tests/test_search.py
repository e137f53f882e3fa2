"""Search: memory budget skips, results ordered by val bits per byte, successive halving."""

import math

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.search import (grid, measure_step_memory, parse_bytes, random_candidates, search,
                          split_overrides)


@pytest.fixture(scope="module", autouse=True)
def shard_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MINLM_CACHE_DIR", str(tmp_path_factory.mktemp("shards")))
    yield
    mp.undo()


def base_cfgs(tmp_path, **train):
    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, block_size=32)
    kw = dict(out_dir=str(tmp_path), max_iters=16, batch_size=4, lr=3e-3, warmup_iters=2,
              eval_interval=4, eval_iters=2, log_interval=4, checkpoint_interval=4,
              max_docs=200, num_workers=1, verbose=False)
    return model, TrainConfig(**{**kw, **train})


def test_candidates_and_overrides():
    assert grid(dim=[32, 64], lr=[1e-3]) == [{"dim": 32, "lr": 1e-3}, {"dim": 64, "lr": 1e-3}]
    cands = random_candidates(5, seed=1, n_layers=[1, 2], lr=("log", 1e-4, 1e-2), dim=("uniform", 16, 64))
    assert len(cands) == 5 and all(1e-4 <= c["lr"] <= 1e-2 and isinstance(c["dim"], int) for c in cands)
    assert cands == random_candidates(5, seed=1, n_layers=[1, 2], lr=("log", 1e-4, 1e-2),
                                      dim=("uniform", 16, 64))
    m, t = split_overrides({"dim": 48, "lr": 1e-2}, ModelConfig(), TrainConfig())
    assert (m.dim, t.lr) == (48, 1e-2)
    with pytest.raises(ValueError, match="unknown config field.*widht"):
        grid(widht=[1])
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_measured_step_memory_counts_state_and_grows_with_batch(tmp_path):
    model, train = base_cfgs(tmp_path)
    from minlm.runs import estimate_params

    n = estimate_params(model)
    sizes = [measure_step_memory(model, train.replace(batch_size=b)) for b in (4, 8, 16)]
    assert sizes[0] > 4 * 4 * n  # weights, grads and two AdamW moments in fp32, plus activations
    step1, step2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert step1 > 0 and step2 == pytest.approx(2 * step1, rel=0.05)  # activations ~ batch


def test_over_budget_candidates_are_skipped_and_the_rest_trained(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path, max_iters=8)
    # (256, 2) measures about 31 MiB a step; (1024, 4) is estimated far over and never built
    result = search(grid(dim=[32, 256], n_layers=[1, 2]) + [{"dim": 1024, "n_layers": 4}],
                    model, train, memory_budget="24MB", n_rungs=1, verbose=False)
    by_dim = {(t.overrides["dim"], t.overrides["n_layers"]): t for t in result.trials}
    assert by_dim[(256, 2)].status == "skipped"
    assert by_dim[(256, 2)].reason.startswith("one training step needs")
    assert "far over the budget of 24.0 MiB" in by_dim[(1024, 4)].reason
    assert by_dim[(1024, 4)].status == "skipped"
    assert all(by_dim[k].status == "trained" for k in [(32, 1), (32, 2), (256, 1)])
    for t in result.trials:
        if t.status == "trained":
            assert t.peak_memory <= 24 * 2**20 and t.steps == 8 and (tmp_path / "search" / t.name).is_dir()
    table = result.table
    assert list(table["status"][-sum(t.status == "skipped" for t in result.trials):]) == ["skipped"] * sum(
        t.status == "skipped" for t in result.trials)
    bpb = [v for v in table["val_bpb"] if not math.isnan(v)]
    assert bpb == sorted(bpb) and len(bpb) >= 2
    fig = result.figure()
    assert fig.axes[0].get_xlabel() == "parameters"


def test_successive_halving_cuts_an_obviously_bad_trial(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path)
    result = search(grid(lr=[3e-3, 1e-7]), model, train, eta=2, n_rungs=2, verbose=False)
    good, bad = result.trials
    assert bad.status == "cut" and bad.steps == 8 and "behind the best" in bad.reason
    assert good.status == "trained" and good.steps == 16  # resumed past the rung to the end
    assert [s for s, _ in good.curve] == [4, 8, 12, 16]
    assert result.best is good and result.table["trial"][0] == good.name
