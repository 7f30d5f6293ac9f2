"""`slurmvision launch`: validate, create the run directory, submit through submitit."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from slurmvision.configs import Config, load_saved_config, save_config, to_dict, to_yaml
from slurmvision.configs.compare import meaningful_changes
from slurmvision.errors import ClusterError, RunError
from slurmvision.pretrained import fetch as fetch_pretrained
from slurmvision.slurm.client import in_queue, scancel
from slurmvision.slurm.cluster import validate_cluster
from slurmvision.slurm.executor import make_executor, sbatch_script
from slurmvision.slurm.ledger import Ledger
from slurmvision.slurm.rundir import check_run_dir, make_private


def run_id(config: Config) -> str:
    return Path(config.run.dir).resolve().name


def job_names(config: Config) -> tuple[str, str]:
    rid = run_id(config)
    return f"sv-{rid}", f"slurmvision run {rid}"


def _check_run_dir(config: Config) -> list[str]:
    """A run directory is reused only to go on with its run: a change of what its checkpoints mean is
    refused by the trainer's rules for a resume (configs/compare.py); the changes accepted are returned."""
    run_dir = Path(config.run.dir)
    if not (run_dir / "config.yaml").exists():
        return []
    saved = load_saved_config(run_dir)
    old, new = to_dict(saved), to_dict(config)
    refused = meaningful_changes(old, new)
    before, after = (c.data.batch_size * c.cluster.world_size * c.trainer.grad_accum for c in (saved, config))
    if before != after:
        refused.append(f"global batch (batch_size x ranks x grad_accum): {before} -> {after}")
    if refused and not config.trainer.allow_config_change:
        raise RunError(
            f"{run_dir} holds a run whose checkpoints this config changes: {'; '.join(refused)}. Undo the "
            "changes (for fewer ranks raise trainer.grad_accum to keep the global batch), use a new "
            "--run-dir, or pass trainer.allow_config_change=true"
        )
    return meaningful_changes(old, new, harmless=())


def _check_no_job_active(run_dir: Path) -> None:
    """One job per run at a time: a second one would wait in the queue only to be refused by the
    trainer's run lock, or take it over the moment the first one requeues."""
    ledger = Ledger(run_dir)
    jobs = ledger.jobs() if ledger.exists() else []
    if jobs and in_queue(jobs[-1]["job_id"]):
        job_id = jobs[-1]["job_id"]
        raise RunError(
            f"job {job_id} of {run_dir} is still queued or running: cancel it with `scancel {job_id}` "
            f"first, or pass --force to submit a second job to this run anyway"
        )


def submit(config: Config, *, reason: str = "launch", exclude: tuple[str, ...] = (), force: bool = False):
    """Create (or reuse) the run directory and submit the job; returns the submitit Job.

    `exclude` keeps nodes out of this job only (the coordinator's answer to a node failure).
    `force` submits even while the run's newest job is queued or running (`launch --force`, and
    the coordinator, which resubmits only after that job has ended).
    """
    from slurmvision.launch.job import TrainJob

    cluster = config.cluster
    make_private()
    check_run_dir(config.run.dir)
    changes = _check_run_dir(config)
    if cluster.executor == "slurm":  # without Slurm there is no queue to ask
        if not force:
            _check_no_job_active(Path(config.run.dir))
        validate_cluster(cluster)
    run_dir = Path(config.run.dir)
    fetch_pretrained(config.model)  # once, here: the ranks read the weights from disk, never download them
    save_config(config, run_dir)
    executor = make_executor(cluster, run_dir / "slurm", *job_names(config))
    if exclude and cluster.executor == "slurm":
        executor.update_parameters(exclude=",".join(sorted({*exclude, *filter(None, [cluster.exclude])})))
    try:
        job = executor.submit(TrainJob(str(run_dir)))
    except Exception as err:  # submitit raises plain exceptions carrying sbatch's message
        if cluster.executor != "slurm":
            raise
        message = str(err).strip().splitlines()
        raise ClusterError(
            f"Slurm refused the job: {message[-1] if message else err}. "
            f"Check the profile {cluster.name!r} (partition, account, qos, time) against `sinfo`"
        ) from None
    ledger = Ledger(run_dir, writer="launch")
    ledger.add_job(str(job.job_id), cluster.name, reason, exclude)
    if changes:  # config.yaml now holds the new values; the ledger keeps what they replaced
        ledger.event("launch", f"job {job.job_id} goes on with config changes: {'; '.join(changes)}")
    return job


