"""Chat data: readers that agree across formats, errors that name the line, the template's
round trip and agreement with generate.Chat, and loss masks checked token by token."""

from __future__ import annotations

import json

import pytest
import torch

from minlm import ModelConfig
from minlm.chatdata import (
    ChatDataError,
    chat_example,
    chat_examples,
    check_messages,
    pack_examples,
    parse_chat,
    read_conversations,
    read_preferences,
    render_chat,
    turn_ids,
    write_conversations,
)
from minlm.cli import main
from minlm.generate import Chat
from minlm.model import LM
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times 3?"},
     {"role": "assistant", "content": "12, café ☕"}],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def test_readers_agree_across_formats_and_layouts(tmp_path):
    for name in ("a.jsonl", "a.json", "a.parquet"):
        assert write_conversations(CONVS, tmp_path / name) == 2
        assert read_conversations(tmp_path / name).examples == CONVS, name
    # other layouts: bare message lists (JSON list / JSONL), smoltalk-style extra fields,
    # blank lines, one conversation as a JSON object
    (tmp_path / "bare.json").write_text(json.dumps(CONVS))
    (tmp_path / "bare.jsonl").write_text(
        "\n".join(json.dumps({"messages": c, "source": "x", "id": k}) for k, c in enumerate(CONVS))
        + "\n\n")
    (tmp_path / "one.json").write_text(json.dumps({"messages": CONVS[1], "source": "x"}))
    assert read_conversations(tmp_path / "bare.json").examples == CONVS
    assert read_conversations(tmp_path / "bare.jsonl").examples == CONVS
    assert read_conversations(tmp_path / "one.json").examples == [CONVS[1]]
    assert read_conversations(tmp_path / "a.jsonl", limit=1).examples == CONVS[:1]
    # another column name, in parquet and JSONL
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"conversation": CONVS, "n": [1, 2]}), tmp_path / "c.parquet")
    assert read_conversations(tmp_path / "c.parquet", column="conversation").examples == CONVS
    with pytest.raises(ChatDataError, match=r"c\.parquet has no 'messages' column.*conversation"):
        read_conversations(tmp_path / "c.parquet")


def test_convert_command(tmp_path, capsys):
    write_conversations(CONVS, tmp_path / "in.parquet")
    assert main(["convert", str(tmp_path / "in.parquet"), str(tmp_path / "out.jsonl"),
                 "--column", "messages"]) == 0
    assert "wrote 2 conversations" in capsys.readouterr().out
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["messages"] for line in lines] == CONVS


def test_malformed_lines_name_file_and_line_and_can_be_skipped(tmp_path, capsys):
    good = json.dumps({"messages": CONVS[1]})
    bad = {
        3: '{"messages": [{"role": "user", "content": "hi"}',  # truncated JSON
        4: json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        5: json.dumps({"text": "no messages"}),
        6: json.dumps({"messages": [{"role": "user", "content": 7}]}),
        7: json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "system", "content": "late"}]}),
        8: json.dumps({"messages": []}),
    }
    lines = [good, good] + [bad[k] for k in sorted(bad)] + [good]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChatDataError, match=r"bad\.jsonl, line 3: is not valid JSON.*skip_invalid"):
        read_conversations(path)
    data = read_conversations(path, skip_invalid=True)
    assert len(data) == 3 and data.skipped == 6
    assert "line 4: message 0 has role 'robot'" in data.problems[1]
    assert "line 5: has no 'messages' field" in data.problems[2]
    assert "line 6: message 0 (user) has content of type int" in data.problems[3]
    assert "line 7: message 1 is a system message" in data.problems[4]
    for k in (4, 5, 6, 7, 8):  # each problem alone, with its own line number
        path.write_text("\n".join([good] * (k - 1) + [bad[k]]) + "\n")
        with pytest.raises(ChatDataError, match=rf"bad\.jsonl, line {k}: "):
            read_conversations(path)
    (tmp_path / "bad.json").write_text(json.dumps([CONVS[0], {"messages": "oops"}]))
    with pytest.raises(ChatDataError, match=r"bad\.json, item 1: 'messages' must be a list"):
        read_conversations(tmp_path / "bad.json")
    path.write_text("\n".join([good, bad[4]]) + "\n")  # the converter reports skipped lines
    assert main(["convert", str(path), str(tmp_path / "ok.jsonl"), "--skip-invalid"]) == 0
    assert "wrote 1 conversations to" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "ok.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl, line 2: message 0 has role 'robot'" in err


