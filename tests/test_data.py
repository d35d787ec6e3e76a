"""Data: layouts, loss masks, bad-record skips and conversions, truncation around image runs, collation."""

import hashlib
import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import CHATML, GENERATOR, build_tokenizer, tiny_config
from minimind_v.data.batching import collate
from minimind_v.config import IGNORE_INDEX
from minimind_v.data.datasets import ConversationDataset, Sample, TextDataset
from minimind_v.data.processing import tokenize_conversation
from minimind_v.data.records import iter_records
from minimind_v.data.images import ImageLimits, decode_image, load_image
from minimind_v.data.skips import SkipRecord, SkipStats

CONFIG = tiny_config()  # 16 x '@' (id 34) per image
RUN = 16
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
BENCH = str(GENERATOR)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png(color=RED, size=(8, 8)) -> bytes:
    return encode(Image.new("RGB", size, color))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (tiny on disk; its pixel data is not valid)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def conv(*turns: str, system: str | None = None) -> list[dict]:
    """conv(user, assistant, user, ...) -> role/content turns."""
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def write_parquet(path, conversations: list, images: list) -> str:
    image_type = pa.list_(pa.binary()) if any(isinstance(i, list) for i in images) else pa.binary()
    pq.write_table(pa.table({"conversations": conversations, "image_bytes": pa.array(images, type=image_type)}), path)
    return str(path)


def write_jsonl(path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def dataset(path, tokenizer, max_seq_len=512, **kwargs) -> ConversationDataset:
    return ConversationDataset(path, tokenizer, CONFIG, max_seq_len, **kwargs)


def supervised_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([label for label in sample.labels if label != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------- loss mask


def test_loss_mask_exact_positions(tokenizer):
    messages = conv("Hi", "Hello!", "Bye", "Ciao", system="Be brief.")
    ids, labels = tokenize_conversation(tokenizer, messages)
    # byte-level without merges: one token per character, one per special token
    # 0-18 system turn + '\n', 19-28 user turn + '\n', 29 <|im_start|>, 30-39 'assistant\n', 40-45 'Hello!',
    # 46 <|im_end|>, 47 '\n', 48-58 user turn + '\n', 59 <|im_start|>, 60-69 'assistant\n', 70-73 'Ciao',
    # 74 <|im_end|>, 75 '\n'
    assert len(ids) == len(labels) == 76
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == [*range(40, 47), *range(70, 75)]
    assert ids[46] == ids[74] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(labels[i] == ids[i] for i in [*range(40, 47), *range(70, 75)])
    assert tokenizer.decode(ids[40:47]) == "Hello!<|im_end|>"


def test_loss_mask_when_the_answer_repeats_the_scaffolding(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, conv("Which role?", "assistant"))
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(ids[supervised[0] - 10:supervised[0]]) == "assistant\n"  # not the template's own word
    assert tokenizer.decode([ids[i] for i in supervised]) == "assistant<|im_end|>"


@pytest.mark.parametrize("template", [
    # a default system turn when none is given
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}" + CHATML,
    # a trailer after the last turn only: prefixes are not prefixes, so turns are found by searching
    CHATML.replace("{% if add_generation_prompt %}", "{% if not add_generation_prompt %}END{% endif %}"
                   "{% if add_generation_prompt %}"),
])
def test_loss_mask_with_other_templates(template):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    ids, labels = tokenize_conversation(tokenizer, conv("Hi", "Hello!", "Say Ciao", "Ciao"))
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert tokenizer.decode([ids[i] for i in supervised]) == "Hello!<|im_end|>Ciao<|im_end|>"
    span_starts = [i for i in supervised if i - 1 not in supervised]
    assert len(span_starts) == 2  # each span right after its own 'assistant\n', not inside the user's "Say Ciao"
    assert all(tokenizer.decode(ids[i - 10:i]) == "assistant\n" for i in span_starts)
    assert tokenizer.decode(ids[supervised[-1] + 1:]) in ("\n", "\nEND")  # what follows the last eos is not learnt


# ----------------------------------------------------------------------------------------------------- layouts


def test_parquet_single_image(tmp_path, tokenizer):
    image = png(RED)
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nWhat colour?", "Red."))], [image])
    sample = dataset(path, tokenizer)[0]
    assert sample.input_ids.count(34) == RUN
    assert supervised_text(tokenizer, sample) == "Red.<|im_end|>"
    assert [im.getpixel((0, 0)) for im in sample.images] == [RED] and sample.images[0].mode == "RGB"
    assert sample.image_keys == [hashlib.sha256(image).hexdigest()]


def test_parquet_several_images_as_a_list_and_conversations_as_a_list(tmp_path, tokenizer):
    images = [png(RED), png(BLUE)]
    path = write_parquet(tmp_path / "d.parquet", [conv("<image> or <image>?", "The first."), conv("No image?", "No.")],
                         [images, None])
    ds = dataset(path, tokenizer)
    assert len(ds) == 2
    sample, text_only = ds[0], ds[1]
    starts = [i for i, t in enumerate(sample.input_ids) if t == 34][::RUN]
    assert len(starts) == 2 and sample.input_ids[starts[1] - 4:starts[1]] == tokenizer.encode(" or ")
    assert [im.getpixel((0, 0)) for im in sample.images] == [RED, BLUE]
    assert sample.image_keys == [hashlib.sha256(b).hexdigest() for b in images]
    assert text_only.images == [] and 34 not in text_only.input_ids


def test_placeholders_never_carry_a_loss(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("Show me.", "Here: <image>"))], [[png(GREEN)]])
    sample = dataset(path, tokenizer)[0]
    assert sample.input_ids.count(34) == RUN and all(
        label == IGNORE_INDEX for t, label in zip(sample.input_ids, sample.labels) if t == 34)
    assert supervised_text(tokenizer, sample) == "Here: <|im_end|>"


