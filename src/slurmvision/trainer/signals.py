"""Stop requests from Slurm: the handlers only set a flag; the loop acts at a step boundary.

Slurm sends the `--signal` warning (`cluster.signal`, USR2 by default) before the time limit,
and SIGTERM on preemption, `scontrol requeue`, `scancel` or at the time limit itself. The flag
of any one rank is enough: the loop all-reduces it, so every rank saves the same step together
and exits.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Optional

from slurmvision.slurm.causes import StopReason

log = logging.getLogger(__name__)
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (*WARNINGS, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        # Each signal's first arrival (monotonic), in order: a SIGTERM after the warning counts
        # too, its deadline may be the earlier one (deadline.stop_deadline).
        self.received: dict[int, float] = {}

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.setdefault(signum, time.monotonic())

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def received_at(self) -> Optional[float]:
        """When the first stop signal came."""
        return min(self.received.values(), default=None)

    @property
    def is_warning(self) -> bool:
        """Whether the time-limit warning came: come back later, as opposed to SIGTERM's "go away" alone."""
        return any(signum in WARNINGS for signum in self.received)

    @property
    def name(self) -> str:
        return "+".join(signal.Signals(signum).name for signum in self.received) or "none"


def reported_signal(warnings: float, configured: str) -> StopReason:
    """The signal every rank reports for a stop: the profile's warning (`cluster.signal`) if any
    rank got a warning, else SIGTERM."""
    return StopReason(f"SIG{configured}") if warnings else StopReason.SIGTERM
