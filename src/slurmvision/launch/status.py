"""`slurmvision status`: a run at a glance, from the run directory and its ledger (no torch).

Slurm is asked only for the live state and queue position of the newest job; when its
tools are slow or down, everything else still comes from the ledger and the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from slurmvision import checkpoints
from slurmvision.configs import load_saved_config
from slurmvision.errors import ClusterError, RunError
from slurmvision.launch.sweep import array_task
from slurmvision.slurm.client import pending_order, sacct_attempts
from slurmvision.slurm.ledger import Ledger


def _latest_checkpoint(run_dir: Path) -> Optional[dict]:
    """The newest valid checkpoint, checked without hashing its (possibly large) files: a glance,
    not the trainer's full check. Broken ones are passed over."""
    found = checkpoints.latest(checkpoints.checkpoints_of(run_dir), hashes=False, warn=False)
    try:
        return found and {
            "path": str(found.path),
            "step": int(found.meta["step"]),
            "epoch": int(found.meta["epoch"]),
            "world_size": int(found.meta["world_size"]),
        }
    except (KeyError, TypeError, ValueError):  # a meta record without them
        return None


def _live_state(job_id: str) -> tuple[str, Optional[int]]:
    """(Slurm state, place in the pending queue or None)."""
    try:
        attempts = sacct_attempts(job_id, timeout=10)
        state = attempts[-1].state if attempts else "UNKNOWN"
        position = None
        if state == "PENDING":
            queue = pending_order(timeout=10)
            position = queue.index(job_id) + 1 if job_id in queue else None
        return state, position
    except ClusterError:
        return "unknown (Slurm unreachable)", None


def run_status(run: Optional[str]) -> dict:
    if not run:
        raise RunError("give a run directory: slurmvision status RUN_DIR")
    run_dir = Path(run)
    config = load_saved_config(run_dir)
    ledger = Ledger(run_dir)
    # A run that trained or was submitted (by itself, or as a task of a sweep's job array) has ledger
    # records; without them (deleted, lost with a file system) the checkpoints still tell how far it got.
    jobs_expected = (
        checkpoints.checkpoints_of(run_dir).is_dir() or (run_dir / "slurm").is_dir() or bool(array_task(run_dir))
    )
    jobs = ledger.jobs() if ledger.exists() else []
    attempts = ledger.attempts() if ledger.exists() else []
    checkpoint = _latest_checkpoint(run_dir)
    step = max([a["step_reached"] or 0 for a in attempts] + [checkpoint["step"] if checkpoint else 0])
    evals = sorted((run_dir / "eval").glob("step-*.json")) if (run_dir / "eval").is_dir() else []
    last_eval = json.loads(evals[-1].read_text()) if evals else None
    finished = bool(last_eval and last_eval["step"] >= config.trainer.max_steps)
    state, position = "not submitted", None
    if finished:
        state = "finished"
    elif jobs:
        state, position = (
            _live_state(jobs[-1]["job_id"])
            if config.cluster.executor == "slurm"
            else ("running" if attempts and not attempts[-1]["outcome"] else "submitted", None)
        )
    watcher = None
    if config.cluster.executor == "slurm" and ledger.exists():
        from slurmvision.launch.watcher import watcher_state

        watcher = watcher_state(run_dir)
    step_time = next((a["step_time"] for a in reversed(attempts) if a["step_time"]), None)
    eta_s = (config.trainer.max_steps - step) * step_time if step_time and not finished else None
    return {
        "run": str(run_dir),
        "name": config.run.name,
        "cluster": config.cluster.name,
        "state": state,
        "queue_position": position,
        "step": step,
        "max_steps": config.trainer.max_steps,
        "eta_s": eta_s,
        "last_checkpoint": checkpoint,
        "eval": {k: last_eval[k] for k in ("step", "top1", "top5", "f1_macro")} if last_eval else None,
        "jobs": jobs,
        "attempts": attempts,
        "watcher": watcher,
        "lost_steps": sum(a["lost_steps"] or 0 for a in attempts),
        "events": ledger.events(5) if ledger.exists() else [],
        "ledger": None
        if ledger.exists() or not jobs_expected
        else f"no ledger records in {ledger.dir}: attempts unknown, progress from the checkpoints",
        "tensorboard": str(run_dir / "tb"),
    }


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_status(status: dict) -> str:
    state = status["state"] + (f" (#{status['queue_position']} in the queue)" if status["queue_position"] else "")
    progress = f"step {status['step']}/{status['max_steps']}"
    if status["eta_s"] is not None:
        progress += f", ETA {_duration(status['eta_s'])} of training"
    lines = [f"run {status['run']} ({status['name']}) on {status['cluster']}: {state}", f"  progress:   {progress}"]
    if status["last_checkpoint"]:
        lines.append(f"  checkpoint: {status['last_checkpoint']['path']}")
    if status["eval"]:
        e = status["eval"]
        lines.append(
            f"  eval:       top-1 {e['top1']:.4f} top-5 {e['top5']:.4f} F1 {e['f1_macro']:.4f} at step {e['step']}"
        )
    watcher = status["watcher"]
    if watcher and watcher["queued"]:
        waits = f", waiting for job {watcher['after']} to end" if watcher["after"] else ""
        lines.append(f"  watcher:    job {watcher['job_id']} {watcher['state'].lower()}{waits}")
    elif watcher and status["state"] != "finished":
        lines.append(
            f"  watcher:    job {watcher['job_id']} ended ({watcher['state']}) without a successor: the run is "
            f"unwatched; `slurmvision coordinate {status['run']} --once` starts a new watcher"
        )
    if status["ledger"]:
        lines.append(f"  ledger:     {status['ledger']}")
    if status["attempts"]:
        lines.append(f"  attempts:   {len(status['attempts'])}, {status['lost_steps']} steps lost in all")
    ranks, why = None, None
    for a in status["attempts"]:
        steps = f"steps {a['step_start']}-{a['step_reached']}" if a["step_start"] is not None else "never trained"
        end = a["cause"] or a["outcome"] or "running"
        lost = f", {a['lost_steps']} lost" if a["lost_steps"] else ""
        # An elastic run (cluster.min_nodes) may start an attempt on fewer or more ranks than the last.
        resized = ""
        if ranks and a["world_size"] and a["world_size"] != ranks:
            verb = "shrank" if a["world_size"] < ranks else "grew"
            resized = f" ({verb} from {ranks} to {a['world_size']} ranks" + (f" after a {why})" if why else ")")
        ranks, why = a["world_size"] or ranks, a["cause"]
        lines.append(f"    job {a['job_id']}.{a['restart']} on {a['nodes'] or '?'}{resized}: {steps}, {end}{lost}")
    for event in status["events"]:
        lines.append(f"  {event['source']}: {event['message']}")
    lines.append(f"  logs:       slurmvision logs {status['run']} [--rank N] [--attempt K] [--coordinator] [-f]")
    lines.append(f"  tensorboard --logdir {status['tensorboard']}")
    return "\n".join(lines)