@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_llava_json_and_jsonl_with_an_image_folder(tmp_path, tokenizer, ext):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(RED))
    (folder / "b.png").write_bytes(png(GREEN))
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                 {"from": "gpt", "value": "Red."}]},
            {"images": ["b.png", str(folder / "a.png")],
             "conversations": [{"from": "system", "value": "Be brief."},
                               {"role": "user", "content": "<image><image> Colours?"},
                               {"role": "assistant", "content": "Green, red."}]}]
    path = tmp_path / f"data{ext}"
    path.write_text(json.dumps(rows) if ext == ".json" else "\n".join(json.dumps(r) for r in rows))
    records = list(iter_records(path, image_root=str(folder)))
    assert records[0] == {"conversations": [{"role": "user", "content": "<image>\nColour?"},
                                            {"role": "assistant", "content": "Red."}],
                          "images": [str(folder / "a.png")]}
    ds = dataset(path, tokenizer, image_root=str(folder))
    assert [im.getpixel((0, 0)) for im in ds[1].images] == [GREEN, RED]
    assert ds[1].input_ids.count(34) == 2 * RUN and supervised_text(tokenizer, ds[1]) == "Green, red.<|im_end|>"


def test_image_paths_default_to_the_data_files_folder(tmp_path, tokenizer):
    (tmp_path / "a.png").write_bytes(png(BLUE))
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "conversations": conv("<image>", "Blue.")}])
    assert dataset(path, tokenizer)[0].images[0].getpixel((0, 0)) == BLUE


def test_text_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "x" * 50}, {"text": "  "},
                                              {"conversations": conv("a", "b")}])
    stats = SkipStats()
    ds = TextDataset(path, tokenizer, CONFIG, max_seq_len=20, stats=stats)
    assert len(ds) == 2 and stats.counts == {"empty text": 1, "wrong record kind": 1}
    short, long = ds[0], ds[1]
    assert short.input_ids == [1] + tokenizer.encode("hello") + [2] and short.labels == short.input_ids
    assert short.images == [] and short.image_keys == []
    assert len(long.input_ids) == 20 and long.input_ids[0] == 1 and long.labels == long.input_ids
    assert stats.converted == {"truncated": 1}


