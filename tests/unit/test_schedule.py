"""The optimizer's parameter groups and the LR / weight-decay schedules (pure functions of the step)."""

import math

import pytest

from slurmvision.configs import load_config
from slurmvision.errors import ConfigError
from slurmvision.models import build_model
from slurmvision.trainer.optim import build_optimizer
from slurmvision.trainer.schedule import build_schedule

pytestmark = pytest.mark.unit
SWIN = [
    "model.name=swinv2_tiny_window8_256",
    "model.kwargs={img_size: 32, patch_size: 4, window_size: 4, embed_dim: 16, depths: [2, 2], num_heads: [1, 2]}",
]


def setup(*overrides):
    config = load_config(
        "digits-demo",
        [
            "data.root=/x",
            *SWIN,
            "trainer.max_steps=100",
            "optim.lr=1e-3",
            "optim.min_lr=1e-5",
            "optim.warmup_lr=1e-6",
            "optim.warmup_steps=10",
            "optim.weight_decay=0.05",
            *overrides,
        ],
        cluster="local",
    )
    model = build_model(config.model, 4)
    optimizer = build_optimizer(model, config)
    return model, optimizer, build_schedule(optimizer, config, global_batch=64, samples_per_epoch=640)


def decay_of(model, optimizer) -> dict[str, float]:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)]["weight_decay"] for name, p in model.named_parameters()}


def test_norms_biases_and_position_tables_have_no_weight_decay():
    model, optimizer, at = setup()
    at(0)
    decay = decay_of(model, optimizer)
    assert decay["layers.0.blocks.0.attn.qkv.weight"] == decay["head.fc.weight"] == 0.05
    for name in (
        "layers.0.blocks.0.norm1.weight",
        "layers.0.blocks.0.attn.q_bias",
        "head.fc.bias",
        "layers.0.blocks.0.attn.logit_scale",
        "layers.0.blocks.0.attn.cpb_mlp.0.weight",
    ):
        assert decay[name] == 0.0, name


def cosine(step: int) -> float:
    return 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * step / 100))


def test_lr_warms_up_linearly_then_follows_timms_cosine_to_its_minimum():
    _, optimizer, at = setup()
    assert at(0)[0] == pytest.approx(1e-6)
    assert at(5)[0] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)
    # timm's CosineLRScheduler (warmup_prefix=False): the cosine spans the whole run, warm-up included.
    assert at(10)[0] == pytest.approx(cosine(10))
    assert at(55)[0] == pytest.approx(cosine(55))
    assert at(100)[0] == pytest.approx(1e-5)
    # A pure function of the step: going back (a resume) gives the same values, in every group.
    assert at(37) == at(37) and all(g["lr"] == at(37)[0] for g in optimizer.param_groups)


def test_weight_decay_follows_a_cosine_on_the_decayed_groups_only():
    model, optimizer, at = setup("optim.weight_decay_end=0.5")
    assert at(0)[1] == pytest.approx(0.05)
    assert at(50)[1] == pytest.approx(0.275)
    assert at(100)[1] == pytest.approx(0.5)
    decay = decay_of(model, optimizer)
    assert decay["head.fc.weight"] == pytest.approx(0.5) and decay["head.fc.bias"] == 0.0
    _, _, constant = setup()
    assert {constant(step)[1] for step in (0, 50, 100)} == {0.05}


def test_layer_decay_gives_lower_layers_a_smaller_share_of_the_lr():
    model, optimizer, at = setup("optim.layer_decay=0.5")
    base = at(10)[0]
    assert base == pytest.approx(cosine(10))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    head, deep, shallow, stem = (
        lr_of[id(params[n])]
        for n in (
            "head.fc.weight",
            "layers.1.blocks.1.mlp.fc1.weight",
            "layers.0.blocks.0.mlp.fc1.weight",
            "patch_embed.proj.weight",
        )
    )
    assert head == pytest.approx(base) and stem < shallow < deep < head


def test_a_weight_decay_schedule_needs_a_weight_decay_to_start_from():
    with pytest.raises(ConfigError, match="optim.weight_decay_end=0.1.*needs optim.weight_decay > 0"):
        load_config(
            "digits-demo", ["data.root=/x", "optim.weight_decay=0", "optim.weight_decay_end=0.1"], cluster="local"
        )
    with pytest.raises(ConfigError, match="optim.layer_decay=1.5"):
        load_config("digits-demo", ["data.root=/x", "optim.layer_decay=1.5"], cluster="local")
