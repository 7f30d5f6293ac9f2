"""The coordinator as a chain of small Slurm jobs: a run that needs no login-node process.

Each watcher is a 1-CPU job (`--dependency=afterany:JOB`) that waits for the run's newest
training job to end for good, looks once (`slurmvision coordinate RUN --once`: classify,
record, resubmit within the budgets), and submits its successor, which waits for whichever
training job is now current. The run finishes or stops with the last watcher.

What Slurm does with dependencies, checked on the local cluster (Slurm 22.05):
- a requeue (preemption, `scontrol requeue` after the time-limit warning, NODE_FAIL) leaves
  `afterany` unfulfilled: the watcher sleeps through everything Slurm brings back itself
  and wakes only when the job has ended and will not come back;
- `afterany` on a job Slurm has already forgotten (MinJobAge) is fulfilled at once, so a
  watcher submitted late still runs.
Torch-free: it runs on the login node (launch) and on compute nodes (the chain).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from slurmvision.configs import Config
from slurmvision.errors import ClusterError
from slurmvision.slurm.client import in_queue, run_slurm_command, sacct_attempts
from slurmvision.slurm.ledger import Ledger

if TYPE_CHECKING:
    from slurmvision.launch.coordinator import Decision

log = logging.getLogger("slurmvision.watcher")
SCRIPT_NAME = "watcher.sh"
# sacct may still show a job as running for a moment after Slurm ended it: look again after this.
ACCOUNTING_LAG_S = 15


def watcher_script(config: Config) -> str:
    """The watcher's batch script: the profile's setup lines, then one look at the run."""
    run_dir = Path(config.run.dir).resolve()
    command = shlex.join(
        [config.cluster.python or sys.executable, "-P", "-m", "slurmvision", "coordinate", str(run_dir), "--once"]
    )
    return "\n".join(["#!/bin/bash", "set -e", *config.cluster.setup, f"exec {command}", ""])


def sbatch_args(config: Config, after: Optional[str], begin_in_s: float) -> list[str]:
    cluster = config.cluster
    run_dir = Path(config.run.dir).resolve()
    args = [
        "sbatch",
        "--parsable",
        f"--job-name=sv-watch-{run_dir.name}",
        "--ntasks=1",
        "--cpus-per-task=1",
        "--mem=1G",
        f"--time={cluster.watcher_time_min}",
        f"--output={run_dir / 'logs' / 'watcher-%j.log'}",
        "--open-mode=append",
        "--kill-on-invalid-dep=yes",
        f"--comment=slurmvision watcher {run_dir.name}",
    ]
    for option, value in (
        ("partition", cluster.watcher_partition or cluster.partition),
        ("account", cluster.account),
        ("qos", cluster.watcher_qos or cluster.qos),
    ):
        if value:
            args.append(f"--{option}={value}")
    if after:
        args.append(f"--dependency=afterany:{after}")
    if begin_in_s > 0:
        args.append(f"--begin=now+{int(begin_in_s + 0.999)}")
    return [*args, str(run_dir / "slurm" / SCRIPT_NAME)]


def submit_watcher(config: Config, after: Optional[str], begin_in_s: float = 0.0, tries: int = 1) -> str:
    """Submit the run's next watcher; its job id. `tries` > 1 retries a refused sbatch with back-off
    (a watcher that cannot chain its successor would leave the run unwatched)."""
    run_dir = Path(config.run.dir).resolve()
    script = run_dir / "slurm" / SCRIPT_NAME
    script.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    tmp = script.with_suffix(".tmp")
    tmp.write_text(watcher_script(config))
    tmp.chmod(0o700)
    os.replace(tmp, script)
    for attempt in range(tries):
        try:
            job_id = run_slurm_command(sbatch_args(config, after, begin_in_s), timeout=60).strip().split(";")[0]
            break
        except ClusterError as err:
            if attempt == tries - 1:
                raise ClusterError(f"could not submit the run's watcher job: {err}") from None
            log.warning("sbatch of the watcher failed (%s): trying again in %ds", err, 10 * 2**attempt)
            time.sleep(10 * 2**attempt)
    ledger = Ledger(run_dir, writer="watcher")
    ledger.put("watcher", {"job_id": job_id, "after": after, "submitted": time.time()})
    ledger.event("watcher", f"watcher job {job_id} submitted" + (f", waiting for job {after}" if after else ""))
    return job_id


def next_look(config: Config, job_id: str, delay_s: float = 0.0) -> tuple[Optional[str], float]:
    """(the job the next watcher waits for, seconds before it may start).

    Backing off after an end, there is nothing to wait for but the time. Otherwise it wakes when
    the newest job ends for good, except in an elastic run (cluster.min_nodes): a job Slurm
    requeued after a node failure then waits for that node and wakes no dependency, so its
    watcher looks every cluster.watcher_every_s, and fits the waiting job to the working nodes.
    """
    if delay_s > 0:
        return None, delay_s
    if config.cluster.elastic:
        return None, float(config.cluster.watcher_every_s)
    return job_id, ACCOUNTING_LAG_S


def watch(run_dir: str | Path) -> "Decision":
    """What a watcher job runs: one look at the run (`Coordinator.once`), then its successor,
    unless the run is over. A successor that cannot be submitted is recorded: the run is
    then unwatched until someone runs `slurmvision coordinate RUN` (once, or as a daemon)."""
    from slurmvision.launch.coordinator import Coordinator

    coordinator = Coordinator(run_dir)
    decision = coordinator.once()
    if decision.final:
        coordinator.ledger.put("watcher", None)
        return decision
    after, begin_in_s = next_look(coordinator.config, coordinator.ledger.jobs()[-1]["job_id"], decision.delay_s)
    try:
        submit_watcher(coordinator.config, after=after, begin_in_s=begin_in_s, tries=4)
    except ClusterError as err:
        coordinator.ledger.event(
            "watcher",
            f"{err}: the run is unwatched; run `slurmvision coordinate "
            f"{Path(run_dir).resolve()} --once` when Slurm answers again",
        )
        raise
    return decision


def watcher_state(run_dir: str | Path) -> Optional[dict]:
    """The run's newest watcher and its Slurm state (None if the run has none)."""
    watcher = Ledger(run_dir).get("watcher")
    if not watcher:
        return None
    try:
        queued = in_queue(watcher["job_id"])
        rows = sacct_attempts(watcher["job_id"], timeout=10)
        state = rows[-1].state if rows else ("PENDING" if queued else "UNKNOWN")
    except ClusterError:
        queued, state = True, "unknown (Slurm unreachable)"
    return {**watcher, "state": state, "queued": queued}