def test_unknown_extension_and_no_usable_records(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.parquet, \.json, \.jsonl"):
        list(iter_records(tmp_path / "d.csv"))
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(ValueError, match="no usable records.*1 bad json"):
        dataset(path, tokenizer)


@pytest.mark.skipif(not os.path.exists(BENCH), reason="the shared bench generator is not here")
def test_the_bench_generators_parquet(tmp_path, tokenizer):
    out = tmp_path / "bench.parquet"
    subprocess.run([sys.executable, BENCH, str(out), "3", "--size", "32", "--max-words", "60"], check=True)
    ds = dataset(out, tokenizer, max_seq_len=1024)
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == 3 and all(s.input_ids.count(34) == RUN and len(s.images) == 1 for s in samples)
    assert all(supervised_text(tokenizer, s).startswith("The image shows") for s in samples)


# ------------------------------------------------------------------------------------------------- bad records


def test_bad_records_are_skipped_with_counted_reasons(tmp_path, tokenizer):
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes(png(size=(64, 64))[:60])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(encode(noise, "JPEG")[:1500])
    flipped = bytearray(encode(noise))
    idat = flipped.find(b"IDAT")
    flipped[idat + 4 + int.from_bytes(flipped[idat - 4:idat], "big")] ^= 0xFF  # a bad IDAT checksum: decodes fine
    (tmp_path / "crc.png").write_bytes(bytes(flipped))
    one = conv("<image>\nWhat?", "A thing.")
    rows = [{"image": "ok.png", "conversations": one},  # kept
            "{this is not json",  # bad json
            {"conversations": []},  # empty conversation
            {"conversations": conv("Only a question?")},  # empty conversation (no assistant)
            {"conversations": conv("Hi", "   ")},  # empty assistant turn
            {"image": "ok.png", "conversations": conv("<image> <image>", "Two?")},  # more markers than images
            {"image": ["ok.png", "ok.png"], "conversations": one},  # fewer markers than images
            {"conversations": [{"from": "robot", "value": "beep"}]},  # unknown role: bad record
            {"image": "nowhere.png", "conversations": one},  # missing image file
            {"image": "garbage.png", "conversations": one},  # corrupt image
            {"image": "cut.png", "conversations": one},  # truncated PNG
            {"image": "cut.jpg", "conversations": one},  # truncated JPEG
            {"image": "crc.png", "conversations": one},  # a checksum error that only verify() sees
            {"image": "ok.png", "conversations": conv("<image> mail me @ home", "No.")}]  # stray placeholder
    stats = SkipStats()
    ds = dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, stats=stats)
    assert stats.counts == {"bad json": 1, "empty conversation": 2, "empty assistant turn": 1,
                            "image/marker count mismatch": 2, "bad record": 1}
    assert len(ds) == 7 and stats.total == 14
    results = [ds[i] for i in range(len(ds))]
    assert isinstance(results[0], Sample)
    assert [r[1] for r in results[1:]] == ["missing image file", "corrupt image", "corrupt image", "corrupt image",
                                           "corrupt image", "placeholder count mismatch"]
    assert all(r[0] is None for r in results[1:])
    ds[1], ds[2]  # a skipped record is counted once, however often it is asked for
    assert stats.counts["missing image file"] == 1 and stats.counts["corrupt image"] == 4
    assert sum(stats.counts.values()) == 13


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("L", "PNG")])
def test_non_rgb_images_are_converted_and_counted(tmp_path, tokenizer, mode, fmt):
    if mode == "I;16":
        image = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))
    else:
        image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
    data = encode(image, fmt)
    opened_mode = Image.open(io.BytesIO(data)).mode
    assert opened_mode != "RGB"
    stats = SkipStats()
    ds = dataset(write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>", "Ok."))], [data]), tokenizer,
                 stats=stats)
    sample = ds[0]
    assert isinstance(sample, Sample) and sample.images[0].mode == "RGB" and sample.images[0].size == (8, 8)
    assert stats.converted == {f"{opened_mode}->RGB": 1} and not stats.counts


