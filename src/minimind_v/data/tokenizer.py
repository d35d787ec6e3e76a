"""Tokenizers for MiniMind-V: train a byte-level BPE with ChatML and image placeholder tokens, load one, ship a default.

Every tokenizer made here has the same layout as MiniMind's own:

    id 0  <|endoftext|>   pad and unk
    id 1  <|im_start|>    bos
    id 2  <|im_end|>      eos
    id 3  <|image_pad|>   the image placeholder (one token; an image is a run of `image_token_len` of them)
    4..259                the 256 byte symbols of the byte-level alphabet, so any UTF-8 text is encodable
    260..                 the learned merges

and a plain ChatML chat template (`CHAT_TEMPLATE`, no default system prompt).

    tok = train_tokenizer(texts, vocab_size=6400, out_dir="my_tokenizer")
    tok = load_tokenizer()                        # the shipped default (2048 tokens), see `build_default_tokenizer`
    config = MiniMindVConfig(vocab_size=len(tok), **image_placeholder_config(tok), image_token_len=64)

The shipped default (`default_tokenizer/`) is rebuilt, byte for byte on the same Python and `tokenizers` versions, by
`python -m minimind_v.data.tokenizer [OUT_DIR]`; its README.txt records how it was built.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..config import CHAT_TEMPLATE, IMAGE_MARKER
from .records import SUPPORTED_EXTENSIONS, iter_records
from .skips import NOT_UTF8, SkipStats

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_PAD_TOKEN]  # ids 0, 1, 2, 3 in this order
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE  # 260: the specials and the byte alphabet, no merges
MODEL_MAX_LENGTH = 32768


def chatml_text(turns: list[dict]) -> str:
    """A conversation as the model reads it (`CHAT_TEMPLATE`), each image marker as the placeholder token: what a
    tokenizer should learn from, so the role headers and answers at a line's start become tokens of their own."""
    return "".join(f"{BOS_TOKEN}{t['role']}\n{str(t['content']).replace(IMAGE_MARKER, IMAGE_PAD_TOKEN)}{EOS_TOKEN}\n"
                   for t in turns)


TEXT_SUFFIXES = (".txt", *SUPPORTED_EXTENSIONS)
DEFAULT_VOCAB_SIZE = 2048


# --------------------------------------------------------------------------------------------------------- training

def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` -> a fast tokenizer (saved with `save_pretrained(out_dir)` when given).

    `vocab_size` counts everything: the 4 special tokens, the 256 byte symbols and the merges; it is an upper bound
    (a small corpus with `min_frequency` pairs may stop earlier: check `len(tokenizer)`). The special tokens are
    split off before BPE, so `<|image_pad|>` in a text is always the single id 3."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                         f"tokens ({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET_SIZE} byte symbols)")
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not one string")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    tokenizer = wrap_tokenizer(bpe)
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


_SPECIAL_SPLIT = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """The trainer does not split special tokens off as encoding does: cut texts at them, so no merge spans one."""
    for text in texts:
        if isinstance(text, str):
            yield from (piece for piece in _SPECIAL_SPLIT.split(text) if piece)


def wrap_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` with our special tokens -> the transformers tokenizer (ChatML template set)."""
    for i, token in enumerate(SPECIAL_TOKENS):
        if bpe.token_to_id(token) != i:
            raise ValueError(f"special token {token!r} must have id {i}, has {bpe.token_to_id(token)}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                        pad_token=PAD_TOKEN, unk_token=PAD_TOKEN,
                                        extra_special_tokens=[IMAGE_PAD_TOKEN], model_max_length=MODEL_MAX_LENGTH)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_from_files(files: str | os.PathLike | Iterable[str | os.PathLike], vocab_size: int = 6400,
                     out_dir: str | os.PathLike = "tokenizer", min_frequency: int = 2) -> str:
    """`minimind-v tokenizer train`: train on .txt/.json/.jsonl/.parquet files (see `iter_text_files`), save to
    `out_dir`, return a one-paragraph summary (vocab size, texts read, skipped records, output folder)."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not paths:
        raise ValueError("no data files given")
    stats, read = SkipStats(), []

    def counted() -> Iterator[str]:
        for text in iter_text_files(paths, stats):
            read.append(len(text))
            yield text

    tokenizer = train_tokenizer(counted(), vocab_size, out_dir, min_frequency)
    if not read:
        raise ValueError(f"no text found in {', '.join(map(os.fspath, paths))} ({stats.summary()})")
    lines = [f"trained a byte-level BPE tokenizer: vocab size {len(tokenizer)} (asked for {vocab_size})",
             f"corpus: {len(read)} texts ({sum(read):,} characters); {stats.summary()}",
             "special tokens: " + ", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS)),
             f"saved to {os.path.abspath(out_dir)}"]
    if len(tokenizer) < vocab_size:
        lines.insert(1, f"note: the corpus only supports {len(tokenizer)} tokens at min_frequency={min_frequency}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- reading text

def iter_text_files(paths: Iterable[str | os.PathLike], stats: SkipStats | None = None) -> Iterator[str]:
    """Texts for tokenizer training, in file order. A folder stands for its .txt/.json/.jsonl/.parquet files
    (recursively, sorted). `.txt`: one text per non-blank line; the others are read as training data is
    (records.py): a record's `text`, or its conversation as `chatml_text` writes it. Unreadable lines and records are
    skipped and counted in `stats` (`stats.total` counts the records read); a missing file, an unknown suffix or an
    unreadable parquet file raises."""
    stats = stats if stats is not None else SkipStats()
    for path in _expand(paths):
        if path.suffix.lower() == ".txt":
            yield from _txt_texts(path, stats)
            continue
        for record in iter_records(path, stats=stats, text_only=True):
            text = record["text"] if "text" in record else chatml_text(record["conversations"])
            if text:
                yield text


def _expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files in folder {p}")
            files.extend(found)
        elif not p.exists():
            raise FileNotFoundError(f"data file not found: {p}")
        elif p.suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"unsupported data file {p}: expected one of {', '.join(TEXT_SUFFIXES)}")
        else:
            files.append(p)
    return files


