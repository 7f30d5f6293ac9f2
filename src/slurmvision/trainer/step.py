"""The pieces of one training step: its losses, and the records of what every rank agreed on
(`distributed.agree`) at its boundaries and at its end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from slurmvision.slurm.causes import StopReason
from slurmvision.trainer.signals import reported_signal


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if targets.ndim == 2:  # soft targets from mixup/cutmix (smoothing already applied)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target KL(teacher || student) at a temperature, scaled by T² to keep its gradients' size."""
    return (
        F.kl_div(
            F.log_softmax(student.float() / temperature, dim=-1),
            F.log_softmax(teacher.float() / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


@dataclass(frozen=True)
class Boundary:
    """Agreed before a step, ahead of its collectives: one rank's data error or stop signal is
    enough to stop every rank at the same step. Each field counts the ranks that say so."""

    data_errors: float
    save_due: float  # rank 0's clock: trainer.checkpoint_every_minutes have passed since the last save
    warnings: float  # the time-limit warning
    terms: float  # SIGTERM or SIGINT without a warning
    limit_ahead: float  # one more step and a save would end after the job's time limit

    def stop_reason(self, configured_signal: str) -> Optional[StopReason]:
        if self.warnings or self.terms:
            return reported_signal(self.warnings, configured_signal)
        return StopReason.LIMIT_AHEAD if self.limit_ahead else None


@dataclass(frozen=True)
class MidStep:
    """Agreed between two micro-steps of a step."""

    warnings: float
    late: float  # ranks that would miss their signal's deadline by finishing the step and saving


@dataclass(frozen=True)
class StepTotals:
    """Agreed after a step's backward passes, before its optimizer step."""

    loss: float  # the sum of every rank's micro-batch losses
    nonfinite: float  # ranks whose loss is not finite
    images: float
    bad_samples: float
    stop_pending: float  # ranks that got a stop signal during the step


@dataclass(frozen=True)
class Stop:
    """A stop every rank agreed on: the reason they all report, and the state to save, the data
    position and (for a step cut short) the RNG states before the step."""

    reason: StopReason
    position: dict
    rng: Optional[dict] = None


@dataclass(frozen=True)
class StepResult:
    """How a step ended. A step skipped for a non-finite loss is not `applied`."""

    stop: Optional[Stop] = None
    applied: bool = False
    save_due: bool = False
    stop_pending: bool = False  # its save comes at the next boundary, nothing else before it
