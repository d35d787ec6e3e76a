"""`minimind-v bench decode` and `bench train` on the reference setting, small enough for the CPU."""

import json
import os

import pyarrow.parquet as pq
import pytest

from helpers import GENERATOR
from minimind_v.cli import main
from minimind_v.bench.reference import find_generator, find_reference_tokenizer, make_reference_data

SMALL_LLM = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "intermediate_size=128",
             "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2"]


def table(text: str) -> dict[str, str]:
    """The rows of the Markdown table a bench command prints, as {figure: value}."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows[1:]}  # rows[0] is the header


def test_bench_decode_builds_the_reference_model(capsys):
    assert main(["bench", "decode", "--device", "cpu", "--prompt-tokens", "100", "--new-tokens", "4",
                 "--batch", "2", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    figures = table(out)
    assert out.startswith("bench decode: cpu, float32, step by step, 1") and "with 1 image(s)" in out.splitlines()[0]
    assert float(figures["batch 1: decode tokens/s"].replace(",", "")) > 0
    assert float(figures["batch 2: decode tokens/s"].replace(",", "")) > 0
    assert figures["batch 2: prefill"].endswith(" ms") and "34 at batch 1 on a 2-core CPU" in out  # the original's figure


def test_bench_decode_chain_length(capsys):
    """`--chain N` reaches the engine (its decoding mode names it where steps are fixed-shape: compiled on a CPU);
    a chain shorter than one step is refused before any model is built."""
    with pytest.raises(SystemExit, match="--chain must be at least 1"):
        main(["bench", "decode", "--device", "cpu", "--chain", "0"])
    assert main(["bench", "decode", "--device", "cpu", "--new-tokens", "4", "--batch", "1", "--runs", "1", "--compile",
                 "--chain", "2", *SMALL_LLM]) == 0
    assert capsys.readouterr().out.startswith("bench decode: cpu, float32, compiled static steps, up to 2 greedy")


def test_bench_train_reports_throughput(workspace, tmp_path, capsys):
    args = ["bench", "train", "--work-dir", str(tmp_path), "--data", workspace["sft"], "--steps", "2", "--warmup",
            "1", "--batch-size", "4", "--max-seq-len", "128", "--device", "cpu", *SMALL_LLM]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps_timed"] == 2 and report["batch_size"] == 4 and report["mfu"] is None  # no peak on a CPU
    assert report["samples_per_s"] > 0 and report["padded_tokens_per_s"] >= report["real_tokens_per_s"] > 0
    assert report["model_tflops_per_s"] > 0 and len(report["losses"]) == 3  # every step, warm-up ones too
    assert main(args) == 0  # the default: one table of the figures
    out = capsys.readouterr().out
    figures = table(out)
    assert out.startswith("bench train: cpu, float32, batch 4, ")
    assert "original MiniMind-V" not in out  # its figures are for the reference data and model, not this run's
    assert float(figures["samples/s"].replace(",", "")) > 0 and figures["peak GPU memory"] == "n/a (CPU)"
    assert figures["model TFLOP/s, MFU"].endswith("n/a (no known peak)") and " -> " in figures[
        "loss, first -> last step"]


def test_bench_train_packing_keeps_the_loss_curve(workspace, tmp_path, capsys):
    """The optimised path (packed rows) trains through the same per-step losses as the plain padded one."""
    curves = []
    for flags in ([], ["--packing"]):
        assert main(["bench", "train", "--json", "--work-dir", str(tmp_path), "--data", workspace["sft"],
                     "--steps", "3", "--warmup", "1", "--batch-size", "4", "--max-seq-len", "128", "--device", "cpu",
                     *SMALL_LLM, *flags]) == 0
        curves.append(json.loads(capsys.readouterr().out)["losses"])
    assert curves[1] == pytest.approx(curves[0], abs=2e-4) and len(set(curves[0])) > 1


@pytest.mark.skipif(not os.path.isfile(GENERATOR), reason="the shared bench generator is not here")
def test_reference_data_comes_from_the_shared_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_V_BENCH_GENERATOR", str(GENERATOR))
    path = make_reference_data(tmp_path / "bench.parquet", rows=8)
    assert pq.read_table(path).num_rows == 8 and find_generator()


def test_a_missing_generator_or_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.py' does not exist.*--generator PATH.*--data PARQUET"):
        find_generator(str(tmp_path / "nowhere.py"))
    monkeypatch.delenv("MINIMIND_V_BENCH_GENERATOR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"neither --generator nor \$MINIMIND_V_BENCH_GENERATOR is set"):
        find_generator()  # nothing is looked up implicitly (no ../shared from the working directory)
    monkeypatch.setenv("MINIMIND_V_BENCH_TOKENIZER", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        find_reference_tokenizer()


def test_bench_train_with_a_feature_cache_skips_the_tower_later(workspace, tmp_path, capsys, monkeypatch):
    """The pretrain lever: each distinct image goes through the tower once (the workspace's 48 rows show 3 images);
    every later use, in this epoch or the next, reads the cache."""
    from minimind_v.models.vision_tower import VisionTower

    calls = []
    original = VisionTower.forward
    monkeypatch.setattr(VisionTower, "forward",
                        lambda self, pixels: calls.append(len(pixels)) or original(self, pixels))
    assert main(["bench", "train", "--json", "--work-dir", str(tmp_path), "--data", workspace["sft"],
                 "--steps", "6", "--warmup", "6", "--batch-size", "8", "--max-seq-len", "128", "--device", "cpu",
                 "--freeze", "2", "--feature-cache", str(tmp_path / "cache"), *SMALL_LLM]) == 0
    assert sum(calls) == 3 and len(json.loads(capsys.readouterr().out)["losses"]) == 12  # 12 steps: 2 epochs


def test_the_train_table_shows_gpu_figures():
    """MFU and peak memory as a GPU report has them (the CPU run above has neither)."""
    from minimind_v.bench.train import table_rows

    report = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "batch_size": 256, "packing": True,
              "compile": True, "trainable_params": 100, "steps_timed": 40, "samples_per_s": 1714.3,
              "real_tokens_per_s": 720010, "padded_tokens_per_s": 730000, "model_tflops_per_s": 314.5,
              "mfu": 0.318, "peak_gpu_memory_mib": 31744, "step_ms_median": 149.0, "step_ms_max": 150.2,
              "data_wait_ms_mean": 0.1, "losses": [8.9, 6.3], "processes": 1, "parallel": "ddp",
              "warmup_steps": 5, "warmup_seconds": 21.4}
    title, rows = table_rows(report)
    rows = dict(rows)
    assert title.startswith("bench train: NVIDIA H100 80GB HBM3, bfloat16, batch 256, packing, compile, 100 ")
    assert rows["model TFLOP/s, MFU"] == "314.5, 31.8%" and rows["peak GPU memory"] == "31.0 GiB"
    assert rows["real tokens/s"] == "720,010" and rows["loss, first -> last step"] == "8.9000 -> 6.3000"
    assert rows["warm-up steps (compiling included)"] == "5 in 21.4 s"
    title, rows = table_rows({**report, "processes": 2, "parallel": "fsdp"})  # under torchrun: sums, memory per GPU
    assert title.startswith("bench train: 2 x NVIDIA H100 80GB HBM3 (fsdp), bfloat16, batch 256")
    assert dict(rows)["peak GPU memory"] == "31.0 GiB (per GPU, the first process)"
