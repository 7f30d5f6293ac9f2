"""Stop requests from Slurm: the handlers only set a flag; the loop acts at a step boundary.

Slurm sends the `--signal` warning (USR2 by default) before the time limit, and SIGTERM on
preemption, `scontrol requeue` or `scancel`. The flag of any one rank is enough: the loop
all-reduces it, so every rank saves the same step together and exits.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Optional

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def is_warning(self) -> bool:
        """The time-limit warning (`--signal`): come back later, as opposed to SIGTERM's "go away"."""
        return self.signum in (signal.SIGUSR1, signal.SIGUSR2)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"
