"""Models: anything timm can create, plus slurmvision's registrations."""

from __future__ import annotations

import logging

import torch

from slurmvision.checkpoints import evaluated_weights, open_checkpoint
from slurmvision.configs.model import DistillConfig, ModelConfig
from slurmvision.errors import CheckpointError, ConfigError
from slurmvision.models import sgformer  # noqa: F401  registers the SG-Former variants with timm
from slurmvision.pretrained import timm_kwargs as pretrained_timm_kwargs

log = logging.getLogger(__name__)


def _create(key: str, name: str, kwargs_key: str, **kwargs) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"{key}={name!r} is not a timm model" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        raise ConfigError(f"{kwargs_key} do not fit {name}: {err}") from None


def build_model(config: ModelConfig, num_classes: int) -> torch.nn.Module:
    model = _create(
        "model.name",
        config.name,
        "model.kwargs",
        **pretrained_timm_kwargs(config),
        num_classes=num_classes,
        drop_path_rate=config.drop_path,
        **config.kwargs,
    )
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


def build_teacher(config: DistillConfig, num_classes: int) -> torch.nn.Module:
    """The frozen teacher of distillation, with its trained weights (all of them must fit)."""
    teacher = _create(
        "model.distill.teacher",
        config.teacher,
        "model.distill.teacher_kwargs",
        num_classes=num_classes,
        **config.teacher_kwargs,
    )
    state = load_weights(config.teacher_weights, "model.distill.teacher_weights")
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(
            f"model.distill.teacher_weights={config.teacher_weights} do not fit the teacher "
            f"{config.teacher} with {num_classes} classes ({first}); set model.distill.teacher and "
            f"model.distill.teacher_kwargs as the teacher was trained"
        ) from None
    log.info(
        "distilling from %s (%s), temperature %g, weight %g",
        config.teacher,
        config.teacher_weights,
        config.temperature,
        config.weight,
    )
    return teacher.eval().requires_grad_(False)


def load_weights(path: str, key: str) -> dict:
    """Model weights from a slurmvision run or checkpoint directory (its EMA weights if it kept
    them), or a state-dict file."""
    from pathlib import Path

    source = Path(path)
    if source.is_dir():
        return evaluated_weights(open_checkpoint(source).load_state())
    if source.is_file():
        state = torch.load(source, map_location="cpu", weights_only=True)
        return state.get("model", state.get("state_dict", state))
    raise CheckpointError(f"{key}={path} does not exist: give a checkpoint directory or a weights file")


def load_finetune_weights(model: torch.nn.Module, path: str) -> None:
    """Start from saved weights; tensors whose shape differs (the classifier head) stay freshly initialised."""
    state = load_weights(path, "model.finetune_from")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info(
        "fine-tuning from %s: %d tensors loaded, re-initialised: %s", path, len(usable), ", ".join(skipped) or "none"
    )
