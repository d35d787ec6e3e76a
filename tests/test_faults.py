"""Training runs survive any crash: a crash at every file operation of every save (in this process), and SIGKILL or
Ctrl-C at random instants (real `minimind-v train` processes), each followed by `--resume`, reach the weights of the
uninterrupted run bit for bit. A damaged or misused run folder is a one-line error."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import MODEL, args_for, weights
from minimind_v.cli import main
from minimind_v.training import checkpointing
from minimind_v.training.checkpointing import list_checkpoints
from minimind_v.training.trainer import Trainer

SHORT = dict(epochs=1, freeze=0, max_steps=4, save_every=2, keep_checkpoints=1, feature_cache=None)


class Crash(Exception):
    """Stands for a kill: raised at a file operation, it leaves the disk as a kill at that instant would."""


@pytest.fixture(scope="module")
def straight(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(args_for(workspace, "sft", out, **SHORT)).run()
    return weights(out)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def crash_at(monkeypatch, k: int | None) -> list[str]:
    """Count the run's file operations (renames, links, deletions, torch.save, fsyncs); raise Crash at number k."""
    seen = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            seen.append(name)
            if len(seen) - 1 == k:
                raise Crash(f"{name} #{k}")
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, op)
    for owner, name in [(os, "rename"), (os, "link"), (shutil, "rmtree"), (torch, "save"),
                        (checkpointing, "_fsync")]:
        wrap(owner, name)
    return seen


def finish(workspace, out, **kw) -> None:
    """What a user does after a crash: --resume, or start over when the run had saved nothing yet."""
    resume = bool(list_checkpoints(str(out)))
    Trainer(args_for(workspace, "sft", out, resume=resume, overwrite=not resume, **{**SHORT, **kw})).run()


def test_a_crash_at_any_file_operation_of_any_save_resumes_to_the_same_weights(workspace, tmp_path, monkeypatch,
                                                                              straight):
    ops = crash_at(monkeypatch, None)
    Trainer(args_for(workspace, "sft", tmp_path / "count", **SHORT)).run()
    monkeypatch.undo()
    assert len(ops) > 30 and {"rename", "link", "_fsync", "save", "rmtree"} <= set(ops)
    for k in range(len(ops)):
        out = tmp_path / f"crash{k}"
        crash_at(monkeypatch, k)
        with pytest.raises(Crash):
            Trainer(args_for(workspace, "sft", out, **SHORT)).run()
        monkeypatch.undo()
        finish(workspace, out)
        assert_same_weights(weights(out), straight)
        assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".")]  # leftovers cleared


