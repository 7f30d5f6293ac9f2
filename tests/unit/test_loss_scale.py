"""The fp16 loss scale: the schedule that drives DeepSpeed's ZeRO optimizers (GradScaler's), and
the floor below which either engine stops."""

import pytest
import torch

from slurmvision.configs import load_config
from slurmvision.errors import RunError
from slurmvision.models import build_model
from slurmvision.trainer.ddp import DDPEngine
from slurmvision.trainer.deepspeed_engine import DynamicLossScale

pytestmark = pytest.mark.unit


def test_the_scale_halves_on_an_overflow_and_doubles_after_a_run_of_good_steps():
    scale = DynamicLossScale(scale=8.0, growth_interval=3)
    for _ in range(2):
        scale.update(overflow=False)
    scale.update(overflow=True)  # resets the run of good steps
    assert scale.get_scale() == 4.0
    for _ in range(2):
        scale.update(overflow=False)
    assert scale.get_scale() == 4.0
    scale.update(overflow=False)
    assert scale.get_scale() == 8.0


def test_the_scale_and_its_run_of_good_steps_survive_a_checkpoint():
    saved = DynamicLossScale(scale=8.0, growth_interval=3)
    for overflow in (True, False, False):
        saved.update(overflow)
    resumed = DynamicLossScale(growth_interval=3)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.get_scale() == 4.0
    resumed.update(overflow=False)  # the third good step in a row
    assert resumed.get_scale() == 8.0


def test_ddp_fp16_skips_overflowing_steps_and_stops_with_advice_below_a_scale_of_one():
    """fp16 on CPU (torch autocast and GradScaler), one rank: gradients that overflow at any scale."""
    config = load_config(
        "digits-demo",
        [
            "data.root=/x",
            "trainer.precision=fp16",
            "trainer.initial_scale_power=2",
            "model.name=resnet10t",
            "model.kwargs={stem_width: 8}",
            "model.kwargs.channels=[8,16,16,16]",
        ],
        cluster="local",
    )
    torch.manual_seed(0)
    engine = DDPEngine(build_model(config.model, 3), config, torch.device("cpu"))
    weights = {k: t.clone() for k, t in engine.module.state_dict().items() if "weight" in k}
    images, targets = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])

    def overflowing_step() -> None:
        with engine.forward_context(sync=True):
            loss = (
                torch.nn.functional.cross_entropy(engine.model(images), targets) * 1e30
            )  # finite; its gradients are not
        engine.backward(loss)
        engine.step()

    for expected in (2.0, 1.0):
        overflowing_step()
        assert engine.loss_scale == expected
    with pytest.raises(RunError, match="fp16 loss scale fell below 1.*trainer.precision=bf16"):
        overflowing_step()
    assert all(torch.equal(t, weights[k]) for k, t in engine.module.state_dict().items() if k in weights)
