"""minlm <-> Hugging Face ``transformers``: one name table per family, used both ways.

Used for parity tests (a model nobody here wrote must give the same logits), the benchmarks
that race minlm against ``transformers`` on the same weights, ``minlm.export`` (a run as a
``transformers`` folder or a GGUF file) and ``minlm.hub_import`` (a Hugging Face checkpoint as
a run). ``transformers`` is an optional dependency, imported only inside functions.

The tables below are the only place where minlm's parameter names meet Hugging Face's (and,
through them, GGUF's: ``minlm.export`` maps the Hugging Face names with gguf's own table).
"""

from __future__ import annotations

import torch

from minlm.config import ModelConfig
from minlm.model import LM

# minlm's module paths inside a block, as ``LM.state_dict()`` names them: a rename of a
# minlm module (say ``attn`` -> ``mixer``) is one edit here, and both directions follow it.
BLOCK = "blocks.{i}."
NORM1, NORM2 = BLOCK + "norm1.", BLOCK + "norm2."
ATTN = BLOCK + "mixer."  # q_proj, k_proj, v_proj, o_proj
MLP = BLOCK + "mlp."  # gate, up, down

# Hugging Face name -> (how, minlm name, ...); "{i}" is the layer. How: "copy"; "t" (GPT-2's
# Conv1D stores (in, out), minlm's Linear (out, in)); "cat_t" (several minlm weights stacked
# along the output dimension, then transposed); "cat" (biases stacked).
LLAMA_NAMES: dict[str, tuple[str, ...]] = {
    "model.embed_tokens.weight": ("copy", "embed.weight"),
    "model.norm.weight": ("copy", "norm.weight"),
    "lm_head.weight": ("copy", "head.weight"),
    "model.layers.{i}.input_layernorm.weight": ("copy", NORM1 + "weight"),
    "model.layers.{i}.post_attention_layernorm.weight": ("copy", NORM2 + "weight"),
    "model.layers.{i}.self_attn.q_proj.weight": ("copy", ATTN + "q_proj.weight"),
    "model.layers.{i}.self_attn.k_proj.weight": ("copy", ATTN + "k_proj.weight"),
    "model.layers.{i}.self_attn.v_proj.weight": ("copy", ATTN + "v_proj.weight"),
    "model.layers.{i}.self_attn.o_proj.weight": ("copy", ATTN + "o_proj.weight"),
    "model.layers.{i}.mlp.gate_proj.weight": ("copy", MLP + "gate.weight"),
    "model.layers.{i}.mlp.up_proj.weight": ("copy", MLP + "up.weight"),
    "model.layers.{i}.mlp.down_proj.weight": ("copy", MLP + "down.weight"),
}
_QKV = (ATTN + "q_proj.", ATTN + "k_proj.", ATTN + "v_proj.")
GPT2_NAMES: dict[str, tuple[str, ...]] = {
    "transformer.wte.weight": ("copy", "embed.weight"),
    "transformer.wpe.weight": ("copy", "pos.weight"),
    "transformer.ln_f.weight": ("copy", "norm.weight"),
    "transformer.ln_f.bias": ("copy", "norm.bias"),
    "lm_head.weight": ("copy", "head.weight"),
    "transformer.h.{i}.ln_1.weight": ("copy", NORM1 + "weight"),
    "transformer.h.{i}.ln_1.bias": ("copy", NORM1 + "bias"),
    "transformer.h.{i}.ln_2.weight": ("copy", NORM2 + "weight"),
    "transformer.h.{i}.ln_2.bias": ("copy", NORM2 + "bias"),
    "transformer.h.{i}.attn.c_attn.weight": ("cat_t", *(p + "weight" for p in _QKV)),
    "transformer.h.{i}.attn.c_attn.bias": ("cat", *(p + "bias" for p in _QKV)),
    "transformer.h.{i}.attn.c_proj.weight": ("t", ATTN + "o_proj.weight"),
    "transformer.h.{i}.attn.c_proj.bias": ("copy", ATTN + "o_proj.bias"),
    "transformer.h.{i}.mlp.c_fc.weight": ("t", MLP + "up.weight"),
    "transformer.h.{i}.mlp.c_fc.bias": ("copy", MLP + "up.bias"),
    "transformer.h.{i}.mlp.c_proj.weight": ("t", MLP + "down.weight"),
    "transformer.h.{i}.mlp.c_proj.bias": ("copy", MLP + "down.bias"),
}