def _txt_texts(path: Path, stats: SkipStats) -> Iterator[str]:
    """The non-blank lines, without their line breaks; a line that is not UTF-8 is skipped and counted."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            stats.total += 1
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                stats.add(NOT_UTF8, f"{path}:{number}")


# --------------------------------------------------------------------------------------------------------- loading

def default_tokenizer_path() -> str:
    """The folder of the tokenizer shipped inside the package (2048 tokens; see `build_default_tokenizer`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_tokenizer")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """None -> the shipped default; else a local Hugging Face tokenizer folder (a tokenizer or model folder saved with
    `save_pretrained`), loaded with `AutoTokenizer`. Raises FileNotFoundError for a missing folder or one that holds
    no tokenizer files, ValueError when transformers cannot load what is there."""
    path = default_tokenizer_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"a tokenizer is a folder (with tokenizer.json, tokenizer_config.json, ...), "
                                 f"not a file: {path}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer: none of {', '.join(_TOKENIZER_FILES)} is there "
                                "(train one with `minimind-v tokenizer train`, or pass the folder it was saved to)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e


def image_placeholder_config(tokenizer) -> dict:
    """The MiniMindVConfig fields that make a model use this tokenizer's image placeholder:
    `{"image_special_token": "<|image_pad|>", "image_ids": [id]}`. `image_token_len` (visual tokens per image) is the
    vision tower's business and is left to the caller. ValueError if `<|image_pad|>` is not one token here."""
    token_id = tokenizer.get_vocab().get(IMAGE_PAD_TOKEN)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {IMAGE_PAD_TOKEN} token; train one with this module's "
                         "train_tokenizer, or configure image_special_token/image_ids by hand")
    ids = tokenizer(IMAGE_PAD_TOKEN * 2, add_special_tokens=False)["input_ids"]
    if ids != [token_id, token_id]:
        raise ValueError(f"the tokenizer does not encode {IMAGE_PAD_TOKEN} as one token (got {ids} for two of them);"
                         " it must be an added/special token")
    return {"image_special_token": IMAGE_PAD_TOKEN, "image_ids": [token_id]}


# ------------------------------------------------------------------------------------------ the shipped default

# Python standard-library modules whose docstrings are the default tokenizer's general English text.
DEFAULT_STDLIB_MODULES = (
    "argparse", "bisect", "calendar", "cmd", "codecs", "collections/__init__", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "difflib", "doctest", "email/message", "enum", "filecmp", "fnmatch",
    "fractions", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "http/client", "inspect", "ipaddress",
    "json/__init__", "json/decoder", "json/encoder", "locale", "logging/__init__", "mailbox", "mimetypes", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "platform", "pprint", "queue", "random", "re/__init__",
    "secrets", "shlex", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "unittest/case", "urllib/parse", "uuid", "warnings",
    "weakref", "zipfile",
)

