"""The offline demo: a reduced run by default (every stage, evaluation, photos), the full one behind `-m slow`."""

import json
import os

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite_pytorch")

from minimind_v.cli import main  # noqa: E402
from minimind_v.data.easy_shapes import describe  # noqa: E402
from minimind_v.demo import SIZES, DemoSize, prepare_data, question_type  # noqa: E402


def test_captions_and_types_come_from_the_answers():
    assert describe(["yes", "blue", "circle", "no"]) == "a blue circle."
    assert describe(["no", "triangle"]) == "a triangle."
    assert [question_type(a) for a in ("no", "teal", "rectangle")] == ["yes/no", "color", "shape"]


def test_prepared_data_in_the_original_layout(tmp_path):
    import pyarrow.parquet as pq

    paths = prepare_data(str(tmp_path), DemoSize(preset={}, limit=40, renders=5, world=6, world_test=4))
    sft = pq.read_table(paths["sft.parquet"]).to_pylist()
    world = pq.read_table(tmp_path / "world" / "train.parquet").num_rows
    assert len(sft) == 40 + 5 * 6 + world  # one conversation per question: easy-vqa's, the renders', the world's
    turns = json.loads(sft[0]["conversations"])
    assert [t["role"] for t in turns] == ["user", "assistant"] and turns[0]["content"].startswith("<image>\n")
    assert sft[0]["image_bytes"][:4] == b"\x89PNG"
    captions = pq.read_table(paths["captions.parquet"]).to_pylist()
    assert len(captions) == len({row["image_bytes"] for row in sft})  # one caption per training image
    assert all(json.loads(c["conversations"])[1]["content"].startswith(("a ", "the word")) for c in captions)
    assert (tmp_path / "world" / "test.jsonl").is_file()


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
    sets = report["sets"]
    assert set(sets) == {"easy-vqa test", "renders", "shifted", "world", "world, naming a held-out pair",
                         "world captions (object set)"}
    held = sets["world, naming a held-out pair"]  # the questions naming a composition training never named
    assert 0 < held["total"] < sets["world"]["total"] and "predictions" not in sets["world"]
    assert sets["shifted"]["total"] == 6 * SIZES["quick"].eval_renders and "baselines" in sets["shifted"]
    skills = sets["world"]["per_type"]
    assert {"count", "relation (yes/no)", "binding", "existence (random)"} <= set(skills) and "caption" not in skills
    assert all({"blind", "shuffled", "margin"} <= set(row) for row in skills.values())
    assert 0 < sets["world captions (object set)"]["total"] <= SIZES["quick"].world_test
    assert len(report["samples"]) == 4 + 3 and all((out / "samples" / f"shape_{n}.png").is_file() for n in range(4))
    assert all((out / "samples" / f"scene_{n}.png").is_file() for n in range(3))  # held-out world scenes
    assert "describe the image. ->" in report["samples"][-1] and "(truth " in report["samples"][-1]
    assert "| count |" in printed and "blind | shuffled | margin" in printed
    # every training image (easy-vqa's, the renders, the world's) is in the feature cache: later epochs and stages
    # never run the tower, augmented or not
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from minimind_v.models.image_features import bytes_key

    (cache,) = (out / "feature_cache").glob("*.safetensors")
    with safe_open(str(cache), "pt") as f:
        cached = set(f.keys())
    images = pq.read_table(out / "data" / "sft.parquet", columns=["image_bytes"]).column("image_bytes").to_pylist()
    assert {bytes_key(b) for b in images} <= cached


def test_cli_offers_every_demo_size():
    from minimind_v.cli import build_parser
    from minimind_v.demo import SIZES

    demo_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    assert next(a for a in demo_parser._actions if a.dest == "size").choices == list(SIZES)


