"""The offline demo: a reduced run by default (every stage, evaluation, photos), the full one behind `-m slow`."""

import json
import os

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite_pytorch")

from minimind_v.cli import main  # noqa: E402
from minimind_v.demo import caption, prepare_data, question_type  # noqa: E402


def test_captions_and_types_come_from_the_answers():
    assert caption(["yes", "blue", "circle", "no"]) == "a blue circle."
    assert caption(["no", "triangle"]) == "a triangle."
    assert [question_type(a) for a in ("no", "teal", "rectangle")] == ["yes/no", "color", "shape"]


def test_prepared_data_in_the_original_layout(tmp_path):
    import pyarrow.parquet as pq

    paths = prepare_data(str(tmp_path), limit=40)
    sft = pq.read_table(paths["sft.parquet"]).to_pylist()
    assert len(sft) == 40
    turns = json.loads(sft[0]["conversations"])
    assert turns[0]["role"] == "user" and turns[0]["content"].startswith("<image>\n")
    assert sft[0]["image_bytes"][:4] == b"\x89PNG"
    captions = pq.read_table(paths["captions.parquet"]).to_pylist()
    assert 0 < len(captions) <= 40 and json.loads(captions[0]["conversations"])[1]["content"].startswith("a ")


def test_reduced_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "quick"]) == 0
    printed = capsys.readouterr().out
    for stage in ("pretrain-llm", "pretrain-vlm", "sft"):
        assert f"[demo] {stage}: loss" in printed
        assert os.path.isfile(out / stage / "model" / "model.safetensors")
        assert os.path.isfile(out / stage / "loss.png")
    report = json.loads((out / "report.json").read_text())
    assert report["total"] == 256 and set(report["per_type"]) == {"yes/no", "color", "shape"}
    assert len(report["photos"]) == 4 and "chelsea" in report["photos"][0]


def test_cli_offers_every_demo_size():
    from minimind_v.cli import build_parser
    from minimind_v.demo import SIZES

    demo_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    assert next(a for a in demo_parser._actions if a.dest == "size").choices == list(SIZES)


@pytest.mark.slow
def test_full_demo_reaches_95_percent(tmp_path):
    """The README's numbers: `python -m pytest -m slow tests/test_demo.py` (several minutes on 2 cores)."""
    from minimind_v.demo import run_demo

    report = run_demo(str(tmp_path / "demo"), "default")
    assert report["total"] == 9673 and report["accuracy"] >= 0.95


@pytest.mark.slow
def test_large_demo_reaches_99_percent(tmp_path):
    """`python -m pytest -m slow -k large tests/test_demo.py`: about 40 minutes on 2 CPU cores, 9 on one H100."""
    from minimind_v.demo import run_demo

    report = run_demo(str(tmp_path / "demo"), "large")
    assert report["total"] == 9673 and report["accuracy"] >= 0.99