def cli_command(ws, out, *extra: str) -> list[str]:
    sets = [a for k, v in MODEL.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    return [sys.executable, "-m", "minimind_v.cli", "train", "sft", "--data", ws["sft"], "--out-dir", str(out),
            "--tokenizer", ws["tokenizer"], "--vision", ws["clip"], "--batch-size", "8", "--lr", "3e-3",
            "--max-seq-len", "64", "--log-every", "1", "--warmup-ratio", "0.1", "--device", "cpu", "--freeze", "0",
            "--epochs", "3", "--save-every", "1", *sets, *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def logged_steps(out) -> int:
    try:
        with open(out / "metrics.jsonl") as f:
            return sum(1 for line in f if '"loss"' in line)
    except OSError:
        return 0


def interrupt(command: list[str], out, target: int, how: int, rng: random.Random) -> subprocess.CompletedProcess:
    """Start a run, wait until `target` steps are logged, wait a random fraction of a step, then send `how`."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while process.poll() is None and logged_steps(out) < target and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    if process.poll() is None:
        process.send_signal(how)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_and_resume(ws, tmp_path, kills: int, seed: int) -> dict:
    straight = tmp_path / "straight"
    subprocess.run(cli_command(ws, straight), env=ENV, check=True, capture_output=True, timeout=300)
    out, rng, report = tmp_path / "killed", random.Random(seed), {"kills": 0, "in_save": 0, "ctrl_c": 0}
    for number in range(kills + 1):
        how = signal.SIGINT if number == kills // 2 else signal.SIGKILL
        flags = ["--resume"] if list_checkpoints(str(out)) else ["--overwrite"]
        result = interrupt(cli_command(ws, out, *flags), out, logged_steps(out) + rng.randint(1, 2), how, rng)
        if result.returncode == 0:
            break  # the run finished before the signal
        if how == signal.SIGINT:
            assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert "the same command with --resume continues the run" in result.stderr.strip().splitlines()[-1]
            report["ctrl_c"] += 1
        else:
            assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
            report["kills"] += 1
            leftovers = [n for n in os.listdir(out / "checkpoints") if n.startswith(".")] \
                if os.path.isdir(out / "checkpoints") else []
            report["in_save"] += bool(leftovers)
    subprocess.run(cli_command(ws, out, "--resume"), env=ENV, check=True, capture_output=True, timeout=300)
    assert_same_weights(weights(out), weights(straight))
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 19))  # every step logged once, in order
    return report


def test_sigkill_and_ctrl_c_at_random_instants(workspace, tmp_path):
    report = kill_and_resume(workspace, tmp_path, kills=5, seed=0)
    print(report)
    assert report["kills"] >= 5 and report["ctrl_c"] == 1, report


@pytest.mark.slow
def test_many_sigkills_at_random_instants(workspace, tmp_path):
    report = {"kills": 0, "in_save": 0}
    for seed in range(1, 4):
        part = kill_and_resume(workspace, tmp_path / str(seed), kills=10, seed=seed)
        report = {k: report[k] + part[k] for k in report}
    print(report)
    assert report["kills"] >= 25 and report["in_save"] >= 1, report


# ------------------------------------------------------------------------------------------- misused run folders


def test_resume_needs_a_checkpoint_and_a_rerun_needs_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="has no checkpoint to continue from"):
        Trainer(args_for(workspace, "sft", out, resume=True, **SHORT))
    Trainer(args_for(workspace, "sft", out, **SHORT)).run()
    first = weights(out)
    with pytest.raises(ValueError, match="already holds a training run .* --resume, or replace it with --overwrite"):
        Trainer(args_for(workspace, "sft", out, **SHORT))
    Trainer(args_for(workspace, "sft", out, overwrite=True, **{**SHORT, "lr": 1e-3})).run()
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4] and not torch.equal(weights(out)["vision_proj.vision_proj.0.weight"],
                                                     first["vision_proj.vision_proj.0.weight"])
    assert main(["train", "sft", "--data", workspace["sft"], "--out-dir", str(out)]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(workspace, tmp_path, monkeypatch):
    from test_train import run_until_crash

    out = tmp_path / "run"
    run_until_crash(Trainer(args_for(workspace, "sft", out, **SHORT)), 3, monkeypatch)
    with pytest.raises(ValueError, match=r"settings other than the run.s .*max_steps 4 -> 5; lr 0\.003 -> 0\.01"):
        Trainer(args_for(workspace, "sft", out, resume=True, **{**SHORT, "lr": 1e-2, "max_steps": 5}))
    # how it runs may change: logging, workers, the split of the global batch
    Trainer(args_for(workspace, "sft", out, resume=True, **{**SHORT, "log_every": 2, "batch_size": 4,
                                                              "grad_accum": 2}))


def test_each_step_is_logged_once_after_a_resume(workspace, tmp_path, monkeypatch, straight):
    from test_train import run_until_crash

    out = tmp_path / "run"
    run_until_crash(Trainer(args_for(workspace, "sft", out, **{**SHORT, "save_every": 1})), 3, monkeypatch)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a kill
    Trainer(args_for(workspace, "sft", out, resume=True, **{**SHORT, "save_every": 1})).run()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4] and sum("summary" in r for r in records) == 1
    assert_same_weights(weights(out), straight)


def damage(path, how: str) -> None:
    if how == "empty":
        open(path, "w").close()
    elif how == "cut":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"garbage!")


@pytest.mark.parametrize("target, how", [("resume.pt", "empty"), ("resume.pt", "cut"), ("resume.pt", "garbage"),
                                         ("model/model.safetensors", "cut"), ("model/config.json", "garbage"),
                                         ("manifest.json", "garbage"), ("manifest.json", "empty")])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(workspace, tmp_path, capsys, target, how):
    out = tmp_path / "run"
    Trainer(args_for(workspace, "sft", out, **SHORT)).run()
    checkpoint = list_checkpoints(str(out))[-1][1]
    damage(os.path.join(checkpoint, target), how)
    argv = ["train", "sft", "--data", workspace["sft"], "--out-dir", str(out), "--resume", "--tokenizer",
            workspace["tokenizer"], "--vision", workspace["clip"], "--device", "cpu", "--batch-size", "8", "--lr",
            "3e-3", "--max-seq-len", "64", "--log-every", "1", "--warmup-ratio", "0.1", "--freeze", "0",
            "--max-steps", "4", "--save-every", "2", *[a for k, v in MODEL.items() for a in (
                "--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and os.path.join(checkpoint, target.split("/")[0]) in err[0] and "Traceback" not in err[0]


# ---------------------------------------------------------------------------------------------- data that fails


def test_a_run_whose_records_are_all_skipped_fails_without_changing_a_weight(workspace, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(workspace["sft"]).to_pydict()
    path = tmp_path / "paths.parquet"  # image_bytes holding strings: read as paths, none exists
    pq.write_table(pa.table({"conversations": rows["conversations"],
                             "image_bytes": [f"img{i}.png" for i in range(len(rows["conversations"]))]}), path)
    trainer = Trainer(args_for(workspace, "sft", tmp_path / "run", data=str(path), **SHORT))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"stopped at step \d+: (\d+) of the \1 samples read were skipped.*"
                                         r"missing image file"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_few_bad_records_are_skipped_and_training_goes_on(workspace, tmp_path):
    summary = Trainer(args_for(workspace, "sft", tmp_path / "run", **SHORT)).run()
    assert "1 corrupt image" in summary["skipped"]  # 1 of 49: under the default --max-skip-rate 0.5


def test_samples_never_exceed_the_models_context(workspace, tmp_path, monkeypatch):
    trainer = Trainer(args_for(workspace, "sft", tmp_path / "run", overrides={**MODEL, "max_position_embeddings": 56},
                               max_seq_len=512, **SHORT))
    lengths = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda batches: lengths.extend(
        b["input_ids"].shape[1] for b in batches) or step(batches))
    trainer.run()
    assert trainer.max_seq_len == 56 and lengths and max(lengths) <= 56


def test_a_loss_that_is_no_longer_finite_stops_the_run(workspace, tmp_path, monkeypatch):
    trainer = Trainer(args_for(workspace, "sft", tmp_path / "run", **SHORT))
    real = trainer.summed_loss
    monkeypatch.setattr(trainer, "summed_loss", lambda logits, labels: real(logits, labels) * float("nan")
                        if trainer.step >= 2 else real(logits, labels))
    with pytest.raises(ValueError, match="the loss is nan at step 2: training diverged"):
        trainer.run()
    assert list_checkpoints(str(tmp_path / "run")) == []  # step 2 was due to be saved: NaN weights never are


def test_a_damaged_feature_cache_is_computed_again(workspace, tmp_path, caplog):
    cache = tmp_path / "cache"
    Trainer(args_for(workspace, "sft", tmp_path / "a", **{**SHORT, "feature_cache": str(cache)})).run()
    (file,) = cache.iterdir()
    damage(file, "cut")
    Trainer(args_for(workspace, "sft", tmp_path / "b", **{**SHORT, "feature_cache": str(cache)})).run()
    assert "is damaged" in caplog.text
    assert_same_weights(weights(tmp_path / "b"), weights(tmp_path / "a"))


def test_image_data_without_a_vision_tower_is_a_clear_error_before_training(workspace, tmp_path):
    from minimind_v.training.trainer import Trainer

    with pytest.raises(ValueError, match=r"has 49 records with images, but the model has no vision tower: give "
                                         r"--vision DIR"):
        Trainer(args_for(workspace, "sft", tmp_path / "run", vision=None))
    assert not os.path.exists(tmp_path / "run" / "run.json")
