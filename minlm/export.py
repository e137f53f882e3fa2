"""Runs that travel: a run folder as a Hugging Face ``transformers`` folder or a GGUF file.

    python -m minlm export llama-1m --format hf --out exported/llama-1m
    python -m minlm export llama-1m --format gguf --dtype f16 --out llama-1m.gguf

The ``hf`` folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` and no minlm installed: ``config.json``,
``model.safetensors``, ``generation_config.json`` (written by ``transformers`` itself from the
weights ``minlm.interop`` maps), the tokenizer converted by ``transformers``' own sentencepiece
converter, and a model card made from the run's ``README.md``. The GGUF file (llama family)
is what llama.cpp runs, tokenizer included. Only configs that compute the same function in
``transformers`` are exported; others are refused with the setting that has no counterpart.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMATS = ("hf", "gguf")
GGUF_DTYPES = ("f32", "f16", "q8_0")  # q8_0: blocks of 32 int8 weights with one f16 scale


def _load(run):
    from minlm.runs import load_run

    return run if hasattr(run, "model") else load_run(run)


def _check_out(out: Path, kind: str, run, overwrite: bool) -> None:
    """The rule for every output a user names (``minlm.outputs``): ``--out`` is replaced
    only with ``--overwrite`` and only when it holds an earlier export of this kind."""
    from minlm.outputs import check_target

    check_target(out, kind, overwrite=overwrite, source=run.path)


def _sp_proto(tokenizer):
    """The parsed sentencepiece model (pieces, scores, types, normaliser) of ``tokenizer``."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.to_bytes())
    return proto


# --- transformers --------------------------------------------------------------------------

def hf_tokenizer(tokenizer):
    """A ``transformers`` fast tokenizer that gives the same ids as ``tokenizer`` (a minlm
    sentencepiece or Hugging Face tokenizer), converted by ``transformers`` itself."""
    from minlm.tokenizer import HFTokenizer, SentencePieceTokenizer

    specials = {"bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
                "eos_token": tokenizer.id_to_piece(tokenizer.eos_id)}
    if isinstance(tokenizer, SentencePieceTokenizer):
        from transformers import LlamaTokenizer

        proto = _sp_proto(tokenizer)
        specials.update(unk_token=tokenizer.id_to_piece(tokenizer.sp.unk_id()),
                        pad_token=tokenizer.id_to_piece(tokenizer.pad_id))
        with tempfile.TemporaryDirectory() as d:  # the converter reads a folder's tokenizer.model
            Path(d, "tokenizer.model").write_bytes(tokenizer.to_bytes())
            return LlamaTokenizer.from_pretrained(
                d, legacy=False, add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
                add_bos_token=True, add_eos_token=False, **specials)  # minlm trains with bos
    if isinstance(tokenizer, HFTokenizer):
        from transformers import PreTrainedTokenizerFast

        try:
            specials["pad_token"] = tokenizer.id_to_piece(tokenizer.pad_id)
        except ValueError:  # GPT-2 style vocabularies have no pad token; transformers copes
            pass
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer.tk, **specials)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no transformers counterpart; "
                     "export needs a sentencepiece (.model) or Hugging Face (tokenizer.json) one")


def _chat_template(tokenizer) -> str | None:
    """The Jinja form of minlm's chat layout (``minlm.chatdata``), for ``apply_chat_template``."""
    try:
        tokenizer.chat_tokens
    except ValueError:
        return None
    return ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _card(run, family: str, where: str) -> str:
    """The run's own README under a Hugging Face front matter, with how to load the export."""
    readme = Path(run.path) / "README.md"
    body = readme.read_text() if readme.exists() else f"# {run.name}\n"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
             "- minlm", f"- {family}", "---", ""]
    use = ["## Use outside minlm", "",
           f"Exported by `python -m minlm export {run.name} --format hf`.", "", "```python",
           "from transformers import AutoModelForCausalLM, AutoTokenizer",
           f"model = AutoModelForCausalLM.from_pretrained({where!r})",
           f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
           'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
           "print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))", "```", ""]
    return "\n".join(front) + body.rstrip() + "\n\n" + "\n".join(use)


