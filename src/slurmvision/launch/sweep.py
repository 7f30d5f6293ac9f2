"""`slurmvision sweep`: one run per combination of values, on Slurm as one job array (no torch).

`optim.lr=1e-3,5e-4 model.drop_path=0.1,0.2` gives four runs, SWEEP/000-lr=1e-3_drop_path=0.1 and
so on, each a run directory of its own (its config, ledger, checkpoints, coordination), so that
`status`, `logs`, `resume` and `cancel` work on each as on any run. On Slurm they start as the
elements of one job array (submitit's `batch()`): job ids JOB_0, JOB_1, ..., with the array's
submitit files in SWEEP/slurm/; a run the coordinator resubmits later is a job of its own. The plan
is written to SWEEP/sweep.json, which `status SWEEP` reads to rank the runs by their top-1.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Optional

from slurmvision.configs import Config, load_config, save_config
from slurmvision.errors import ConfigError, RunError

SWEEP_FILE = "sweep.json"


def split_values(text: str) -> list[str]:
    """`1e-3,5e-4` -> ['1e-3', '5e-4']; commas inside brackets or quotes (`[224,256]`) do not split."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def combinations(overrides: list[str]) -> list[dict[str, str]]:
    """Every combination of the swept keys' values (the first key varies slowest), as key -> value."""
    axes = []
    for item in overrides:
        key, _, text = item.partition("=")
        values = split_values(text)
        if len(values) > 1:
            if key.startswith("cluster."):
                raise ConfigError(
                    f"{item}: a sweep's runs share one job array, so one cluster setting; sweep other "
                    "keys, or launch a sweep per cluster setting"
                )
            axes.append([(key, value) for value in values])
    if not axes:
        raise ConfigError("nothing to sweep: give at least one key with several values, e.g. optim.lr=1e-3,5e-4")
    return [dict(choice) for choice in itertools.product(*axes)]


def run_name(index: int, choice: dict[str, str]) -> str:
    """`003-lr=5e-4_drop_path=0.2`: the index keeps the plan's order, the rest says what differs."""
    label = "_".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in choice.items())
    return f"{index:03d}-" + re.sub(r"[^\w.=+-]", "-", label)[:80]


def plan(recipe: str, overrides: list[str], cluster: Optional[str], sweep_dir: Path) -> list[tuple[str, Config]]:
    """The runs of the sweep, every config validated before anything is submitted."""
    if (sweep_dir / SWEEP_FILE).exists():
        raise RunError(
            f"{sweep_dir} holds a sweep already: go on with each of its runs with `slurmvision resume "
            f"{sweep_dir}/RUN`, or give another sweep directory"
        )
    fixed = [item for item in overrides if len(split_values(item.partition("=")[2])) == 1]
    runs = []
    for index, choice in enumerate(combinations(overrides)):
        name = run_name(index, choice)
        items = [*fixed, *(f"{key}={value}" for key, value in choice.items())]
        runs.append((name, load_config(recipe, items, cluster=cluster, run_dir=(sweep_dir / name).resolve())))
    return runs


def submit_sweep(runs: list[tuple[str, Config]], sweep_dir: Path, recipe: str) -> list[str]:
    """Submit the runs (one job array on Slurm, one job each without); their job ids."""
    from slurmvision.launch.launcher import submit
    from slurmvision.slurm.rundir import check_run_dir, make_private

    make_private()
    check_run_dir(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if runs[0][1].cluster.executor != "slurm":
        job_ids = [str(submit(config).job_id) for _, config in runs]
    else:
        job_ids = _submit_array([config for _, config in runs], sweep_dir)
    record = {"recipe": recipe, "runs": [{"name": name, "job_id": job_id} for (name, _), job_id in zip(runs, job_ids)]}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1))
    return job_ids


