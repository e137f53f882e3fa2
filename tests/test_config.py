import json

import pytest

from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.presets import PRESETS


def test_json_round_trip_is_exact(tmp_path):
    cfg = ModelConfig.from_preset("llama-1m", tied_blocks={3: 1}, rope_theta=5e5, dropout=0.1)
    path = tmp_path / "model_config.json"
    cfg.to_json(path)
    again = ModelConfig.from_json(path)
    assert again == cfg
    assert ModelConfig(**json.loads(path.read_text())) == cfg
    tcfg = TrainConfig(lr=1e-3, max_iters=7, run_name="x")
    assert TrainConfig.from_json(tcfg.to_json()) == tcfg


def test_overrides_are_coerced_to_field_types():
    cfg = ModelConfig().with_overrides(["dim=64", "n_heads=2", "qk_norm=true", "rope_theta=1e4",
                                        "position=alibi", "n_kv_heads=1", 'tied_blocks={"3": 0}'])
    assert cfg.dim == 64 and isinstance(cfg.dim, int)
    assert cfg.qk_norm is True and cfg.rope_theta == 10000.0 and cfg.position == "alibi"
    assert cfg.tied_blocks == {"3": 0} and cfg.kv_heads == 1
    t = TrainConfig().with_overrides(["lr=3e-4", "max_iters=1_000", "compile=0"])
    assert t.lr == 3e-4 and t.max_iters == 1000 and t.compile is False


def test_unknown_override_lists_valid_fields():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) dimm; valid fields are: vocab_size, block_size, dim"):
        ModelConfig().with_overrides(["dimm=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        TrainConfig.parse_overrides(["lr"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'llama-3m'; available presets: gpt2-0.5m"):
        ModelConfig.from_preset("llama-3m")


@pytest.mark.parametrize("overrides, message", [
    (dict(dim=100, n_heads=8), r"dim=100 is not divisible by n_heads=8"),
    (dict(n_heads=4, n_kv_heads=3), r"n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(dim=0), r"dim=0 is invalid: must be a positive integer"),
    (dict(vocab_size=-5), r"vocab_size=-5 is invalid"),
    (dict(block_size=0), r"block_size=0 is invalid"),
    (dict(position="sinusoid"), r"position='sinusoid' is not a registered positional scheme; "
                                  r"registered: alibi, learned, none, rope"),
    (dict(norm="batchnorm"), r"norm='batchnorm' is not a registered norm; registered: "
                           r"cosinenorm, layernorm, rmsnorm"),
    (dict(activation="tanh"), r"activation='tanh' is invalid"),
    (dict(init="kaiming"), r"init='kaiming' is invalid"),
    (dict(dropout=1.5), r"dropout=1.5 is invalid: must be in \[0, 1\)"),
    (dict(dim=96, n_heads=32), r"head_dim=3 is odd"),
    (dict(block_spec="norm>attn>+ norm>ffn>+"), r"unknown step 'ffn'; valid steps are norm, mixer, attn, mlp, moe, \+"),
    (dict(tied_blocks={"1": 3}), r"tied_blocks=.* may only reuse an earlier block"),
    (dict(tied_blocks={"9": 0}), r"tied_blocks=.* block indices 0..3"),
    (dict(dim="128"), r"dim='128' is invalid: must be an integer"),
    (dict(qk_norm=1), r"qk_norm=1 is invalid: must be true or false"),
    (dict(norm_eps=0.0), r"norm_eps=0.0 is invalid: must be > 0"),
])
def test_invalid_model_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=0.0), r"lr=0.0 is invalid: must be > 0"),
    (dict(batch_size=0), r"batch_size=0 is invalid: must be a positive integer"),
    (dict(schedule="step"), r"schedule='step' is invalid: must be one of 'cosine', 'linear', 'constant'"),
    (dict(resume=True, overwrite=True), r"resume=True and overwrite=True contradict"),
    (dict(beta2=1.0), r"beta2=1.0 is invalid"),
    (dict(run_name="a/b"), r"run_name='a/b' is invalid"),
])
def test_invalid_train_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)


def test_bad_override_value_names_field():
    with pytest.raises(ConfigError, match=r"n_layers='four' is invalid: must be an integer"):
        ModelConfig().with_overrides(["n_layers=four"])


def test_presets_cover_families_and_sizes():
    for family in ("gpt2", "llama"):
        for size in ("0.5m", "1m", "5m", "10m", "20m", "40m"):
            assert f"{family}-{size}" in PRESETS
    gpt2, llama = ModelConfig.from_preset("gpt2-1m"), ModelConfig.from_preset("llama-1m")
    assert (gpt2.position, gpt2.norm, gpt2.activation, gpt2.kv_heads, gpt2.tie_embeddings) == (
        "learned", "layernorm", "gelu", gpt2.n_heads, True)
    assert (llama.position, llama.norm, llama.activation, llama.tie_embeddings) == (
        "rope", "rmsnorm", "swiglu", True)
    assert llama.kv_heads < llama.n_heads  # grouped-query attention
