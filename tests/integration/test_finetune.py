"""Fine-tuning from a finished run: the body's weights load, a new head starts fresh."""

import pytest
import torch
import yaml

from slurmvision.configs.model import ModelConfig
from slurmvision.evaluate.model import load_model
from slurmvision.launch.local import train_here
from slurmvision.models import build_model

from .conftest import TINY_MODEL, tiny_config

pytestmark = pytest.mark.integration


def test_finetune_loads_the_body_and_recreates_a_head_of_another_size(tiny_shards, tmp_path):
    source = tmp_path / "source"
    train_here(tiny_config(tiny_shards, source, "trainer.max_steps=3"), nproc=1)
    trained, *_ = load_model(source)
    kwargs = {
        o.split("=", 1)[0].removeprefix("model.kwargs."): yaml.safe_load(o.split("=", 1)[1])
        for o in TINY_MODEL
        if "kwargs" in o
    }
    model = build_model(
        ModelConfig(name="swinv2_tiny_window8_256", kwargs=kwargs, finetune_from=str(source), freeze=["patch_embed"]),
        num_classes=5,
    )
    ours, theirs = model.state_dict(), trained.state_dict()
    heads = {k for k in ours if ours[k].shape != theirs[k].shape}
    assert heads == {"head.fc.weight", "head.fc.bias"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in heads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("patch_embed"))
