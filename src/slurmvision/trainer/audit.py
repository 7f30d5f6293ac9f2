"""The data audit (`data.audit`): every rank's record of the samples each step trained on, one
JSON line per micro-batch in RUN/audit/rank-N.jsonl, to check that a resumed run saw every
sample once."""

from __future__ import annotations

import json
from pathlib import Path


class Audit:
    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.file = run_dir / "audit" / f"rank-{rank:05d}.jsonl"
        self.enabled, self.is_main = enabled, rank == 0

    def write(self, step: int, batches) -> None:
        if not self.enabled:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            for batch in batches:
                record = {"step": step, "epoch": batch.epoch, "batch": batch.index, "keys": batch.keys}
                f.write(json.dumps(record) + "\n")

    def trim(self, step: int) -> None:
        """Forget what an interrupted attempt consumed after `step`, the step training continues from.

        Rank 0 trims every rank's file (ranks may be gone after a world-size change); the
        others append only after the step's first collective, so after the trim.
        """
        if not (self.enabled and self.is_main):
            return
        for path in self.file.parent.glob("rank-*.jsonl"):
            # A rank killed mid-write leaves a torn last line: what it recorded was not trained for good.
            kept = [line for line in path.read_text().split("\n")[:-1] if json.loads(line)["step"] < step]
            path.write_text("".join(line + "\n" for line in kept))