def test_decompression_bombs_are_refused_without_raising(tmp_path, tokenizer):
    limit = Image.MAX_IMAGE_PIXELS
    rows = [png(size=(64, 64)),  # over a low max_image_pixels
            header_only_png(20000, 20000),  # over twice PIL's own limit: DecompressionBombError
            header_only_png(10000, 10000)]  # over PIL's own limit: DecompressionBombWarning
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>", "Ok."))] * 3, rows)
    low = dataset(path, tokenizer, image_limits=ImageLimits(max_pixels=1000))
    assert low[0] == (None, "decompression bomb")
    high = dataset(path, tokenizer, image_limits=ImageLimits(max_pixels=10 ** 12, max_side=10 ** 6))  # PIL's own
    assert isinstance(high[0], Sample)
    assert high[1] == (None, "decompression bomb") and high[2] == (None, "decompression bomb")
    default = dataset(write_parquet(tmp_path / "e.parquet", [json.dumps(conv("<image>", "Ok."))],
                                    [header_only_png(5000, 5000)]), tokenizer)
    assert default[0] == (None, "decompression bomb")  # 25 MP is over the default 4096 x 4096
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize("size", [(4096, 1), (1, 16384), (1, 65536), (30000, 2), (9000, 900)])
def test_extreme_shapes_are_refused_before_decoding(tmp_path, tokenizer, size):
    """A few bytes of PNG whose shape would make the image processor allocate gigabytes (it scales the shorter
    side up to the tower's size): refused from the header alone - a header-only file proves nothing is decoded."""
    for data in (png(size=size), header_only_png(*size)):
        with pytest.raises(SkipRecord) as caught:
            load_image(data)
        assert caught.value.reason == "image side or aspect ratio over the limits", caught.value
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>", "Ok."))], [png(size=size)])
    stats = SkipStats()
    assert dataset(path, tokenizer, stats=stats)[0] == (None, "image side or aspect ratio over the limits")
    assert stats.counts == {"image side or aspect ratio over the limits": 1}


def test_large_images_are_held_at_the_working_size(tmp_path):
    """Decoded images over the working size are downscaled (aspect kept) before any processor sees them; a large
    JPEG is decoded at a reduced scale to start with. Small images are untouched."""
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 3000, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        image, key = load_image(encode(big, fmt))
        assert image.size == (1024, 512) and image.mode == "RGB"
        assert key == hashlib.sha256(encode(big, fmt)).hexdigest()  # the key is of the bytes as given
    assert load_image(encode(big, "PNG"), ImageLimits(work_side=0))[0].size == (3000, 1500)
    small = Image.new("RGB", (300, 200), (10, 20, 30))
    assert load_image(encode(small, "PNG"))[0].tobytes() == small.tobytes()
    with pytest.raises(ValueError, match="max_aspect=0.5 "):
        ImageLimits(max_aspect=0.5)


# -------------------------------------------------------------------------------------------------- truncation


def run_start(tokenizer, path) -> tuple[int, int]:
    """(start of the first placeholder run, full length) of record 0, untruncated."""
    sample = dataset(path, tokenizer, max_seq_len=10_000)[0]
    return sample.input_ids.index(34), len(sample.input_ids)


def test_truncation_inside_a_run_cuts_before_the_image(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("Hi", "Sure.", "<image>\nWhat?", "Red."))], [png()])
    start, _ = run_start(tokenizer, path)
    for max_len in (start, start + 5, start + RUN - 1):
        stats = SkipStats()
        sample = dataset(path, tokenizer, max_seq_len=max_len, stats=stats)[0]
        assert len(sample.input_ids) == len(sample.labels) == start and 34 not in sample.input_ids
        assert sample.images == [] and sample.image_keys == []
        assert supervised_text(tokenizer, sample) == "Sure.<|im_end|>" and stats.converted == {"truncated": 1}


