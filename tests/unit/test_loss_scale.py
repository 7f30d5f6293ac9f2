"""The fp16 loss scale that drives DeepSpeed's ZeRO optimizers (GradScaler's schedule)."""

import pytest

from slurmvision.errors import RunError
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


def test_an_overflow_at_the_smallest_scale_stops_with_advice():
    scale = DynamicLossScale(scale=2.0)
    scale.update(overflow=True)
    assert scale.get_scale() == 1.0
    with pytest.raises(RunError, match="fp16 loss scale fell below 1.*trainer.precision=bf16"):
        scale.update(overflow=True)
