"""`slurmvision status`: a run at a glance, from files in the run directory (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from slurmvision.configs import load_saved_config
from slurmvision.errors import ClusterError, RunError
from slurmvision.launch.launcher import JOBS_FILE


def _latest_checkpoint(run_dir: Path) -> Optional[dict]:
    checkpoints = run_dir / "checkpoints"
    for path in sorted(checkpoints.glob("step-*"), reverse=True) if checkpoints.is_dir() else []:
        if path.is_dir() and not path.name.endswith(".tmp") and (path / "MANIFEST.json").is_file():
            meta = json.loads((path / "meta.json").read_text())
            return {"path": str(path), "step": meta["step"], "epoch": meta["epoch"], "world_size": meta["world_size"]}
    return None


def _job_state(job_id: str, cluster_executor: str) -> Optional[str]:
    if cluster_executor != "slurm":
        return None
    from slurmvision.slurm.executor import run_slurm_command

    try:
        out = run_slurm_command(["sacct", "-n", "-X", "-P", "-j", job_id, "--format=State"], timeout=10)
    except ClusterError:
        return "unknown (Slurm unreachable)"
    states = [line.strip() for line in out.splitlines() if line.strip()]
    return states[-1] if states else "unknown"


def run_status(run: Optional[str]) -> dict:
    if not run:
        raise RunError("give a run directory: slurmvision status RUN_DIR")
    run_dir = Path(run)
    config = load_saved_config(run_dir)
    jobs = []
    if (run_dir / JOBS_FILE).exists():
        jobs = [json.loads(line) for line in (run_dir / JOBS_FILE).read_text().splitlines() if line.strip()]
    for job in jobs[-1:]:
        job["state"] = _job_state(job["job_id"], config.cluster.executor)
    checkpoint = _latest_checkpoint(run_dir)
    step = checkpoint["step"] if checkpoint else 0
    evals = sorted((run_dir / "eval").glob("step-*.json")) if (run_dir / "eval").is_dir() else []
    last_eval = json.loads(evals[-1].read_text()) if evals else None
    finished = bool(last_eval and last_eval["step"] >= config.trainer.max_steps)
    return {
        "run": str(run_dir), "name": config.run.name, "cluster": config.cluster.name,
        "state": "finished" if finished else (jobs[-1]["state"] or "submitted") if jobs else "not submitted",
        "step": step, "max_steps": config.trainer.max_steps,
        "last_checkpoint": checkpoint,
        "eval": {k: last_eval[k] for k in ("step", "top1", "top5", "f1_macro")} if last_eval else None,
        "jobs": jobs, "tensorboard": str(run_dir / "tb"),
    }


def format_status(status: dict) -> str:
    lines = [f"run {status['run']} ({status['name']}) on {status['cluster']}: {status['state']}",
             f"  progress:   step {status['step']}/{status['max_steps']}"]
    if status["last_checkpoint"]:
        lines.append(f"  checkpoint: {status['last_checkpoint']['path']}")
    if status["eval"]:
        e = status["eval"]
        lines.append(f"  eval:       top-1 {e['top1']:.4f} top-5 {e['top5']:.4f} F1 {e['f1_macro']:.4f} at step {e['step']}")
    for job in status["jobs"]:
        lines.append(f"  job {job['job_id']} ({job['cluster']})" + (f": {job['state']}" if job.get("state") else ""))
    lines.append(f"  tensorboard --logdir {status['tensorboard']}")
    return "\n".join(lines)
