"""The tokenizer module: BPE training, ChatML template, the shipped default, corpus reading, loading errors."""

from __future__ import annotations

import hashlib
import json
import os
import platform

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
from transformers import AutoTokenizer

from minimind_v import MiniMindVConfig
from minimind_v.data.skips import SkipStats
from minimind_v.data.tokenizer import (CHAT_TEMPLATE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, build_default_tokenizer,
                                  default_tokenizer_path, image_placeholder_config, iter_text_files, load_tokenizer,
                                  train_from_files, train_tokenizer)

CORPUS = [
    "what color is the shape? the shape is blue.",
    "does the image contain a circle? yes, a red circle.",
    "The quick brown fox jumps over the lazy dog.",
    "这张图片里有一个蓝色的圆形。",
    "<|im_start|>user\nwhat shape is it?<|im_end|>\n<|im_start|>assistant\ntriangle<|im_end|>\n",
] * 20
ROUND_TRIP = ["hello world", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "你好，世界！图像与语言。",
              "emoji 🙂🚀👩‍👩‍👧", "mixed: naïve café — ½ ∑ ∞ € ¥", "\x00\x7f odd bytes", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|image_pad|>What shape?"},
            {"role": "assistant", "content": "circle"}]
EXPECTED_CHAT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|image_pad|>What shape?<|im_end|>\n"
                 "<|im_start|>assistant\ncircle<|im_end|>\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(CORPUS, 300, out), out


def test_special_token_layout(trained):
    tok, _ = trained
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 0)
    assert tok.convert_ids_to_tokens([4, 259]) == ["!", "Ń"]  # the 256 byte symbols follow the specials
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert tok.model_max_length == 32768


def test_vocab_size_respected(trained):
    tok, _ = trained
    assert len(tok) == 300
    small = train_tokenizer(["ab"] * 3, 1000)  # a tiny corpus stops early, never overshoots
    assert MIN_VOCAB_SIZE < len(small) < 1000


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_any_text_round_trips(trained, text):
    tok, _ = trained
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_image_pad_is_one_token(trained):
    tok, _ = trained
    assert tok("<|image_pad|>" * 5, add_special_tokens=False)["input_ids"] == [3] * 5
    assert tok("a<|image_pad|><|image_pad|>b", add_special_tokens=False)["input_ids"][1:3] == [3, 3]
    assert tok.decode([3, 3], skip_special_tokens=True) == ""
    assert not any("<|" in t or "|>" in t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)  # no merge spans one


def test_no_special_tokens_added_when_encoding(trained):
    tok, _ = trained
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]


def test_chat_template(trained):
    tok, _ = trained
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT
    assert (tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
            == EXPECTED_CHAT.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"  # no system prompt injected


def test_saved_folder_reloads_identically(trained):
    tok, out = trained
    again = AutoTokenizer.from_pretrained(out)
    loaded = load_tokenizer(out)
    for other in (again, loaded):
        assert len(other) == len(tok)
        for text in ROUND_TRIP + [EXPECTED_CHAT]:
            assert other(text)["input_ids"] == tok(text)["input_ids"]
        assert other.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT
        assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (1, 2, 0)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(CORPUS, 259)


def test_image_placeholder_config(trained):
    tok, _ = trained
    fields = image_placeholder_config(tok)
    assert fields == {"image_special_token": "<|image_pad|>", "image_ids": [3]}
    config = MiniMindVConfig(vocab_size=len(tok), image_token_len=64, **fields)
    assert config.image_token_id == 3 and config.image_token_len == 64


def test_image_placeholder_config_needs_the_token(tokenizer):
    with pytest.raises(ValueError, match="no <\\|image_pad\\|> token"):
        image_placeholder_config(tokenizer)  # conftest's tokenizer has only the 3 ChatML specials


# ------------------------------------------------------------------------------------------ the shipped default

def test_default_tokenizer():
    assert os.path.isdir(default_tokenizer_path())
    tok = load_tokenizer()
    assert len(tok) == 2048
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert image_placeholder_config(tok) == {"image_special_token": "<|image_pad|>", "image_ids": [3]}
    for question in ["what color is the shape?", "does the image contain a rectangle?", "what is the blue shape?"]:
        assert len(tok(question)["input_ids"]) <= 8, question
    for answer in ["circle", "rectangle", "triangle", "yes", "no", "blue", "teal", "gray"]:
        assert len(tok(answer)["input_ids"]) == 1, answer
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED_CHAT
    for text in ROUND_TRIP:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_default_tokenizer_folder_is_small():
    folder = default_tokenizer_path()
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size < 1_000_000
    assert {"tokenizer.json", "tokenizer_config.json", "README.txt"} <= set(os.listdir(folder))


@pytest.mark.slow
def test_default_tokenizer_is_reproducible(tmp_path):
    readme = open(os.path.join(default_tokenizer_path(), "README.txt"), encoding="utf-8").read()
    if f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}." not in readme:
        pytest.skip("the default was built with another Python/tokenizers version")
    pytest.importorskip("easy_vqa")
    build_default_tokenizer(tmp_path)
    digest = hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    shipped = hashlib.sha256(open(os.path.join(default_tokenizer_path(), "tokenizer.json"), "rb").read()).hexdigest()
    assert digest == shipped and digest in readme