def coordinate(runs: list[tuple[str, Config]], job_ids: list[str], mode: str) -> list[str]:
    """Start each run's coordination as `launch` does (a watcher job, or a login-node daemon); what was started."""
    from slurmvision.launch import watcher
    from slurmvision.launch.launcher import start_coordinator

    started = []
    for (name, config), job_id in zip(runs, job_ids):
        if mode == "watcher":
            after, begin_in_s = watcher.next_look(config, job_id)
            job = watcher.submit_watcher(config, after=after, begin_in_s=begin_in_s, tries=3)
            started.append(f"{name}: watcher job {job}")
        elif mode == "daemon":
            started.append(f"{name}: coordinator pid {start_coordinator(Path(config.run.dir))}")
    return started


def _submit_array(configs: list[Config], sweep_dir: Path) -> list[str]:
    from slurmvision.launch.job import TrainJob
    from slurmvision.pretrained import fetch as fetch_pretrained
    from slurmvision.slurm.cluster import validate_cluster
    from slurmvision.slurm.executor import make_executor
    from slurmvision.slurm.ledger import Ledger

    cluster = configs[0].cluster
    validate_cluster(cluster)
    run_dirs = [Path(config.run.dir) for config in configs]
    for config in configs:
        fetch_pretrained(config.model)
        save_config(config, config.run.dir)
    executor = make_executor(
        cluster,
        sweep_dir.resolve() / "slurm",
        f"sv-sweep-{sweep_dir.resolve().name}",
        f"slurmvision sweep {sweep_dir.resolve().name}",
        also_check=tuple(run_dirs),
    )
    with executor.batch():
        jobs = [executor.submit(TrainJob(str(run_dir))) for run_dir in run_dirs]
    for run_dir, job in zip(run_dirs, jobs):
        Ledger(run_dir, writer="launch").add_job(str(job.job_id), cluster.name, "sweep", ())
    return [str(job.job_id) for job in jobs]


def array_task(run_dir: Path) -> Optional[tuple[Path, str]]:
    """(SWEEP/slurm/, JOB_TASK) if a sweep started the run as task TASK of its job array JOB: submitit keeps
    that job's files there (JOB_TASK_RANK_log.out and .err), not in RUN/slurm/. None for a run no sweep
    started as an array task (a plain run; a sweep's run without Slurm, submitted into RUN/slurm/)."""
    run_dir = Path(run_dir).resolve()  # a sweep's run directories are SWEEP/NAME, resolved (plan)
    try:
        record = json.loads((run_dir.parent / SWEEP_FILE).read_text())
        job_id = next(str(run["job_id"]) for run in record["runs"] if run["name"] == run_dir.name)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    folder = run_dir.parent / "slurm"
    return (folder, job_id) if folder.is_dir() else None


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per run (state, step, top-1), the best top-1 first, runs not evaluated yet last."""
    from slurmvision.launch.status import run_status

    path = sweep_dir / SWEEP_FILE
    record = json.loads(path.read_text())
    rows = []
    for run in record["runs"]:
        status = run_status(str(sweep_dir / run["name"]))
        top1 = status["eval"]["top1"] if status["eval"] else None
        rows.append(
            {
                "run": run["name"],
                "state": status["state"],
                "step": status["step"],
                "max_steps": status["max_steps"],
                "top1": top1,
            }
        )
    return sorted(rows, key=lambda r: (r["top1"] is None, -(r["top1"] or 0.0)))


def format_sweep(rows: list[dict]) -> str:
    width = max(len("run"), *(len(r["run"]) for r in rows))
    lines = [f"{'run':<{width}}  {'state':<14}  {'step':>11}  {'top-1':>7}"]
    for r in rows:
        top1 = f"{r['top1']:.4f}" if r["top1"] is not None else "-"
        lines.append(
            f"{r['run']:<{width}}  {r['state']:<14}  {str(r['step']) + '/' + str(r['max_steps']):>11}  {top1:>7}"
        )
    return "\n".join(lines)
