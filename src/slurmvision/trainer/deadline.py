"""Deadlines a step must meet, and the measured times the loop plans with.

Slurm kills a job a fixed time after its signal: `cluster.signal_delay_s` after the
time-limit warning, the grace time (`cluster.sigterm_grace_s`) after SIGTERM. A step already
running when the signal comes may not finish in that time (long steps, much gradient
accumulation). Two rules keep the work anyway:
- between micro-steps, if finishing the step and then saving would miss the deadline, the
  loop cuts the step and saves the state from its start, the last safe point;
- at a step boundary, if one more step and a save no longer fit before the job's time
  limit, the loop stops there by itself instead of waiting for a warning that comes too late.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from datetime import datetime
from typing import Optional

from slurmvision.configs.cluster import ClusterConfig
from slurmvision.errors import ClusterError
from slurmvision.slurm.causes import WARNING_SIGNALS, StopReason
from slurmvision.slurm.client import job_end_time
from slurmvision.trainer.signals import WARNINGS, StopRequest

log = logging.getLogger(__name__)
SAFETY = 1.5  # measured times vary (multi-scale batches, a busy file system)
MARGIN_S = 10.0  # process exit and the requeue itself


class StepTimes:
    """Recent durations of micro-steps, steps, saves and evaluations on this rank."""

    def __init__(self, window: int = 50, save_s: float = 0.0, eval_s: float = 0.0):
        self.micro: deque[float] = deque(maxlen=window)
        self.steps: deque[float] = deque(maxlen=window)
        self.save_s, self.eval_s = save_s, eval_s

    def to_finish(self, micro_left: int) -> float:
        """Seconds to finish a step with `micro_left` micro-steps to go, then save."""
        return SAFETY * (micro_left * max(self.micro, default=0.0) + self.save_s)

    def next_step_and_save(self, evaluates: bool) -> float:
        return SAFETY * (max(self.steps, default=0.0) + self.save_s + (self.eval_s if evaluates else 0.0)) + MARGIN_S


def lead_time(cluster: ClusterConfig, warning: bool) -> int:
    """Seconds Slurm leaves after the time-limit warning, or after SIGTERM."""
    return cluster.signal_delay_s if warning else cluster.sigterm_grace_s


def warn_if_stop_was_tight(reason: StopReason, took: float, cluster: ClusterConfig) -> None:
    """After a stop by Slurm's signal that took `took` seconds to save: a warning, with what to change, if
    that is most of the time Slurm leaves before it kills the job."""
    warning = reason in WARNING_SIGNALS
    lead = lead_time(cluster, warning)
    if reason == StopReason.LIMIT_AHEAD or cluster.executor != "slurm" or took <= 0.8 * lead:
        return
    advice = (
        "raise cluster.signal_delay_s"
        if warning
        else "Slurm's KillWait is tight for this run: save more often (trainer.checkpoint_every_minutes)"
    )
    log.warning("saving took %.0f%% of the %ds Slurm leaves after %s: %s", 100 * took / lead, lead, reason, advice)


def stop_deadline(stop: StopRequest, cluster: ClusterConfig) -> Optional[float]:
    """The monotonic time by which a stop's checkpoint must be written (None: no signal): the
    earliest of its signals' deadlines, so a SIGTERM after the warning still shortens it."""
    return min((at + lead_time(cluster, signum in WARNINGS) for signum, at in stop.received.items()), default=None)


def parse_end_time(text: str) -> Optional[float]:
    """An end time as Slurm prints it (`squeue -o %e`, local time) or as epoch seconds."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:  # "N/A", "Unknown", or no such job
        return None


class TimeLimit:
    """When Slurm will end this job (wall-clock epoch seconds), if it has a time limit."""

    def __init__(self, job_id: Optional[str], stop: StopRequest):
        self.job_id, self.stop = job_id, stop
        # Slurm >= 23.02 exports the end time at the start; older versions are asked.
        exported = os.environ.get("SLURM_JOB_END_TIME") if job_id else None
        self.end = parse_end_time(exported) if exported else self._ask_slurm()

    def _ask_slurm(self) -> Optional[float]:
        if not self.job_id:
            return None
        try:
            return parse_end_time(job_end_time(self.job_id))
        except ClusterError as err:
            log.warning(
                "cannot read the job's end time (%s): stopping before the time limit relies on its warning", err
            )
            return None

    def too_close(self, times: StepTimes, evaluates: bool) -> bool:
        """Whether the next step and a save would end after the time limit.

        Asks Slurm again before saying yes: `scontrol update TimeLimit` may have moved it. Never
        once a stop signal came: that stop saves anyway, and Slurm is not asked in its grace time.
        """
        if self.end is None or not times.steps or self.stop.requested:
            return False
        needed = times.next_step_and_save(evaluates)
        if self.end - time.time() >= needed:
            return False
        self.end = self._ask_slurm() or self.end
        return self.end - time.time() < needed
