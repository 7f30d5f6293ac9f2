"""Model building: timm models, typo suggestions, gradient checkpointing that changes nothing but memory."""

import pytest
import torch

from slurmvision.configs.model import ModelConfig
from slurmvision.errors import ConfigError
from slurmvision.models import build_model

pytestmark = pytest.mark.unit
TINY = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2]}


def loss_and_grads(checkpointing: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="swinv2_tiny_window8_256", kwargs=TINY, grad_checkpointing=checkpointing), 4)
    model.train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    plain_loss, plain_grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert abs(plain_loss - ckpt_loss) < 1e-6
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def test_unknown_model_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean swinv2_tiny_window8_256"):
        build_model(ModelConfig(name="swinv2_tiny_window8_265"), 4)
    with pytest.raises(ConfigError, match="model.kwargs do not fit"):
        build_model(ModelConfig(name="resnet18", kwargs={"no_such_argument": 1}), 4)
