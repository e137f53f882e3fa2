"""Copy minlm weights into Hugging Face ``transformers`` models of the same shape.

Used for parity tests (a model nobody here wrote must give the same logits) and for the
benchmarks that race minlm against ``transformers`` on the same weights. ``transformers`` is
an optional dependency, imported only here.
"""

from __future__ import annotations

import torch

from minlm.config import ModelConfig
from minlm.model import LM


def _require(cfg: ModelConfig, family: str, **expected) -> None:
    wrong = {k: getattr(cfg, k) for k, v in expected.items() if getattr(cfg, k) != v}
    if wrong:
        raise ValueError(f"a {family} model needs {expected}; this config has {wrong}")


def to_hf_llama(model: LM):
    """A ``LlamaForCausalLM`` holding a copy of ``model``'s weights (llama-family configs only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    _require(cfg, "Llama", position="rope", norm="rmsnorm", activation="swiglu",
             block_spec="norm>attn>+ norm>mlp>+", window=0, qk_norm=False, attn_softcap=0.0,
             logit_softcap=0.0, attn_bias=False, mlp_bias=False, norm_affine=True,
             mixer="attention", linear="linear", n_experts=0, embed_scale=1.0)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM(hf_cfg)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.head.weight}
    for i, block in enumerate(model.blocks):
        s, p = dict(block.named_children()), f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": s["norm1"].weight,
            p + "post_attention_layernorm.weight": s["norm2"].weight,
            p + "self_attn.q_proj.weight": s["mixer"].q_proj.weight,
            p + "self_attn.k_proj.weight": s["mixer"].k_proj.weight,
            p + "self_attn.v_proj.weight": s["mixer"].v_proj.weight,
            p + "self_attn.o_proj.weight": s["mixer"].o_proj.weight,
            p + "mlp.gate_proj.weight": s["mlp"].gate.weight,
            p + "mlp.up_proj.weight": s["mlp"].up.weight,
            p + "mlp.down_proj.weight": s["mlp"].down.weight,
        })
    _load(hf, sd)
    return hf


def to_hf_gpt2(model: LM):
    """A ``GPT2LMHeadModel`` holding a copy of ``model``'s weights (gpt2-family configs only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    _require(cfg, "GPT-2", position="learned", norm="layernorm", activation="gelu",
             block_spec="norm>attn>+ norm>mlp>+", attn_bias=True, mlp_bias=True, norm_bias=True,
             window=0, n_kv_heads=0, qk_norm=False, tie_embeddings=True, mixer="attention",
             linear="linear", n_experts=0, embed_scale=1.0)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    sd = {"transformer.wte.weight": model.embed.weight, "transformer.wpe.weight": model.pos.weight,
          "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias,
          "lm_head.weight": model.head.weight}
    for i, block in enumerate(model.blocks):
        s, p = dict(block.named_children()), f"transformer.h.{i}."
        a, m = s["mixer"], s["mlp"]
        # GPT-2's Conv1D stores weights as (in, out): transpose ours
        sd.update({
            p + "ln_1.weight": s["norm1"].weight, p + "ln_1.bias": s["norm1"].bias,
            p + "ln_2.weight": s["norm2"].weight, p + "ln_2.bias": s["norm2"].bias,
            p + "attn.c_attn.weight": torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                 a.v_proj.weight]).t(),
            p + "attn.c_attn.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            p + "attn.c_proj.weight": a.o_proj.weight.t(), p + "attn.c_proj.bias": a.o_proj.bias,
            p + "mlp.c_fc.weight": m.up.weight.t(), p + "mlp.c_fc.bias": m.up.bias,
            p + "mlp.c_proj.weight": m.down.weight.t(), p + "mlp.c_proj.bias": m.down.bias,
        })
    _load(hf, sd)
    return hf


@torch.no_grad()
def _load(hf, sd: dict) -> None:
    own = hf.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith((".attn.bias", ".masked_bias"))]
    if missing:
        raise RuntimeError(f"no minlm weight for {missing[:5]}")
    for k, v in sd.items():
        own[k].copy_(v.detach())
    hf.eval()
