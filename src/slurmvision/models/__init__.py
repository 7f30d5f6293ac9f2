"""Models: anything timm can create, plus slurmvision's registrations."""

from __future__ import annotations

import logging

import torch

from slurmvision.configs.schema import ModelConfig
from slurmvision.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def build_model(config: ModelConfig, num_classes: int) -> torch.nn.Module:
    import timm

    if not timm.is_model(config.name):
        import difflib

        close = difflib.get_close_matches(config.name, timm.list_models(), n=3)
        raise ConfigError(f"model.name={config.name!r} is not a timm model" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        model = timm.create_model(config.name, pretrained=config.pretrained, num_classes=num_classes,
                                  drop_path_rate=config.drop_path, **config.kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs do not fit {config.name}: {err}") from None
    if config.finetune_from:
        load_finetune_weights(model, config.finetune_from)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    for prefix in config.freeze:
        frozen = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not frozen:
            raise ConfigError(f"model.freeze: no parameter of {config.name} starts with {prefix!r}")
        for param in frozen:
            param.requires_grad_(False)
    return model


def load_finetune_weights(model: torch.nn.Module, path: str) -> None:
    """Start from saved weights; tensors whose shape differs (the classifier head) stay freshly initialised."""
    from pathlib import Path

    source = Path(path)
    if source.is_dir():
        from slurmvision.trainer.checkpoint import open_checkpoint

        state = open_checkpoint(source).load_state()["model"]
    elif source.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    else:
        raise CheckpointError(f"model.finetune_from={path} does not exist: give a checkpoint directory or a weights file")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info("fine-tuning from %s: %d tensors loaded, re-initialised: %s", path, len(usable), ", ".join(skipped) or "none")
