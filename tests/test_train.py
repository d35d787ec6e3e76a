"""The training loop: freeze strategies, batching, a loss that falls, resume, 2-process Gloo, CLI; evaluation."""

import json
import os

import pytest
import torch
from PIL import Image

from helpers import COLORS, args_for, tiny_config, torchrun, weights
from minimind_v import MiniMindVLM
from minimind_v.cli import main
from minimind_v.evaluate import QAItem, generate_answers, normalize_answer, score
from minimind_v.training.trainer import STAGES, Trainer, apply_freeze, lr_factor, micro_batches, step_batches

def test_freeze_strategies(clip_dir):
    model = MiniMindVLM(tiny_config(num_hidden_layers=3), vision_model_path=clip_dir)
    trainable = lambda: {n.split(".")[0] if not n.startswith("model.layers.") else ".".join(n.split(".")[:3])  # noqa
                         for n, p in model.named_parameters() if p.requires_grad}
    apply_freeze(model, 0)
    assert trainable() == {"model.embed_tokens", "model.norm", "model.layers.0", "model.layers.1",
                           "model.layers.2", "vision_proj"} - {"model.embed_tokens", "model.norm"} | {"model"}
    apply_freeze(model, 1)
    assert trainable() == {"model.layers.0", "model.layers.2", "vision_proj"}
    apply_freeze(model, 2)
    assert trainable() == {"vision_proj"}
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert [STAGES[s]["freeze"] for s in ("pretrain-llm", "pretrain-vlm", "sft")] == [0, 2, 1]


def test_global_batch_split_does_not_depend_on_processes():
    step = step_batches(40, seed=1, epoch=0, global_batch=8)[0]
    for world, accum in [(1, 4), (2, 2), (4, 1)]:
        parts = [mb for rank in range(world) for mb in micro_batches(step, rank, world, accum)]
        assert sum(parts, []) == step
    assert step_batches(40, 1, 0, 8) == step_batches(40, 1, 0, 8) != step_batches(40, 1, 1, 8)
    assert len(step_batches(41, 1, 0, 8)) == 5  # the short tail is dropped


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)


def test_tiny_sft_run_lowers_the_loss_and_writes_everything(workspace, tmp_path):
    out = tmp_path / "sft"
    summary = Trainer(args_for(workspace, "sft", out, epochs=10, freeze=0, feature_cache=str(tmp_path / "cache"))).run()
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == summary["steps"] == 10 * (48 // 8)
    rates = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    assert max(rates) == pytest.approx(3e-3)  # --lr as scheduled, not the projector's (x5)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert "1 corrupt image" in summary["skipped"]
    assert {"model", "checkpoints", "run.json", "loss.png", "metrics.jsonl"} <= set(os.listdir(out))
    assert not any(k.startswith("vision_tower.") for k in weights(out))
    assert os.listdir(tmp_path / "cache")  # features were cached on disk
    model = MiniMindVLM.from_pretrained(out / "model")
    from minimind_v.data.tokenizer import load_tokenizer

    items = [QAItem("<image>\nwhat color is it?", name, [Image.new("RGB", (32, 32), rgb)], qtype="color")
             for name, rgb in COLORS.items()]
    report = score(items, generate_answers(model, load_tokenizer(out / "model"), items, max_new_tokens=8))
    assert report["accuracy"] == 1.0 and report["per_type"]["color"]["total"] == 3


def test_a_filled_feature_cache_spares_decoding_and_changes_no_loss(workspace, tmp_path, monkeypatch):
    """A second run over the same images with their features cached decodes none of them (the corrupt one, never
    cached, is still read and skipped) and trains exactly as the run that filled the cache; so do its later epochs."""
    import minimind_v.data.datasets as datasets

    cache = str(tmp_path / "cache")
    first = Trainer(args_for(workspace, "sft", tmp_path / "a", epochs=2, freeze=0, feature_cache=cache)).run()
    decoded = []
    original = datasets.decode_image
    monkeypatch.setattr(datasets, "decode_image", lambda *a: decoded.append(a) or original(*a))
    second = Trainer(args_for(workspace, "sft", tmp_path / "b", epochs=2, freeze=0, feature_cache=cache)).run()
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "metrics.jsonl")) if "loss" in r]
              for run in "ab"]
    assert losses[0] == losses[1] and first["loss"] == second["loss"]
    assert len(decoded) == 1 and "1 corrupt image" in second["skipped"]  # the corrupt record, once (then remembered)


