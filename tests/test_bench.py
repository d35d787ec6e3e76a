"""`minimind-v bench decode` and `bench train` on the reference setting, small enough for the CPU."""

import json
import os

import pyarrow.parquet as pq
import pytest

from minimind_v.cli import main
from minimind_v.reference import find_generator, make_reference_data

SMALL_LLM = ["--set", "hidden_size=64", "--set", "num_hidden_layers=2", "--set", "intermediate_size=128",
             "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2"]


def test_bench_decode_builds_the_reference_model(capsys):
    assert main(["bench", "decode", "--device", "cpu", "--prompt-tokens", "100", "--new-tokens", "4", "--batch", "2",
                 "--runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 1 and report["prompt_tokens"] >= 100  # 64 image tokens inside
    assert report["batch_1"]["decode_tokens_per_s"] > 0 and report["batch_2"]["decode_tokens_per_s"] > 0


def test_bench_train_reports_throughput(workspace, tmp_path, capsys):
    assert main(["bench", "train", "--work-dir", str(tmp_path), "--data", workspace["sft"], "--steps", "2",
                 "--warmup", "1", "--batch-size", "4", "--max-seq-len", "128", "--device", "cpu", *SMALL_LLM]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps_timed"] == 2 and report["batch_size"] == 4 and report["mfu"] is None  # no peak on a CPU
    assert report["samples_per_s"] > 0 and report["padded_tokens_per_s"] >= report["real_tokens_per_s"] > 0
    assert report["model_tflops_per_s"] > 0 and len(report["loss_first_last"]) == 2


@pytest.mark.skipif(not any(os.path.isfile(p) for p in ("../shared/bench/make_vlm_parquet.py",
                                                         "/work/shared/bench/make_vlm_parquet.py")),
                    reason="the shared bench generator is not here")
def test_reference_data_comes_from_the_shared_generator(tmp_path, monkeypatch):
    if not os.path.isfile("../shared/bench/make_vlm_parquet.py"):
        monkeypatch.setenv("MINIMIND_V_BENCH_GENERATOR", "/work/shared/bench/make_vlm_parquet.py")
    path = make_reference_data(tmp_path / "bench.parquet", rows=8)
    assert pq.read_table(path).num_rows == 8 and find_generator()


def test_a_missing_generator_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--generator PATH or --data"):
        find_generator(str(tmp_path / "nowhere.py"))