# ----------------------------------------------------------------------------------------------- reading corpora

def test_iter_text_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  \nsecond line\r\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes("\n".join([
        json.dumps({"text": "plain text"}),
        "{not json",
        json.dumps({"conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}),
        json.dumps({"conversations": json.dumps([{"role": "user", "content": "q2"}])}),
        json.dumps({"other": 1}),
        json.dumps([1, 2]),
        "",
    ]).encode() + b"\n\xff\xfe bad bytes\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"conversations": [
        json.dumps([{"role": "user", "content": "pq1"}, {"role": "assistant", "content": "pa1"}]),
        "not json",
        json.dumps([{"role": "user", "content": "pq2"}]),
    ]}), parquet)
    listed = tmp_path / "d.parquet"
    pq.write_table(pa.table({"conversations": [[{"role": "user", "content": "lq"}, {"role": "assistant",
                                                                                       "content": "la"}]]}), listed)
    stats = SkipStats()
    texts = list(iter_text_files([txt, jsonl, parquet, str(listed)], stats))
    chat = lambda *turns: "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in zip(("user", "assistant"), turns))  # noqa: E731
    assert texts == ["first line", "second line", "plain text", chat("q1", "a1"), chat("q2"), chat("pq1", "pa1"),
                     chat("pq2"), chat("lq", "la")]  # a conversation as the chat template writes it
    assert stats.total == 2 + 7 + 3 + 1  # the records read: lines of text and JSON, rows of parquet
    assert stats.counts == {"bad json": 3, "bad record": 2}  # the bad UTF-8 line is bad JSON as training reads it
    assert "skipped 5 of 13 records" in stats.summary()
    assert list(iter_text_files([tmp_path])) == texts  # a folder: its files, sorted


def test_a_tokenizer_trained_on_conversations_has_its_role_headers_and_answers_as_tokens(tmp_path):
    """Conversations are read as the model reads them: "assistant" and an answer at a line's start become single
    tokens, an image marker becomes the placeholder token (never merged into text)."""
    data = tmp_path / "chats.jsonl"
    turns = lambda q, a: [{"role": "user", "content": "<image>\n" + q}, {"role": "assistant", "content": a}]  # noqa: E731
    data.write_text("\n".join(json.dumps({"conversations": turns(f"is there a {c} shape?", a)})
                              for c in ("red", "blue", "green") * 20 for a in ("yes", "no")), encoding="utf-8")
    train_from_files([data], vocab_size=300, out_dir=tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    text = tok.apply_chat_template(turns("is there a red shape?", "yes"), tokenize=False)
    pieces = tok.convert_ids_to_tokens(tok(text.replace("<image>", "<|image_pad|>"))["input_ids"])
    assert "assistant" in pieces and "user" in pieces and "yes" in pieces and "<|image_pad|>" in pieces
    assert not any("image" in p and p != "<|image_pad|>" for p in pieces)


def test_iter_text_files_text_column_and_errors(tmp_path):
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"]}), parquet)
    stats = SkipStats()
    assert list(iter_text_files([parquet], stats)) == ["one", "two"] and stats.counts == {"bad record": 1}
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe\n")
    stats = SkipStats()
    assert list(iter_text_files([tmp_path / "bad.txt"], stats)) == ["fine"] and stats.counts == {"not UTF-8": 1}
    with pytest.raises(FileNotFoundError):
        list(iter_text_files([tmp_path / "missing.txt"]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_text_files([tmp_path / "x.csv"]))
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "img.parquet")
    with pytest.raises(ValueError, match="no 'conversations' or 'text' column"):
        list(iter_text_files([tmp_path / "img.parquet"]))
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="cannot read parquet"):
        list(iter_text_files([tmp_path / "broken.parquet"]))


def test_train_from_files(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS) + "\n{bad\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = train_from_files([str(data)], 280, str(out))
    assert "vocab size 280" in summary and f"{len(CORPUS)} texts" in summary and str(out) in summary
    assert "1 bad json" in summary
    assert load_tokenizer(out)("<|image_pad|>")["input_ids"] == [3]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        train_from_files([empty], 280, tmp_path / "out2")


# ------------------------------------------------------------------------------------------------------ loading

def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "model")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{garbage")
    with pytest.raises((ValueError, OSError)):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(NotADirectoryError):
        load_tokenizer(tmp_path / "file.json")
