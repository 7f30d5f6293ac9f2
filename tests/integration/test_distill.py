"""Knowledge distillation: a frozen teacher from a finished run, a soft KL term in the loss."""

import pytest
import torch

from slurmvision.errors import SlurmVisionError
from slurmvision.launch.local import train_here
from slurmvision.trainer.step import distill_loss

from .conftest import TINY_MODEL, tiny_config

pytestmark = pytest.mark.integration
SHORT = ["trainer.max_steps=4", "trainer.checkpoint_every=4"]


def teacher_settings(teacher_run, weight: float) -> list[str]:
    name = next(o for o in TINY_MODEL if o.startswith("model.name=")).split("=", 1)[1]
    kwargs = [
        o.replace("model.kwargs.", "model.distill.teacher_kwargs.") for o in TINY_MODEL if o.startswith("model.kwargs.")
    ]
    return [
        f"model.distill.teacher={name}",
        f"model.distill.teacher_weights={teacher_run}",
        f"model.distill.weight={weight}",
        *kwargs,
    ]


def test_distill_loss_is_zero_for_the_teachers_own_logits_and_scales_with_temperature():
    logits = torch.randn(5, 4, requires_grad=True)
    assert distill_loss(logits, logits.detach(), 2.0).abs() < 1e-6
    other = torch.randn(5, 4)
    assert distill_loss(logits, other, 1.0) > 0
    distill_loss(logits, other, 3.0).backward()
    assert logits.grad.abs().sum() > 0


def test_distillation_trains_against_a_frozen_teacher(tiny_shards, tmp_path):
    teacher_run = tmp_path / "teacher"
    train_here(tiny_config(tiny_shards, teacher_run, *SHORT), nproc=1)

    plain = train_here(tiny_config(tiny_shards, tmp_path / "plain", *SHORT), nproc=1)
    # Weight 0: the teacher runs but cannot change anything, down to the last bit.
    unweighted = train_here(
        tiny_config(tiny_shards, tmp_path / "w0", *SHORT, *teacher_settings(teacher_run, 0.0)), nproc=1
    )
    assert unweighted["params_sha256"] == plain["params_sha256"]
    distilled = train_here(
        tiny_config(tiny_shards, tmp_path / "w1", *SHORT, *teacher_settings(teacher_run, 0.7), "data.mixup=0.8"),
        nproc=1,
    )
    assert distilled["params_sha256"] != plain["params_sha256"]
    log = (tmp_path / "w1" / "logs" / "rank-00000.log").read_text()
    assert "distilling from" in log


def test_a_teacher_that_does_not_fit_is_a_clear_error(tiny_shards, tmp_path):
    teacher_run = tmp_path / "teacher"
    train_here(tiny_config(tiny_shards, teacher_run, *SHORT), nproc=1)
    settings = teacher_settings(teacher_run, 0.5)
    settings = [s.replace("teacher_kwargs.embed_dim=16", "teacher_kwargs.embed_dim=8") for s in settings]
    with pytest.raises(SlurmVisionError, match="teacher"):
        train_here(tiny_config(tiny_shards, tmp_path / "student", *SHORT, *settings), nproc=1)
    with pytest.raises(SlurmVisionError, match="teacher_weights"):
        train_here(tiny_config(tiny_shards, tmp_path / "student2", *SHORT, "model.distill.teacher=resnet18"), nproc=1)