def start_coordinator(run_dir: Path) -> int:
    """`slurmvision coordinate RUN` detached from this shell (it survives logging out); its pid."""
    import subprocess
    import sys

    log_path = run_dir / "logs" / "coordinator.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slurmvision", "coordinate", str(run_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc.pid


def show_dry_run(config: Config, mode: str) -> None:
    """What `launch --dry-run` and `resume --dry-run` print: the sbatch script (and the watcher job's
    command) and the resolved config. A run directory that holds a run is checked first, as a submission
    checks it: a change of what its checkpoints mean fails here with the same error. Nothing is written."""
    from slurmvision.launch import watcher

    changes = _check_run_dir(config)
    if config.cluster.executor == "slurm":
        print(sbatch_script(config.cluster, Path(config.run.dir).resolve() / "slurm", *job_names(config)))
        if mode == "watcher":
            print("# then the watcher job (it runs the script in its last argument):")
            print(shlex.join(watcher.sbatch_args(config, *watcher.next_look(config, "JOB_ID"))))
    else:
        print(
            f"# cluster {config.cluster.name!r} runs {config.cluster.tasks_per_node} local processes (no sbatch script)"
        )
    if changes:
        print(f"# goes on with the run in {config.run.dir}, with config changes: {'; '.join(changes)}")
    print("# resolved config")
    print(to_yaml(config), end="")


def launch(
    config: Config, *, dry_run: bool = False, wait: bool = False, coordinate: Optional[str] = None, force: bool = False
) -> Optional[dict]:
    """Submit the run; `coordinate` (watcher, daemon, none; default: the profile's cluster.coordinate)
    says who resubmits what Slurm does not bring back."""
    from slurmvision.launch import watcher

    run_dir = Path(config.run.dir)
    mode = coordinate or config.cluster.coordinate
    if dry_run:
        show_dry_run(config, mode)
        return None
    job = submit(config, force=force)
    print(f"run {run_id(config)}: job {job.job_id} submitted to {config.cluster.name}")
    print(f"  status:      slurmvision status {run_dir}")
    print(f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    if config.cluster.executor == "slurm":  # without Slurm there is nothing to coordinate
        if mode == "watcher":
            after, begin_in_s = watcher.next_look(config, str(job.job_id))
            watcher_id = watcher.submit_watcher(config, after=after, begin_in_s=begin_in_s, tries=3)
            print(
                f"  watcher:     job {watcher_id} (coordinates the run inside Slurm; `slurmvision cancel {run_dir}` "
                "stops both)"
            )
        elif mode == "daemon":
            print(f"  coordinator: pid {start_coordinator(run_dir)}, log {run_dir / 'logs' / 'coordinator.log'}")
        else:
            print(f"  coordinate:  slurmvision coordinate {run_dir}   (resubmits after crashes and hard time limits)")
    if wait:
        return wait_for(job)
    return None


def cancel(run_dir: Path) -> list[str]:
    """Cancel the run's queued or running jobs, its watcher included, and record it; the ids cancelled."""
    ledger = Ledger(run_dir, writer="cancel")
    if not ledger.exists():
        raise RunError(f"{run_dir} has no ledger: nothing was launched there")
    watcher, jobs = ledger.get("watcher"), [job["job_id"] for job in ledger.jobs()]
    active = [job_id for job_id in jobs + ([watcher["job_id"]] if watcher else []) if in_queue(job_id)]
    # Recorded first: a watcher that wakes up meanwhile finds the run stopped and submits nothing.
    ledger.put("stopped", "run stopped: cancelled with `slurmvision cancel`; relaunch the same config to resume")
    for job_id in jobs:
        ledger.mark_handled(job_id)
    ledger.put("watcher", None)
    if active:
        scancel(active)
    ledger.event("cancel", f"run cancelled by the user: jobs {', '.join(active) or 'none'} cancelled")
    return active


def wait_for(job) -> dict:
    try:
        return job.results()[0]  # rank 0's (every rank returns the same evaluation)
    except Exception as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        user_error = next((line for line in reversed(lines) if "slurmvision.errors." in line), None)
        if user_error:
            raise RunError(user_error.split(": ", 1)[-1]) from None
        raise RunError(
            f"job {job.job_id} failed: {lines[-1] if lines else err}; its logs: {job.paths.stderr}"
        ) from None