# A little Chinese, written for this project (byte-level BPE encodes any Chinese anyway; this only adds merges).
DEFAULT_CHINESE_TEXTS = (
    "这张图片里有什么形状？", "图中的形状是什么颜色？", "图片里有一个蓝色的圆形。", "这是一个红色的三角形。",
    "图像中是否包含矩形？", "是的，图像中有一个绿色的矩形。", "不，图片里没有圆形。", "形状是灰色的。",
    "黄色的三角形在图片的左边。", "棕色的圆形和黑色的矩形。", "你好！我是一个很小的视觉语言模型。",
    "我可以回答关于图片的简单问题。", "请描述这张图片。", "这张图片的背景是白色的，中间有一个青色的正方形。",
    "模型在中央处理器上训练，只需要几分钟。", "分词器把文本切分成词元，每个词元对应一个编号。",
    "每张图片由一串图像占位符表示，视觉特征会替换这些占位符。", "先预训练语言模型，再训练视觉投影层，最后进行指令微调。",
    "用户提出问题，助手给出回答。", "今天天气很好，我们一起去公园散步吧。", "学习是一件快乐的事情。",
    "这个模型的参数很少，但是它能学会识别颜色和形状。", "谢谢你的帮助！", "我不知道答案，请换一个问题。",
)


def default_corpus() -> list[str]:
    """The default tokenizer's training texts, in a fixed order:

    1. the easy-vqa questions and answers (train, then test), each pair rendered as a ChatML conversation;
    2. the docstrings (module, class, function; `ast` walk order) of `DEFAULT_STDLIB_MODULES` in this Python's
       standard library, and the Zen of Python (`this.s`, rot13-decoded, read without importing `this`);
    3. `DEFAULT_CHINESE_TEXTS`.
    Needs the `easy-vqa` package (`pip install minimind-v[demo]`)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise ImportError("building the default tokenizer needs easy-vqa: pip install easy-vqa==1.0") from e
    texts: list[str] = []
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        texts.extend(chatml_text([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                     for q, a in zip(questions, answers))
    stdlib = sysconfig.get_paths()["stdlib"]
    for module in DEFAULT_STDLIB_MODULES:
        texts.extend(_docstrings(os.path.join(stdlib, module + ".py")))
    texts.append(_zen_of_python(os.path.join(stdlib, "this.py")))
    texts.extend(DEFAULT_CHINESE_TEXTS)
    return texts


def _docstrings(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def _zen_of_python(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["s"]:
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise ValueError(f"no Zen of Python in {path}")


def build_default_tokenizer(out_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Rebuild the shipped default tokenizer: `train_tokenizer(default_corpus(), 2048, out_dir, min_frequency=2)`,
    plus a README.txt recording how. `out_dir` defaults to the package's own `default_tokenizer/` folder.
    Deterministic: the same Python (its stdlib docstrings are part of the corpus) and `tokenizers` versions give the
    same tokenizer.json byte for byte."""
    out_dir = os.fspath(out_dir) if out_dir is not None else default_tokenizer_path()
    texts = default_corpus()
    tokenizer = train_tokenizer(texts, DEFAULT_VOCAB_SIZE, out_dir, min_frequency=2)
    with open(os.path.join(out_dir, "tokenizer.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    readme = f"""MiniMind-V default tokenizer
============================

Byte-level BPE, {len(tokenizer)} tokens, ChatML chat template (chat_template.jinja), no default system prompt.
Special tokens: {", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS))}
(bos {BOS_TOKEN}, eos {EOS_TOKEN}, pad/unk {PAD_TOKEN}; {IMAGE_PAD_TOKEN} is the image placeholder),
then the 256 byte symbols (ids 4..259), then the merges.

Built by minimind_v.data.tokenizer.build_default_tokenizer() (python -m minimind_v.data.tokenizer [OUT_DIR]):
train_tokenizer(default_corpus(), vocab_size={DEFAULT_VOCAB_SIZE}, min_frequency=2) on {len(texts)} texts:
  1. easy-vqa 1.0 questions and answers (train then test), each pair as a ChatML conversation;
  2. docstrings of {len(DEFAULT_STDLIB_MODULES)} Python standard-library modules (DEFAULT_STDLIB_MODULES) and the
     Zen of Python;
  3. {len(DEFAULT_CHINESE_TEXTS)} short Chinese sentences (DEFAULT_CHINESE_TEXTS).
Python {platform.python_version()}, tokenizers {tokenizers.__version__}.
sha256(tokenizer.json) = {digest}
"""
    with open(os.path.join(out_dir, "README.txt"), "w", encoding="utf-8") as f:
        f.write(readme)
    return tokenizer


if __name__ == "__main__":  # python -m minimind_v.data.tokenizer [OUT_DIR]: rebuild the shipped default tokenizer
    target = sys.argv[1] if len(sys.argv) > 1 else None
    built = build_default_tokenizer(target)
    print(f"default tokenizer ({len(built)} tokens) -> {target or default_tokenizer_path()}")