def test_bf16_on_the_cpu_reads_the_fp16_feature_cache(workspace, tmp_path):
    """--dtype bf16 on a CPU with a feature cache: the cached fp16 features are gathered outside autocast (inside it,
    CPU autocast refused them with a RuntimeError)."""
    cache = str(tmp_path / "cache")
    summary = Trainer(args_for(workspace, "sft", tmp_path / "a", freeze=0, max_steps=2, feature_cache=cache,
                               dtype="bf16", device="cpu")).run()
    assert summary["steps"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    assert os.listdir(cache)  # the features were cached: every step read them back as fp16


def test_the_logged_loss_is_the_mean_of_its_interval(workspace, tmp_path):
    def logged(out, every):
        Trainer(args_for(workspace, "sft", tmp_path / out, freeze=0, max_steps=6, log_every=every,
                         feature_cache=None)).run()
        return [r["loss"] for r in map(json.loads, open(tmp_path / out / "metrics.jsonl")) if "loss" in r]

    each, grouped = logged("each", 1), logged("grouped", 3)
    assert grouped == pytest.approx([sum(each[:3]) / 3, sum(each[3:]) / 3], abs=2e-5)
    assert grouped[0] != pytest.approx(each[2], abs=1e-3)  # not the interval's last step


@pytest.mark.parametrize("stage", ["pretrain-llm", "pretrain-vlm"])
def test_stage_trains_what_its_freeze_strategy_says(workspace, tmp_path, stage):
    trainer = Trainer(args_for(workspace, stage, tmp_path / stage, max_steps=2))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == ({"model"} if stage == "pretrain-llm" else {"vision_proj"})


class Crash(RuntimeError):
    pass


def run_until_crash(trainer, steps: int, monkeypatch) -> None:
    """Run `trainer` and let it die when step `steps + 1` begins."""
    original_step, calls = trainer.train_step, []

    def step_then_crash(batches):
        if len(calls) == steps:
            raise Crash()
        calls.append(1)
        return original_step(batches)

    monkeypatch.setattr(trainer, "train_step", step_then_crash)
    with pytest.raises(Crash):
        trainer.run()


def test_resume_after_a_crash_reaches_the_same_weights(workspace, tmp_path, monkeypatch):
    kw = dict(epochs=2, freeze=0, save_every=3)
    Trainer(args_for(workspace, "sft", tmp_path / "straight", **kw)).run()
    # dies when step 8 begins; the last checkpoint is from step 6
    run_until_crash(Trainer(args_for(workspace, "sft", tmp_path / "resumed", **kw)), 7, monkeypatch)
    resumed = Trainer(args_for(workspace, "sft", tmp_path / "resumed", resume=True, **kw))
    assert resumed.step == 6
    resumed.run()
    straight, again = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=1e-5)


def test_two_gloo_processes_equal_one_process(workspace, tmp_path):
    common = dict(epochs=1, freeze=0, max_steps=4, feature_cache=None)
    single = args_for(workspace, "sft", tmp_path / "one", batch_size=4, grad_accum=2, **common)
    Trainer(single).run()
    result, = torchrun(args_for(workspace, "sft", tmp_path / "two", batch_size=4, grad_accum=1, **common), tmp_path)
    assert "destroy_process_group" not in result.stderr  # the processes left the process group
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    loss = lambda out: [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]  # noqa
    assert loss(tmp_path / "two") == pytest.approx(loss(tmp_path / "one"), rel=1e-4)


def test_cli_train_and_eval(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "pretrain-llm", "--data", workspace["text"], "--out-dir", str(out), "--tokenizer",
                 workspace["tokenizer"], "--batch-size", "8", "--max-steps", "2", "--max-seq-len", "32",
                 "--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2",
                 "--set", "num_key_value_heads=1"]) == 0
    assert '"steps": 2' in capsys.readouterr().out
    assert main(["train", "sft", "--data", "x.parquet", "--out-dir", str(out)]) == 2  # a clear error, no traceback
    assert "error" in capsys.readouterr().err


