"""Issue 17's broken paths outside the command line: a model vocabulary larger than its
tokenizer's, a GPT-2 style tokenizer without a pad token, packed weights in a run folder."""

import pytest
import torch

from minlm.config import ModelConfig
from minlm.generate import complete
from minlm.model import LM
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    shape = dict(vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=0, block_size=64,
                 multiple_of=8)
    return ModelConfig.from_preset("llama-1m", **{**shape, **overrides})


def test_generation_never_samples_an_id_the_tokenizer_lacks():
    """Training allows vocab_size above the tokenizer's (a round size); those ids have no text."""
    tok = load_tokenizer("tinystories-512")
    model = LM(tiny(vocab_size=640, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.head.weight[:512] = 0  # the unused ids are the likeliest: some score > 0
        model.head.weight[512:576] = torch.randn(64, 32) * 10
        model.head.weight[576:] = -model.head.weight[512:576]
    for temperature in (0.0, 1.0):
        out = complete(model, tok, ["Once upon", "A"], 20, temperature=temperature, seed=0)
        assert all(i < 512 for c in out for i in c.ids)
        assert all(len(c.ids) == 20 for c in out)


@pytest.fixture(scope="module")
def gpt2_style(shared_data, tmp_path_factory):
    """A byte-level BPE saved as vocab.json + merges.txt whose only special is <|endoftext|>."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minlm.data import read_documents

    stories = list(itertools.islice(read_documents(shared_data / "tinystories" / "valid.txt"), 50))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(stories, trainer)
    folder = tmp_path_factory.mktemp("gpt2-style")
    tk.model.save(str(folder))
    return folder


def test_a_run_with_a_gpt2_style_tokenizer_generates(gpt2_style, tmp_path, monkeypatch, capsys):
    from minlm.cli import main

    tok = load_tokenizer(gpt2_style)
    assert tok.pad_id == tok.eos_id  # no pad token: EOS stands in, as in GPT-2
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--preset", "llama-0.5m", f"vocab_size={tok.vocab_size}", "dim=32",
                 "n_layers=1", "n_heads=2", "n_kv_heads=1", "block_size=32", "max_iters=2",
                 "max_docs=50", "eval_iters=1", "eval_interval=2", "num_workers=1",
                 "verbose=false", f"tokenizer={gpt2_style}", f"out_dir={tmp_path}",
                 "run_name=gpt2tok"]) == 0
    capsys.readouterr()
    run = tmp_path / "gpt2tok"
    assert main(["generate", str(run), "Once upon a time", "The dog", "--max-new-tokens", "5",
                 "--seed", "0"]) == 0  # two prompts of different lengths: left padding
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and "The dog" in out, err


def test_load_packed_model_accepts_a_run_folder(tmp_path):
    from minlm.ternary import PACKED_NAME, load_packed_model, pack_ternary_model

    model = LM(tiny(linear="bitlinear")).eval()
    pack_ternary_model(model, tmp_path / "run" / PACKED_NAME)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_packed_model(tmp_path / "run")(idx)[0],
                           load_packed_model(tmp_path / "run" / PACKED_NAME)(idx)[0])
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=f"other has no {PACKED_NAME}"):
        load_packed_model(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no packed model at .*nope: no such file"):
        load_packed_model(tmp_path / "nope")
