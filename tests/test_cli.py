"""The `minimind-v` console script: diagnose and presets, clear errors instead of tracebacks."""

import shutil
import subprocess

import torch

from helpers import tiny_config
from minimind_v import MiniMindVLM
from minimind_v.cli import main
from minimind_v.diagnose import active_parameters, diagnose


def test_diagnose_random_preset_with_tower(capsys, clip_dir):
    code = main(["diagnose", "--preset", "tiny", "--set", "num_hidden_layers=1", "--set", "ve_hidden_size=32",
                 "--set", "image_ids=[34,34,34,34,34,34,34,34,34,34,34,34,34,34,34,34]", "--vision", clip_dir,
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "256d x 1 layers" in out and "vision tower: loaded" in out
    assert "forward pass: ok" in out and "no NaN/Inf" in out and "MiB" in out


def test_diagnose_saved_model_folder_and_moe(tmp_path, capsys, clip_dir):
    torch.manual_seed(0)
    MiniMindVLM(tiny_config(use_moe=True, n_routed_experts=4, num_experts_per_token=1),
                vision_model_path=clip_dir).save_pretrained(tmp_path / "m")
    assert main(["diagnose", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "MoE: on, 4 experts, top-1" in out and "active parameters per token" in out


def test_diagnose_reports_counts_and_nan():
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(use_moe=True, n_routed_experts=4, num_experts_per_token=1))
    lines = []
    report = diagnose(model, echo=lines.append)
    assert report["vision_tower_loaded"] is False and report["forward_ok"] and report["finite"]
    assert report["total_parameters"] == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.model.layers[0].mlp.experts[0].parameters())
    assert report["active_parameters"] == report["total_parameters"] - 2 * 3 * expert  # 1 of 4 experts per layer
    assert active_parameters(model) == report["active_parameters"]
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    assert diagnose(model, echo=lines.append)["finite"] is False
    assert any("BAD" in line for line in lines)


def test_bad_input_gives_a_clear_error_not_a_traceback(capsys):
    assert main(["diagnose", "--preset", "tiny", "--set", "hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'hidden_size'" in err and "Traceback" not in err
    assert main(["diagnose", "--model", "/no/such/folder"]) == 2


def test_console_script_is_installed():
    import os
    import sys

    # the script beside this interpreter (`make test` runs .venv/bin/python without .venv/bin on PATH)
    exe = shutil.which("minimind-v", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None
    result = subprocess.run([exe, "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "minimind-3v" in result.stdout and "large_moe" in result.stdout


def test_version(capsys):
    import pytest

    from minimind_v import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"minimind-v {__version__}"


def walk_options(parser, path=()):
    """(command path, option) of every option of every (sub)command, -h aside."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk_options(child, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_option_of_every_command_has_help_and_shows_its_default():
    from minimind_v.cli import build_parser

    options = list(walk_options(build_parser()))
    assert len(options) > 150 and {"train", "eval", "chat", "serve", "bench train", "bench serve"} <= {
        path for path, _ in options}
    assert [(path, a.option_strings or a.dest) for path, a in options if not a.help] == []
    train = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "peak learning rate" in train and "(default: 0.0005)" in train and "0 the whole language model" in train
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]._subparsers._group_actions[0]
    assert "peak" not in bench.choices["train"].format_help()  # only the training options bench train takes
    assert "(default: 768)" in bench.choices["train"].format_help()  # and its own defaults


def test_help_builds_without_importing_torch():
    import sys

    code = ("import sys; from minimind_v.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    help_text = subprocess.run([sys.executable, "-m", "minimind_v.cli", "train", "--help"], capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "--projector-lr-mult" in help_text.stdout


def test_the_model_is_named_either_way_and_once(tmp_path, capsys):
    torch.manual_seed(0)
    MiniMindVLM(tiny_config()).save_pretrained(tmp_path / "m")
    assert main(["diagnose", str(tmp_path / "m"), "--device", "cpu"]) == 0
    assert main(["diagnose", "--model", str(tmp_path / "m"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m"), "--model", str(tmp_path / "other"), "--data", "x.jsonl"]) == 2
    assert "two models given" in capsys.readouterr().err
    assert main(["eval", "--data", "x.jsonl"]) == 2
    assert "a model is needed: minimind-v eval MODEL (or --model MODEL)" in capsys.readouterr().err