# What a config must hold for each family to mean the same network in transformers.
_LLAMA_NEEDS = dict(mixer="attention", mlp="", mixer_options={}, linear="linear", n_experts=0,
                    position="rope",
                    norm="rmsnorm", norm_affine=True, activation="swiglu",
                    block_spec="norm>attn>+ norm>mlp>+", window=0, qk_norm=False,
                    attn_softcap=0.0, logit_softcap=0.0, attn_bias=False, mlp_bias=False,
                    embed_scale=1.0, tied_blocks={}, value_embeds=0, unet_skips=False)
_GPT2_NEEDS = dict(mixer="attention", mlp="", mixer_options={}, linear="linear", n_experts=0,
                   position="learned",
                   norm="layernorm", norm_affine=True, norm_bias=True, activation="gelu",
                   block_spec="norm>attn>+ norm>mlp>+", window=0, qk_norm=False,
                   attn_softcap=0.0, logit_softcap=0.0, attn_bias=True, mlp_bias=True,
                   embed_scale=1.0, tied_blocks={}, value_embeds=0, unet_skips=False,
                   n_kv_heads=0, head_dim=0,
                   tie_embeddings=True)
FAMILIES = {"llama": ("LlamaForCausalLM", _LLAMA_NEEDS, LLAMA_NAMES),
            "gpt2": ("GPT2LMHeadModel", _GPT2_NEEDS, GPT2_NAMES)}


def _setting(cfg: ModelConfig, key: str):
    """``cfg``'s value of ``key``, with the spelled-out defaults read as the defaults: GPT-2
    has plain multi-head attention, which ``n_kv_heads=n_heads`` is as much as ``0``."""
    if key == "n_kv_heads" and cfg.kv_heads == cfg.n_heads:
        return 0
    if key == "head_dim" and cfg.head_size * cfg.n_heads == cfg.dim:
        return 0
    return getattr(cfg, key)


def _require(cfg: ModelConfig, family: str, **expected) -> None:
    wrong = {k: _setting(cfg, k) for k, v in expected.items() if _setting(cfg, k) != v}
    if wrong:
        raise ValueError(f"a {family} model needs {expected}; this config has {wrong}")


