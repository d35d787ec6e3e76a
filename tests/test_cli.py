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
    exe = shutil.which("minimind-v")
    assert exe is not None
    result = subprocess.run([exe, "presets"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "minimind-3v" in result.stdout and "large_moe" in result.stdout


def test_version(capsys):
    import pytest

    from minimind_v import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"minimind-v {__version__}"