def test_world_large_reads_64_tokens_from_256_px():
    """`--size world-large`: the tower reads the image at 256 px and gives an 8 x 8 grid, which the model splices in
    place of its 64 placeholders."""
    import torch
    from PIL import Image

    from minimind_v.build import preset_model
    from minimind_v.models.efficientnet import EFFICIENTNET_MULTISCALE

    size = SIZES["world-large"]
    model = preset_model("minimind2-v", EFFICIENTNET_MULTISCALE, size.preset).eval()
    pixels = model.vision_tower.processor([Image.new("RGB", (300, 200), "white")])["pixel_values"]
    assert pixels.shape == (1, 3, 256, 256)
    with torch.no_grad():
        features = model.vision_tower(pixels)
    assert features.shape[1] == model.config.image_token_len == 64
    assert size.max_seq_len > 64 + SIZES["world"].max_seq_len - 16  # room for the world's longest samples


def test_the_tower_reads_a_few_images_at_a_time_on_a_cpu():
    """On a CPU the feature cache runs the tower CPU_CHUNK images a pass (3-5 x faster for EfficientNet than 256 at
    once): the features are those of one pass over all the images."""
    import torch
    from PIL import Image

    from minimind_v.models.efficientnet import EFFICIENTNET_MULTISCALE, load_efficientnet
    from minimind_v.models.image_features import CPU_CHUNK, ImageFeatures

    tower = load_efficientnet(EFFICIENTNET_MULTISCALE, 16)
    images = [Image.new("RGB", (40 + i, 60), (6 * i, 255 - 5 * i, 90)) for i in range(CPU_CHUNK * 2 + 3)]
    passes = []
    forward = tower.forward
    tower.forward = lambda pixels: passes.append(len(pixels)) or forward(pixels)
    features = ImageFeatures(tower, in_memory=True)
    features.add(images, [str(i) for i in range(len(images))])
    assert passes == [CPU_CHUNK, CPU_CHUNK, 3]
    whole = ImageFeatures(tower, batch_size=len(images))._encode(images)  # [N, 16, 1552]
    chunked = torch.stack([features.cache[str(i)] for i in range(len(images))]).float()
    assert torch.allclose(chunked, whole.half().float(), atol=1e-3)


@pytest.mark.slow
def test_full_demo_sees(tmp_path):
    """The README's numbers: `python -m pytest -m slow -k full tests/test_demo.py` (about 11 minutes on 2 cores):
    the targets - 99% on easy-vqa's test split, 97% on the shifted set, each question type 95% and far above both
    baselines. (Not every seed gets there: the README says how often.)"""
    from minimind_v.demo import run_demo

    sets = run_demo(str(tmp_path / "demo"), "default")["sets"]
    assert sets["easy-vqa test"]["total"] == 9673 and sets["easy-vqa test"]["accuracy"] >= 0.99
    assert sets["renders"]["accuracy"] >= 0.97 and sets["shifted"]["accuracy"] >= 0.97
    assert all(row["accuracy"] >= 0.95 and row["margin"] >= 0.4 for row in sets["shifted"]["per_type"].values())


@pytest.mark.slow
def test_world_demo(tmp_path):
    """The README's world numbers: `python -m pytest -m slow -k world tests/test_demo.py` (28-36 minutes on 2
    cores). What every CPU run of the recipe reached (it moves from machine to machine as from seed to seed): each
    skill it reads from the image 85% and 35 points or more above both baselines; comparing two named things'
    positions (relation yes/no), learned in part, against a lower bar."""
    from minimind_v.demo import run_demo

    sets = run_demo(str(tmp_path / "demo"), "world")["sets"]
    assert sets["easy-vqa test"]["accuracy"] >= 0.99 and sets["shifted"]["accuracy"] >= 0.97
    skills = sets["world"]["per_type"]
    for skill in ("binding", "reading", "relation (which)", "count", "existence (random)", "existence (popular)",
                  "existence (adversarial)"):
        assert skills[skill]["margin"] >= 0.35 and skills[skill]["accuracy"] >= 0.85, skill
    assert skills["relation (yes/no)"]["margin"] >= 0.3 and skills["relation (yes/no)"]["accuracy"] >= 0.8
    assert sets["world captions (object set)"]["accuracy"] >= 0.6