def test_normalised_exact_match():
    assert normalize_answer("  The Circle. ") == "circle" == normalize_answer("circle")
    assert normalize_answer("Yes!") == "yes"
    items = [QAItem("q", "red", qtype="color"), QAItem("q", "yes", qtype="yes/no"), QAItem("q", "no", qtype="yes/no")]
    report = score(items, ["Red.", "yes", "yes"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_type"] == {"color": {"accuracy": 1.0, "total": 1}, "yes/no": {"accuracy": 0.5, "total": 2}}


def test_resume_with_another_number_of_processes(workspace, tmp_path, monkeypatch):
    """1 process (micro-batch 4 x accumulation 2) crashes; 2 Gloo processes (4 x 1) finish the run."""
    common = dict(epochs=1, freeze=0, max_steps=5, save_every=2, feature_cache=None)
    Trainer(args_for(workspace, "sft", tmp_path / "straight", batch_size=4, grad_accum=2, **common)).run()
    run_until_crash(Trainer(args_for(workspace, "sft", tmp_path / "moved", batch_size=4, grad_accum=2, **common)), 3,
                    monkeypatch)
    torchrun(args_for(workspace, "sft", tmp_path / "moved", batch_size=4, grad_accum=1, resume=True, **common),
                 tmp_path)
    straight, moved = weights(tmp_path / "straight"), weights(tmp_path / "moved")
    for key in straight:
        torch.testing.assert_close(moved[key], straight[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", [False, True])
def test_loader_workers_preprocess_images_to_the_same_weights(workspace, tmp_path, cache):
    """With workers, images become pixel values in the workers (with a feature cache: those not cached yet, which
    the tower then encodes once); the result is unchanged, skipped records included."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        trainer = Trainer(args_for(workspace, "sft", out, num_workers=workers, max_steps=3,
                                   feature_cache=str(out / "cache") if cache else None))
        assert (trainer.dataset.transform is not None) == (workers > 0)
        summary = trainer.run()
        runs[workers] = (weights(out), summary["skipped"])
    assert runs[0][1] == runs[2][1]
    for key in runs[0][0]:
        torch.testing.assert_close(runs[2][0][key], runs[0][0][key], atol=1e-6, rtol=1e-5)


def test_train_reads_a_config_file_and_the_command_line_wins(workspace, tmp_path, capsys):
    """--config (JSON or YAML, a run's run.json as is) gives the defaults; flags on the command line win; an unknown
    key is an error naming the closest one."""
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    config = {"stage": "pretrain-llm", "data": workspace["text"], "tokenizer": workspace["tokenizer"],
              "batch-size": 8, "max_steps": 3, "max_seq_len": 32, "overrides": tiny, "lr": "1e-3"}
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out-dir", str(tmp_path / "a"),
                 "--max-steps", "2"]) == 0
    settings = json.load(open(tmp_path / "a" / "run.json"))
    assert settings["max_steps"] == 2 and settings["batch_size"] == 8 and settings["lr"] == 1e-3
    assert settings["overrides"] == tiny and settings["stage"] == "pretrain-llm"
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "a" / "run.json"), "--out-dir", str(tmp_path / "b")]) == 0
    again = json.load(open(tmp_path / "b" / "run.json"))
    assert {k: v for k, v in again.items() if k != "out_dir"} == {k: v for k, v in settings.items() if k != "out_dir"}
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1e-3}))
    capsys.readouterr()
    assert main(["train", "sft", "--config", str(tmp_path / "bad.json")]) == 2
    assert "unknown training argument 'learning_rate'" in capsys.readouterr().err
    assert main(["train", "sft", "--data", workspace["sft"]]) == 2
    assert "train needs out-dir (on the command line or in --config)" in capsys.readouterr().err


def test_a_config_file_value_of_the_wrong_type_is_a_clear_error(tmp_path, capsys):
    from minimind_v.training.args import read_config_file

    (tmp_path / "c.json").write_text(json.dumps({"epochs": [2], "data": "d", "out-dir": "o"}))
    with pytest.raises(ValueError, match=r"epochs must be int, got \[2\]"):
        read_config_file(str(tmp_path / "c.json"))
    (tmp_path / "c.json").write_text(json.dumps({"packing": 1}))
    with pytest.raises(ValueError, match="packing must be bool"):
        read_config_file(str(tmp_path / "c.json"))
    (tmp_path / "c.json").write_text(json.dumps({"lr": 1, "lora_rank": None, "max_steps": "5", "overrides": {}}))
    assert read_config_file(str(tmp_path / "c.json")) == {"lr": 1, "lora_rank": None, "max_steps": "5",
                                                          "overrides": {}}
    (tmp_path / "c.yaml").write_text("- a list\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "must hold a mapping of training arguments, not list" in capsys.readouterr().err


def test_the_files_a_run_names_are_checked_before_a_model_is_built(workspace, tmp_path, monkeypatch):
    import minimind_v.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "training_model", lambda args: pytest.fail("a model was built"))
    for change, message in ((dict(data=str(tmp_path / "missing.parquet")), "--data .*missing.parquet does not exist"),
                            (dict(data=str(tmp_path / "notes.txt")), "the file must end in .parquet, .json, .jsonl"),
                            (dict(from_weight=str(tmp_path / "nothing")), "--from-weight .*nothing does not exist"),
                            (dict(tokenizer=str(tmp_path / "tok")), "--tokenizer .*tok does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            Trainer(args_for(workspace, "sft", tmp_path / "run", **change))
