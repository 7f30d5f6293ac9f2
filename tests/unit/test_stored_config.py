"""A checkpoint's stored config is data: reading someone else's run (eval, export, checkpoint inspect,
fine-tuning and distillation weights) never runs the `pipe:` command stored in it; the user may give a
data root (a pipe: command too) on the command line."""

import json

import pytest

from slurmvision.cli import main
from slurmvision.configs import load_config, to_dict
from slurmvision.errors import SlurmVisionError
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.evaluate.model import load_model
from slurmvision.models import build_model, load_weights
from slurmvision.trainer.checkpoint import CheckpointManager, rng_state
from slurmvision.trainer.distributed import DistEnv

pytestmark = pytest.mark.unit

TINY = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}


@pytest.fixture
def planted(tmp_path):
    """(a run whose stored data.root is a pipe: command that would leave a marker file, the marker)."""
    marker = tmp_path / "ran"
    root = f"pipe:touch {marker}; cat /nonexistent/{{}}"
    config = load_config(
        "digits-demo",
        [f"data.root={root}", "model.name=swinv2_tiny_window8_256", f"model.kwargs={json.dumps(TINY)}"],
        run_dir=tmp_path / "theirs",
    )
    model = build_model(config.model, 2)
    manager = CheckpointManager(tmp_path / "theirs" / "checkpoints", DistEnv(), keep=1)
    manager.save(
        1,
        {"config": json.dumps(to_dict(config)), "engine": {"model": model.state_dict()}, "step": 1},
        {"rng": rng_state()},
        {"step": 1, "epoch": 0},
    )
    return tmp_path / "theirs", marker


@pytest.mark.parametrize("command", [["eval"], ["export", "--opset", "17"]])
def test_eval_and_export_refuse_a_stored_pipe_command(command, planted, tmp_path, capsys):
    run, marker = planted
    outputs = [str(tmp_path / "model.onnx")] if command[0] == "export" else []
    assert main([command[0], str(run), *outputs, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root='pipe:touch" in err and "--data-root" in err
    assert not marker.exists()


def test_a_pipe_command_the_user_gives_is_run_instead(planted, tmp_path):
    run, marker = planted
    mine = tmp_path / "mine"
    with pytest.raises(SlurmVisionError):  # no shards behind it, but it is the user's command that ran
        load_model(run, data_root=f"pipe:touch {mine}; cat /nonexistent/{{}}")
    assert mine.exists() and not marker.exists()


def test_inspect_and_weights_for_finetuning_or_distillation_read_no_config(planted):
    run, marker = planted
    assert inspect_checkpoint(run / "checkpoints")["valid"]
    assert "head.fc.weight" in load_weights(str(run / "checkpoints"), "model.finetune_from")
    assert not marker.exists()