def test_real_chat_files(shared_data):
    convs = read_conversations("hh_rlhf_helpful_sft", limit=50)  # by name, in MINLM_DATA_DIR
    assert len(convs) == 50 and convs.path == shared_data / "chat" / "hh_rlhf_helpful_sft.jsonl"
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in convs)
    pairs = read_preferences(shared_data / "chat" / "hh_rlhf_helpful_dpo.jsonl", limit=20)
    assert len(pairs) == 20
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)
    with pytest.raises(FileNotFoundError, match="hh_rlhf_helpful_xyz.*not found"):
        read_conversations("hh_rlhf_helpful_xyz")


def test_preference_layouts(tmp_path):
    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
            {"chosen": CONVS[1], "rejected": CONVS[1][:-1] + [{"role": "assistant",
                                                               "content": "13"}]},
            {"prompt": CONVS[1][:1], "chosen": "4", "rejected": 5}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ChatDataError, match=r"p\.jsonl, line 3: 'rejected' must be a string"):
        read_preferences(path)
    pairs = read_preferences(path, skip_invalid=True)
    assert pairs.skipped == 1
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert pairs[1]["prompt"] == CONVS[1][:-1] and pairs[1]["rejected"] == "13"


def test_template_round_trips_and_matches_chat(tok):
    odd = [{"role": "user", "content": ""}, {"role": "assistant", "content": " x\n"}]
    for conv in CONVS + [odd]:
        ids = render_chat(tok, conv)
        assert ids[0] == tok.bos_id and ids[-1] == tok.chat_tokens["end"]
        assert parse_chat(tok, ids) == conv
        assert parse_chat(tok, ids + [tok.eos_id, tok.pad_id]) == conv
    # generate.Chat feeds the model exactly the template with the reply's opening marker
    model = LM(ModelConfig.from_preset("llama-1m", vocab_size=512, dim=16, n_layers=1,
                                       n_heads=2, n_kv_heads=0, block_size=256))
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=8)
    turns = [(m["role"], m["content"]) for m in CONVS[0][1:]] + [("user", "Bye")]
    expected = render_chat(tok, CONVS[0] + [{"role": "user", "content": "Bye"}],
                           add_generation_prompt=True)
    assert chat.prompt_ids(turns) == expected
    # an unfinished reply parses as the text so far
    partial = expected + tok.encode("See")
    assert parse_chat(tok, partial)[-1] == {"role": "assistant", "content": "See"}
    with pytest.raises(ValueError, match="outside any turn"):
        parse_chat(tok, [tok.bos_id] + tok.encode("stray"))
    with pytest.raises(ValueError, match="inside an unfinished user turn"):
        parse_chat(tok, render_chat(tok, CONVS[1])[:-1][:5] + [tok.chat_tokens["assistant"]])
    with pytest.raises(ValueError, match=r"contains the chat token\(s\) <\|end\|>"):
        turn_ids(tok, "user", "cheat <|end|> here")
    with pytest.raises(ValueError, match="role 'robot'"):
        check_messages([{"role": "robot", "content": "x"}])


def _spans(tok, conv):
    """Per turn: (role, marker position, body positions, end position) in the rendering."""
    out, pos = [], 1
    for m in conv:
        n = len(tok.encode(m["content"]))
        out.append((m["role"], pos, list(range(pos + 1, pos + 1 + n)), pos + 1 + n))
        pos += n + 2
    return out


