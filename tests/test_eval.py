"""`minimind-v eval` on hostile data: every bad item is skipped and counted with its file and line, the rest is
scored, and a file with nothing usable is a one-line error."""

import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from minimind_v.cli import main
from minimind_v.data.skips import SkipStats
from minimind_v.evaluate import load_qa_jsonl


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def hostile(tmp_path):
    (tmp_path / "good.png").write_bytes(png())
    (tmp_path / "bomb.png").write_bytes(header_only_png(5000, 5000))
    (tmp_path / "thin.png").write_bytes(png(size=(1, 16384)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines = [json.dumps({"question": "what color?", "answer": "red", "image": "good.png", "type": "color"}),
             "{not json",
             json.dumps([1, 2]),
             json.dumps({"question": 7, "answer": "red", "image": "good.png"}),
             json.dumps({"question": "what color?", "answer": "red", "image": 12}),
             json.dumps({"question": "what color?", "image": "good.png"}),
             json.dumps({"question": "what color?", "answer": "red", "image": "bomb.png"}),
             json.dumps({"question": "what color?", "answer": "red", "image": "thin.png"}),
             json.dumps({"question": "what color?", "answer": "red", "image": "corrupt.png"}),
             json.dumps({"question": "what color?", "answer": "red", "image": "missing.png"}),
             json.dumps({"question": "<image> and <image>?", "answer": "red", "image": "good.png"}),
             json.dumps({"question": "how many?", "answer": 3, "image": ["good.png"], "type": "count"})]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return tmp_path


def test_bad_items_are_skipped_with_file_and_line(hostile, caplog):
    stats = SkipStats()
    items = load_qa_jsonl(str(hostile / "qa.jsonl"), str(hostile), stats)
    assert [item.answer for item in items] == ["red", "red", "3"]  # the two-marker item fails later, in the engine
    assert stats.counts == {"bad json": 1, "bad record": 4, "decompression bomb": 1, "corrupt image": 1,
                            "image side or aspect ratio over the limits": 1, "missing image file": 1}
    assert f"{hostile / 'qa.jsonl'}:7:" in caplog.text and f"{hostile / 'qa.jsonl'}:2:" in caplog.text


def test_cli_eval_scores_what_it_can_and_counts_the_rest(model_dir, hostile, capsys):
    assert main(["eval", "--model", str(model_dir), "--data", str(hostile / "qa.jsonl"), "--image-root",
                 str(hostile)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["total"] == 2 and set(report["per_type"]) == {"color", "count"}
    assert "skipped 10 of 12 records" in report["skipped"] and "1 question the model cannot take" in report["skipped"]
    assert "Traceback" not in captured.err


def test_cli_eval_runs_where_it_is_told_and_refuses_what_it_cannot_have(model_dir, hostile, capsys):
    """--device and --dtype as chat and serve take them: the same answers on the CPU named outright, a clear error
    (before any loading) for a dtype that does not exist or a GPU the machine lacks."""
    base = ["eval", "--model", str(model_dir), "--data", str(hostile / "qa.jsonl"), "--image-root", str(hostile)]
    assert main(base + ["--device", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert main(base + ["--device", "cpu", "--dtype", "fp32"]) == 0  # what auto means on a CPU
    assert json.loads(capsys.readouterr().out)["examples"] == cpu["examples"] and cpu["total"] == 2
    assert main(base + ["--dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype 'int4'" in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n\n", "{not json\n", json.dumps({"question": 1, "answer": 2}) + "\n"])
def test_a_file_with_nothing_usable_is_an_error(model_dir, tmp_path, capsys, content):
    path = tmp_path / "qa.jsonl"
    path.write_text(content)
    assert main(["eval", "--model", str(model_dir), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "no usable question/answer item" in err[0]
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "nothing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_reads_what_training_reads_and_writes_every_answer(model_dir, tmp_path, capsys):
    """A MiniMind-V parquet (image bytes) and a LLaVA JSON (paths relative to the data file) give the same items as
    the question/answer JSONL; --output holds one line per answered question; stderr shows wrong answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minimind_v.evaluate import load_eval_items

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "red.png").write_bytes(png())
    turns = [{"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "blue"}]
    pq.write_table(pa.table({"conversations": [json.dumps(turns)] * 2, "image_bytes": [png()] * 2}),
                   data / "qa.parquet")
    llava = [{"image": "img/red.png", "conversations": [{"from": "human", "value": "what color?"},
                                                         {"from": "gpt", "value": "red"}]},
             {"image": "img/missing.png", "conversations": [{"from": "human", "value": "what color?"},
                                                            {"from": "gpt", "value": "red"}]}]
    (data / "qa.json").write_text(json.dumps(llava))
    (data / "qa.jsonl").write_text(json.dumps({"question": "what color?", "answer": "red", "image": "img/red.png"}))
    jsonl = load_eval_items(str(data / "qa.jsonl"))
    for name, count in (("qa.parquet", 2), ("qa.json", 1)):
        stats = SkipStats()
        items = load_eval_items(str(data / name), stats=stats)
        assert len(items) == count and {(i.question, i.answer) for i in items} == {("<image>\nwhat color?", "red")}
        assert items[0].image_keys == jsonl[0].image_keys  # the same image, found relative to the data file
    assert stats.counts == {"missing image file": 1}
    out = tmp_path / "answers.jsonl"
    assert main(["eval", str(model_dir), "--data", str(data / "qa.parquet"), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2 and set(answers[0]) == {"question", "answer", "prediction", "correct"}
    assert answers[0]["answer"] == "red" and answers[0]["correct"] is False  # a random model
    assert "wrong answers, for example:" in err and f"every answer: {out}" in err and "answers: 100%" in err


def test_an_evaluation_sends_its_images_through_the_tower_at_once(model_dir):
    """With a feature cache (in memory) every distinct image is encoded before the questions, in one chunk, not a
    few per batch of questions; the answers are those of encoding them batch by batch."""
    from minimind_v.build import load_model
    from minimind_v.evaluate import QAItem, generate_answers
    from minimind_v.models.image_features import ImageFeatures

    model, tokenizer = load_model(str(model_dir))
    images = [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(5)]
    items = [QAItem("<image>\nwhat color?", "", [images[i % 5]]) for i in range(12)]
    chunks = []
    tower_forward = model.vision_tower.forward
    model.vision_tower.forward = lambda pixels: chunks.append(len(pixels)) or tower_forward(pixels)
    cached = generate_answers(model.eval(), tokenizer, items, ImageFeatures(model.vision_tower, in_memory=True),
                              batch_size=4, max_new_tokens=3)
    assert chunks == [5]
    chunks.clear()
    assert generate_answers(model, tokenizer, items, ImageFeatures(model.vision_tower), batch_size=4,
                            max_new_tokens=3) == cached
    assert chunks == [4, 4, 4]  # no cache: each batch's images
