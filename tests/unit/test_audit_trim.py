"""A resumed run forgets the audit records past its checkpoint, a torn one of a killed rank too."""

import json

import pytest

from slurmvision.trainer.audit import Audit

pytestmark = pytest.mark.unit


def test_a_torn_last_audit_line_of_a_killed_rank_is_dropped_with_the_steps_past_the_checkpoint(tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    lines = [json.dumps({"step": step, "epoch": 0, "batch": step, "keys": [f"k{step}"]}) for step in range(1, 6)]
    (audit / "rank-00000.jsonl").write_text("\n".join(lines) + "\n")
    (audit / "rank-00001.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:10])  # SIGKILLed mid-write
    Audit(tmp_path, rank=0, enabled=True).trim(step=3)
    for rank in (0, 1):
        steps = [json.loads(line)["step"] for line in (audit / f"rank-{rank:05d}.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