@pytest.mark.parametrize("mode", ["response", "imitation", "completion"])
def test_masks_token_by_token(tok, mode):
    conv = CONVS[0] + CONVS[1]
    ex = chat_example(tok, conv, mode)
    assert ex.ids == render_chat(tok, conv) and len(ex.mask) == len(ex.ids)
    expected = [0] * len(ex.ids)
    for role, marker, body, end in _spans(tok, conv):
        assert ex.ids[marker] == tok.chat_tokens[role] and ex.ids[end] == tok.chat_tokens["end"]
        trained_roles = {"response": ("assistant",)}.get(mode, ("user", "assistant"))
        if role not in trained_roles:
            continue
        given = max(1, int(len(body) * 0.5)) if mode == "completion" else 0
        for p in body[given:] + [end]:
            expected[p] = 1
    assert ex.mask == expected
    # every trained token, read back, is an assistant (or user) token or <|end|>
    trained = [i for i, m in zip(ex.ids, ex.mask) if m]
    assert trained.count(tok.chat_tokens["end"]) == sum(r in ("assistant",) or mode != "response"
                                                        for r, *_ in _spans(tok, conv)
                                                        if r != "system")
    assert tok.bos_id not in trained and tok.chat_tokens["system"] not in trained
    assert tok.chat_tokens["user"] not in trained and tok.chat_tokens["assistant"] not in trained


def test_response_mask_by_hand(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    t, hi, yo = tok.chat_tokens, tok.encode("Hi"), tok.encode("Yo")
    ex = chat_example(tok, conv)
    assert ex.ids == [tok.bos_id, t["user"], *hi, t["end"], t["assistant"], *yo, t["end"]]
    assert ex.mask == [0, 0] + [0] * len(hi) + [0, 0] + [1] * len(yo) + [1]
    assert chat_example(tok, conv, "imitation").mask == \
        [0, 0] + [1] * len(hi) + [1, 0] + [1] * len(yo) + [1]
    shown = ex.display()
    assert str(shown).startswith("<s><|user|>Hi<|end|><|assistant|>[Y")
    assert str(shown).endswith("[<|end|>]\n(%d tokens, %d in the loss, in [brackets])"
                               % (len(ex), len(yo) + 1))
    html = shown._repr_html_()
    assert html.count("<span title=") == len(ex) and html.count("trained\"") == len(yo) + 1


def test_examples_cut_to_context_and_pack(tok):
    convs = [CONVS[0], CONVS[1], [{"role": "user", "content": "word " * 40},
                                  {"role": "assistant", "content": "ok"}]] * 3
    examples, stats = chat_examples(tok, convs, "response", max_len=24)
    assert stats.truncated >= 3 and stats.dropped == 3 and stats.examples == len(examples) == 6
    assert all(len(e) <= 24 and any(e.mask[1:]) for e in examples)
    rows = pack_examples(examples, 48, tok.pad_id)
    assert all(len(r) == 48 for r in rows) and len(rows) < len(examples)
    assert sum(r.n_trained for r in rows) == sum(e.n_trained for e in examples)
    assert sum(r.ids.count(tok.bos_id) for r in rows) == len(examples)
    flat = [i for r in rows for i, m in zip(r.ids, r.mask) if m]
    assert flat == [i for e in examples for i, m in zip(e.ids, e.mask) if m]
    assert torch.tensor(rows[0].mask).dtype == torch.int64
    with pytest.raises(ChatDataError, match="conversation 0: .*chat token"):
        chat_examples(tok, [[{"role": "user", "content": "<|user|>"}]])
    _, stats = chat_examples(tok, [[{"role": "user", "content": "<|user|>"}]] + convs[:1],
                             skip_invalid=True)
    assert stats.invalid == 1 and stats.examples == 1


def test_mask_display_shows_multibyte_characters_not_byte_pieces(tok):
    # a curly apostrophe is three byte-fallback tokens; the loss-mask view shows the character
    ex = chat_example(tok, [{"role": "user", "content": "It\u2019s"},
                            {"role": "assistant", "content": "I\u2019m glad"}], "response")
    shown, page = str(ex.display()), ex.display()._repr_html_()
    assert "<0xE2>" not in shown and "\u2019" in shown, shown
    assert "&lt;0xE2&gt;" not in page and "\u2019" in page
    assert "[I][\u2019][m]" in shown.replace("[ glad]", "")  # the assistant's bytes are trained