def family_of(cfg: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the ``transformers`` class that computes the same function as
    ``cfg``. Otherwise a one-line ``ValueError`` naming the settings with no counterpart."""
    family = "gpt2" if cfg.position == "learned" else "llama"
    hf_class, needs, _ = FAMILIES[family]
    wrong = {k: _setting(cfg, k) for k, v in needs.items() if _setting(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        need = ", ".join(f"{k}={needs[k]!r}" for k in wrong)
        raise ValueError(f"{have} has no counterpart in transformers' {hf_class} (it needs {need})")
    return family


def exportable(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` has a transformers counterpart (``family_of`` says why not)."""
    try:
        family_of(cfg)
    except ValueError:
        return False
    return True


def hf_config(cfg: ModelConfig):
    """The ``LlamaConfig`` or ``GPT2Config`` of ``cfg`` (refused with a reason if it has none)."""
    family = family_of(cfg)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
            max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None)


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face Llama or GPT-2 config; anything the minlm model
    would compute differently (biases, rope scaling, another activation) is refused by name."""
    kind = getattr(hf_cfg, "model_type", None)

    def refuse(field, value, valid):
        raise ValueError(f"{kind} config.json: {field}={value!r} has no counterpart in minlm "
                         f"(supported: {valid})")

    if kind == "llama":
        rope = dict(getattr(hf_cfg, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            refuse("rope_parameters.rope_type", rope_type, "'default'")
        theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
        for field, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if getattr(hf_cfg, field, ok) != ok:
                refuse(field, getattr(hf_cfg, field), repr(ok))
        n_heads = hf_cfg.num_attention_heads
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
        return ModelConfig.from_preset(
            "llama-1m", vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.max_position_embeddings,
            dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
            n_heads=hf_cfg.num_attention_heads,
            n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
            head_dim=0 if head_dim * hf_cfg.num_attention_heads == hf_cfg.hidden_size else head_dim,
            hidden_dim=hf_cfg.intermediate_size, rope_theta=float(theta),
            norm_eps=hf_cfg.rms_norm_eps, tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            dropout=0.0)
    if kind == "gpt2":
        if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", hf_cfg.activation_function,
                   "'gelu_new' or 'gelu_pytorch_tanh'")
        for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(hf_cfg, field, False):
                refuse(field, True, "False")
        if not getattr(hf_cfg, "scale_attn_weights", True):
            refuse("scale_attn_weights", False, "True")
        if not hf_cfg.tie_word_embeddings:
            refuse("tie_word_embeddings", False, "True")
        return ModelConfig.from_preset(
            "gpt2-1m", vocab_size=hf_cfg.vocab_size, block_size=hf_cfg.n_positions,
            dim=hf_cfg.n_embd, n_layers=hf_cfg.n_layer, n_heads=hf_cfg.n_head,
            hidden_dim=hf_cfg.n_inner or 4 * hf_cfg.n_embd, norm_eps=hf_cfg.layer_norm_epsilon,
            dropout=0.0)
    raise ValueError(f"config.json has model_type={kind!r}; minlm imports 'llama' and 'gpt2'")


def _expand(names: dict[str, tuple[str, ...]], n_layers: int):
    """(hf name, how, minlm names) for every layer of the table."""
    for hf, (how, *ours) in names.items():
        for i in (range(n_layers) if "{i}" in hf else [None]):
            yield hf.format(i=i), how, [o.format(i=i) for o in ours]


def to_hf_state_dict(model: LM) -> dict[str, torch.Tensor]:
    """``model``'s weights under Hugging Face names and layouts (copies, detached)."""
    cfg = model.config
    _, _, names = FAMILIES[family_of(cfg)]
    ours = model.state_dict()
    out = {}
    for hf, how, keys in _expand(names, cfg.n_layers):
        ts = [ours[k].detach() for k in keys]
        t = torch.cat(ts) if how in ("cat", "cat_t") else ts[0]
        out[hf] = (t.t() if how in ("t", "cat_t") else t).contiguous().clone()
    return out


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face weights under minlm names (the inverse of ``to_hf_state_dict``). A tied
    head missing from ``sd`` is taken from the embedding; any other missing name is an error."""
    _, _, names = FAMILIES[family_of(cfg)]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LM(cfg).state_dict().items()}
    out = {}
    for hf, how, keys in _expand(names, cfg.n_layers):
        if hf not in sd:
            if keys == ["head.weight"] and cfg.tie_embeddings:
                continue
            raise ValueError(f"the checkpoint has no weight {hf!r} (needed for minlm's {keys[0]})")
        t = sd[hf].detach().float()
        t = t.t() if how in ("t", "cat_t") else t
        parts = torch.split(t, [shapes[k][0] for k in keys]) if len(keys) > 1 else [t]
        for k, p in zip(keys, parts):
            if p.shape != shapes[k]:
                raise ValueError(f"checkpoint weight {hf!r} has shape {tuple(sd[hf].shape)}; "
                                 f"minlm's {k} needs {tuple(shapes[k])}")
            out[k] = p.contiguous().clone()
    if cfg.tie_embeddings:
        out["head.weight"] = out["embed.weight"]
    return out


def to_hf(model: LM):
    """A ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` (eval mode) holding a copy of ``model``'s
    weights; a config with no counterpart is refused with the reason."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(model.config))
    _load(hf, to_hf_state_dict(model))
    return hf


def from_hf(hf_model) -> LM:
    """A minlm ``LM`` (eval mode, fp32) holding a copy of a Hugging Face Llama or GPT-2 model."""
    cfg = model_config_from_hf(hf_model.config)
    model = LM(cfg)
    model.load_state_dict(from_hf_state_dict(cfg, hf_model.state_dict()), strict=True)
    return model.eval()


def to_hf_llama(model: LM):
    """A ``LlamaForCausalLM`` holding a copy of ``model``'s weights (llama-family configs only)."""
    _require(model.config, "Llama", **_LLAMA_NEEDS)
    return to_hf(model)


def to_hf_gpt2(model: LM):
    """A ``GPT2LMHeadModel`` holding a copy of ``model``'s weights (gpt2-family configs only)."""
    _require(model.config, "GPT-2", **_GPT2_NEEDS)
    return to_hf(model)


@torch.no_grad()
def _load(hf, sd: dict) -> None:
    own = hf.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith((".attn.bias", ".masked_bias"))]
    if missing:
        raise RuntimeError(f"no minlm weight for {missing[:5]}")
    for k, v in sd.items():
        own[k].copy_(v.detach())
    hf.eval()