def test_truncation_inside_the_only_run_without_supervision_before_is_too_long(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nWhat?", "Red."))], [png()])
    start, _ = run_start(tokenizer, path)
    stats = SkipStats()
    assert dataset(path, tokenizer, max_seq_len=start + 5, stats=stats)[0] == (None, "too long")
    assert stats.counts == {"too long": 1} and not stats.converted


def test_truncation_after_the_runs_is_plain(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nDescribe.", "A red square here."))],
                         [png()])
    start, full = run_start(tokenizer, path)
    sample = dataset(path, tokenizer, max_seq_len=full - 6)[0]
    assert len(sample.input_ids) == full - 6 and sample.input_ids.count(34) == RUN and len(sample.images) == 1
    assert supervised_text(tokenizer, sample) == "A red square h"  # cut 6 tokens: "ere.", <|im_end|>, "\n"
    # a cut after the run but before any assistant token leaves nothing to learn
    assert dataset(path, tokenizer, max_seq_len=start + RUN + 3)[0] == (None, "too long")


def test_an_image_that_starts_past_the_limit_is_dropped_and_the_sample_cut_at_the_limit(tmp_path, tokenizer):
    """Two images with a long text between them: the second run starts after max_seq_len. The sample keeps the
    first image and is cut at max_seq_len exactly (it used to be cut at the second run's start, past the limit)."""
    long_text = "many words in between " * 20
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nFirst?", "One.",
                                                                  long_text + "<image>\nSecond?", "Two."))],
                         [[png(), png(BLUE)]])
    start, full = run_start(tokenizer, path)
    second = dataset(path, tokenizer, max_seq_len=10_000)[0].input_ids.index(34, start + RUN)
    for max_len in ((second + start) // 2 + RUN, second - 1, second, second + 3):
        sample = dataset(path, tokenizer, max_seq_len=max_len)[0]
        assert len(sample.input_ids) == len(sample.labels) <= max_len
        assert sample.input_ids.count(34) == RUN * len(sample.images) and len(sample.images) == 1


@pytest.mark.parametrize("seed", range(3))
def test_no_kept_sample_exceeds_max_seq_len(tmp_path, tokenizer, seed):
    """Random conversations (0-3 images anywhere, text of any length) and random limits: every kept sample fits,
    holds only whole placeholder runs and one image per run."""
    rng = np.random.default_rng(seed)
    rows, images = [], []
    for _ in range(40):
        n = int(rng.integers(0, 4))
        turns = ["word " * int(rng.integers(0, 40)) for _ in range(4)]
        for _ in range(n):
            turns[int(rng.integers(0, 2)) * 2] += "<image>" + "x " * int(rng.integers(0, 30))
        rows.append(json.dumps(conv(*turns)))
        images.append([png()] * n)
    path = write_parquet(tmp_path / "d.parquet", rows, images)
    for max_len in rng.integers(8, 200, size=6):
        ds = dataset(path, tokenizer, max_seq_len=int(max_len))
        for sample in (ds[i] for i in range(len(ds))):
            if isinstance(sample, Sample):
                assert len(sample.input_ids) <= max_len
                assert sample.input_ids.count(34) == RUN * len(sample.images)


def test_a_conversation_the_assistant_opens_is_skipped_and_counted(tmp_path, tokenizer):
    rows = [json.dumps([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "<image>Hi"},
                        {"role": "assistant", "content": "Red."}]),
            json.dumps([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Red."}]),
            json.dumps(conv("<image>Hi", "Red.", system="Be brief."))]
    stats = SkipStats()
    ds = dataset(write_parquet(tmp_path / "d.parquet", rows, [png(), b"", png()]), tokenizer, stats=stats)
    assert len(ds) == 1 and isinstance(ds[0], Sample)
    assert stats.counts == {"assistant speaks first": 2}


# ----------------------------------------------------------------------------------------------------- collate


def test_collate_pads_masks_and_reports_skips():
    a = Sample([5, 6, 7], [IGNORE_INDEX, 6, 7], [Image.new("RGB", (2, 2), RED)], ["ka"])
    b = Sample([8, 9], [8, IGNORE_INDEX], [Image.new("RGB", (2, 2), BLUE), Image.new("RGB", (2, 2), GREEN)],
               ["kb1", "kb2"])
    batch = collate([a, (None, "corrupt image"), b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert [im.getpixel((0, 0)) for im in batch["images"]] == [RED, BLUE, GREEN]
    assert batch["image_keys"] == ["ka", "kb1", "kb2"] and batch["skipped"] == ["corrupt image"]
    empty = collate([(None, "too long"), (None, "missing image file")], pad_token_id=0)
    assert empty["input_ids"].shape == empty["labels"].shape == empty["attention_mask"].shape == (0, 0)
    assert empty["images"] == [] and empty["skipped"] == ["too long", "missing image file"]


def test_a_dataloader_batches_a_dataset(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>", "Yes.")),
                                                  json.dumps(conv("<image>\nLonger question?", "No.")),
                                                  json.dumps(conv("<image>", "Broken."))], [png(), png(), b"\x89PNG"])
    loader = DataLoader(dataset(path, tokenizer), batch_size=3, collate_fn=partial(collate, pad_token_id=0))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and len(batch["images"]) == 2 and batch["skipped"] == ["corrupt image"]
    assert (batch["input_ids"] == 34).sum() == 2 * RUN


def test_later_epochs_reuse_the_tokens_and_skip_decoding_cached_images(tmp_path, tokenizer, monkeypatch):
    """A record is tokenized once (its second read never calls the tokenizer) and an image whose features are cached
    is not decoded (None in its place, the same key); the samples are otherwise the same."""
    import minimind_v.data.datasets as datasets

    images = [png(RED), png(BLUE)]
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nWhat colour?", "Red.")),
                                                  json.dumps(conv("<image>\nAnd this?", "Blue."))], images)
    data = dataset(path, tokenizer)
    first = [data[0], data[1]]
    calls, decodes = [], []
    monkeypatch.setattr(datasets, "tokenize_conversation", lambda *a: calls.append(a) or tokenize_conversation(*a))
    monkeypatch.setattr(datasets, "decode_image", lambda *a: decodes.append(a) or decode_image(*a))
    data.cached_keys = {hashlib.sha256(images[0]).hexdigest()}
    again = [data[0], data[1]]
    assert calls == [] and len(decodes) == 1  # no tokenizing; only the uncached image decoded
    assert [s.input_ids for s in again] == [s.input_ids for s in first]
    assert [s.labels for s in again] == [s.labels for s in first]
    assert [s.image_keys for s in again] == [s.image_keys for s in first]
    assert again[0].images == [None] and again[1].images[0].getpixel((0, 0)) == BLUE
    monkeypatch.setattr(datasets, "TOKEN_MEMORY", 0)  # over the budget: tokenized at every read, nothing kept
    fresh = dataset(path, tokenizer)
    fresh[0], fresh[0]
    assert len(calls) == 2 and not fresh._tokens


def test_a_cut_sample_is_counted_at_every_read_as_before(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", [json.dumps(conv("<image>\nQ?", "A long answer " * 20))], [png()])
    data = dataset(path, tokenizer, max_seq_len=64)
    first, second = data[0], data[0]
    assert len(first.input_ids) == len(second.input_ids) == 64 and data.stats.converted["truncated"] == 2


# --------------------------------------------------------------------------------------------------- SkipStats


def test_skip_stats_summary_merge_and_rate_limited_logging(caplog):
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="minimind_v.data.skips"):
        for _ in range(7):
            stats.add("corrupt image", "bad bytes")
    assert len(caplog.records) == 5 and "further 'corrupt image' skips" in caplog.records[-1].getMessage()
    stats.add("too long")
    stats.merge({"too long": 2, "missing image file": 1})
    stats.merge(["bad json", "too long"])
    stats.convert("RGBA->RGB")
    stats.total = 100
    text = stats.summary()
    assert text.startswith("skipped 13 of 100 records")
    for part in ("7 corrupt image", "4 too long", "1 missing image file", "1 bad json", "converted: 1 RGBA->RGB"):
        assert part in text
    assert SkipStats().summary() == "skipped 0 records"


def test_a_damaged_parquet_or_one_without_text_is_one_clear_error(tmp_path, tokenizer):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(ValueError, match="cannot read parquet file .*broken.parquet"):
        dataset(tmp_path / "broken.parquet", tokenizer)
    pq.write_table(pa.table({"image_bytes": pa.array([png()], type=pa.binary())}), tmp_path / "images.parquet")
    with pytest.raises(ValueError, match="has no 'conversations' or 'text' column"):
        dataset(tmp_path / "images.parquet", tokenizer)


def test_image_errors_name_the_problem_not_python_objects():
    """Bytes PIL cannot read, a file object instead of bytes or a path, and bad limits: messages without
    `<_io.BytesIO object at 0x...>` or a whole dataclass repr."""
    import io

    from minimind_v.data.images import ImageLimits, load_image
    from minimind_v.data.skips import SkipRecord

    with pytest.raises(SkipRecord) as bad:
        load_image(b"not an image at all")
    assert str(bad.value) == "corrupt image: not an image format PIL reads (19 bytes starting b'not an i')"
    with pytest.raises(SkipRecord, match="must be encoded bytes or a path, not BytesIO") as handle:
        load_image(io.BytesIO(b"x"))
    assert "0x" not in str(bad.value) + str(handle.value)
    with pytest.raises(ValueError) as limits:
        ImageLimits(max_side=0, work_side=-1)
    assert str(limits.value).startswith("image limits: max_side=0, work_side=-1 (") and "ImageLimits(" not in str(
        limits.value)