def export_hf(run, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``run`` (a name, folder or loaded Run) as a ``transformers`` folder at ``out``.

    The folder is built beside ``out`` and swapped into place, so a crash leaves no half
    export; it carries ``minlm-output.json`` (what it is and which run it came from), which is
    what lets a later ``--overwrite`` replace it. Returns ``out``."""
    from minlm.interop import family_of, to_hf

    run, out = _load(run), Path(out)
    try:
        family = family_of(run.model_config)
    except ValueError as e:
        raise ValueError(f"cannot export {run.name}: {e}") from None
    _check_out(out, "hf-export", run, overwrite)
    tok = run.tokenizer
    hf = to_hf(run.model)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for k, v in ids.items():
        setattr(hf.config, k, v)
        setattr(hf.generation_config, k, v)
    hf_tok = hf_tokenizer(tok)
    template = _chat_template(tok)
    if template:
        hf_tok.chat_template = template
        if run.meta.get("parent"):  # a chat-tuned run: a reply ends at <|end|>, as in minlm
            hf.generation_config.eos_token_id = [tok.eos_id, tok.chat_tokens["end"]]
    from minlm.outputs import staged

    with staged(out, "hf-export", run.path) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(run, family, str(out)))
    return out


# --- GGUF ----------------------------------------------------------------------------------

def _import_gguf():
    import gguf  # the export extra; a command names it when missing (errors.missing_module)

    return gguf


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from ``transformers``' RoPE layout (each head's first half rotates with its
    second half) to llama.cpp's (adjacent pairs rotate): row ``h, s, j`` -> ``h, j, s``."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def rope_deinterleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``rope_interleave``."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, dtype: str = "f32") -> dict[str, tuple]:
    """GGUF name -> numpy array, as ``export_gguf`` writes them: the ``transformers`` weights
    (``minlm.interop``) under gguf's own name map, q/k rows interleaved for llama.cpp's RoPE,
    2-D weights in ``dtype``, norms in f32 (llama.cpp's convention). The head is written even
    when tied, so readers that do not tie it load the same model. Values are (array, raw gguf
    type or None): q8_0 arrays are already quantised by gguf's own ``quants.quantize``."""
    import numpy as np

    from minlm.interop import family_of, to_hf_state_dict

    gguf = _import_gguf()
    cfg = model.config
    if family_of(cfg) != "llama":
        raise ValueError(f"GGUF export supports llama-family runs; position={cfg.position!r} "
                         "(a gpt2-family run) is not written by this exporter; use --format hf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    out = {}
    for hf_name, t in to_hf_state_dict(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"gguf has no llama tensor name for {hf_name!r}")
        t = t.float()
        if hf_name.endswith("q_proj.weight"):
            t = rope_interleave(t, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rope_interleave(t, cfg.kv_heads)
        arr = t.numpy()
        if arr.ndim == 2 and dtype == "f16":
            out[name] = (arr.astype(np.float16), None)
        elif arr.ndim == 2 and dtype == "q8_0" and arr.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            out[name] = (gguf.quants.quantize(arr, q8), q8)
        else:  # norms, and rows that do not split into blocks of 32, stay f32
            out[name] = (arr, None)
    return out


def export_gguf(run, out: str | os.PathLike, dtype: str = "f16", overwrite: bool = False) -> Path:
    """Write ``run`` as one GGUF file (llama architecture, sentencepiece vocabulary inside),
    marked as minlm's by the ``minlm.output`` header key (``minlm.outputs``)."""
    import json

    from minlm.outputs import GGUF_KEY, marker, staged
    from minlm.tokenizer import SentencePieceTokenizer

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported for GGUF; choose one of "
                         f"{GGUF_DTYPES}")
    gguf = _import_gguf()
    run, out = _load(run), Path(out)
    cfg, tok = run.model_config, run.tokenizer
    try:
        tensors = gguf_tensors(run.model, dtype)
    except ValueError as e:
        raise ValueError(f"cannot export {run.name}: {e}") from None
    if not isinstance(tok, SentencePieceTokenizer):
        raise ValueError(f"cannot export {run.name} to GGUF: its tokenizer is a "
                         f"{type(tok).__name__}; GGUF export writes sentencepiece vocabularies")
    _check_out(out, "gguf-export", run, overwrite)
    proto = _sp_proto(tok)
    with staged(out, "gguf-export", run.path, file=True) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(run.name)
        w.add_string(GGUF_KEY, json.dumps(marker("gguf-export", run.path)))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_key_length(cfg.head_size)
        w.add_value_length(cfg.head_size)
        w.add_rope_dimension_count(cfg.head_size)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
        w.add_token_scores([p.score for p in proto.pieces])
        w.add_token_types([int(p.type) for p in proto.pieces])  # sentencepiece's numbering = gguf's
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_unk_token_id(tok.sp.unk_id())
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        for name, (arr, raw_dtype) in tensors.items():
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def export_run(run, fmt: str, out: str | os.PathLike, dtype: str = "f16",
               overwrite: bool = False) -> Path:
    """``export_hf`` or ``export_gguf`` by ``fmt`` (``"hf"`` or ``"gguf"``)."""
    if fmt == "hf":
        return export_hf(run, out, overwrite=overwrite)
    if fmt == "gguf":
        return export_gguf(run, out, dtype=dtype, overwrite=overwrite)
    raise ValueError(f"--format {fmt!r} is not supported; choose one of {FORMATS}")
