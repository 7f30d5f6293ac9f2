"""Login-node commands: the time of `slurmvision --help`, `launch --dry-run`, and `status` on runs
whose ledgers hold 10, 100 and 1000 attempts. Goal: at most 1 s each, and `status` flat in the
ledger's size.

    python benchmarks/login_commands.py [--repeats 5] [--results benchmarks/RESULTS.md]

Each command runs as a user runs it, a fresh process of the venv's `slurmvision` entry point; the
figure is the wall time of the whole process (interpreter start, imports, the command), median and
best of --repeats. The run directories are written here with slurmvision's own API as a long run
writes them: its config.yaml, and a ledger in which every attempt has its own file (its start, ten
progress records, its end, as trainer ranks write them), and the coordinator's file holds the jobs
(three attempts each: requeued twice, then resubmitted) and each attempt's cause. fsync is skipped
while they are written; the files are the same. The runs use the local executor, so `status` asks
no Slurm: what is timed is slurmvision's own work, not sacct's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from results import machine, write_figures, write_section  # benchmarks/ is on the path of a script run from it

SECTION = "## Login-node commands"
JSON_KEY = "login_commands"
LEDGER_SIZES = (10, 100, 1000)
GOAL_S = 1.0


def write_run(run_dir: Path, attempts: int) -> None:
    """A run directory whose ledger holds `attempts` attempts (see the module's docstring)."""
    from slurmvision.configs import load_config, save_config
    from slurmvision.slurm.causes import Cause, Outcome, StopReason
    from slurmvision.slurm.ledger import Ledger

    save_config(
        load_config("digits-demo", ["data.root=/x", "trainer.max_steps=1000000"], cluster="local", run_dir=run_dir),
        run_dir,
    )
    step = 0
    with mock.patch("os.fsync"):
        coordinator = Ledger(run_dir, writer="coordinator")
        for i in range(attempts):
            job_id, restart = str(100000 + i // 3), i % 3
            if restart == 0:
                coordinator.add_job(job_id, "local", reason="launch" if i == 0 else "resubmit after time limit")
            attempt = Ledger(run_dir, writer=f"attempt-{job_id}.{restart}")
            attempt.attempt_started(
                job_id, restart, nodes="gpu[001-004]", world_size=32, step=step, checkpoint=f"step-{step:08d}"
            )
            for k in range(10):
                step += 100
                attempt.attempt_progress(job_id, restart, step=step, saved=step if k % 5 == 4 else None, step_time=0.4)
            attempt.attempt_ended(job_id, restart, outcome=Outcome.STOPPED, step=step, signal=StopReason.SIGUSR2)
            coordinator.set_cause(job_id, restart, Cause.PREEMPTION if restart < 2 else Cause.TIME_LIMIT)


def command_line() -> list[str]:
    entry = Path(sys.executable).with_name("slurmvision")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "slurmvision"]


def time_command(argv: list[str], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"median_s": statistics.median(times), "best_s": min(times), "repeats": repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()

    cli = command_line()
    work = Path(tempfile.mkdtemp(prefix="login-commands-"))
    try:
        commands = {
            "help": [*cli, "--help"],
            "launch_dry_run": [*cli, "launch", "swinv2-tiny-a100", "data.root=/x", "--cluster", "a100", "--dry-run"],
        }
        for size in LEDGER_SIZES:
            run_dir = work / f"run-{size}"
            write_run(run_dir, size)
            commands[f"status_{size}"] = [*cli, "status", str(run_dir)]
        figures = {"machine": machine()}
        for name, argv in commands.items():
            figures[name] = time_command(argv, args.repeats)
            print(name, figures[name], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    statuses = [figures[f"status_{size}"]["median_s"] for size in LEDGER_SIZES]
    figures["status_1000_over_10"] = statuses[-1] / statuses[0]
    slowest = max(figures[name]["median_s"] for name in commands)
    where = figures["machine"]
    rows = [
        ("`slurmvision --help`", "help"),
        ("`slurmvision launch swinv2-tiny-a100 data.root=/x --cluster a100 --dry-run`", "launch_dry_run"),
        *((f"`slurmvision status RUN`, ledger of {size} attempts", f"status_{size}") for size in LEDGER_SIZES),
    ]
    table = "\n".join(
        f"| {label} | {figures[key]['median_s']:.2f} | {figures[key]['best_s']:.2f} | "
        f"{'yes' if figures[key]['median_s'] <= GOAL_S else 'no'} |"
        for label, key in rows
    )
    text = f"""{SECTION}

`python benchmarks/login_commands.py --repeats {args.repeats}` on {where["cpu_cores"]} cores (load average
{where["load_average_1m"]} at the start), {where["date"]}: the wall time of each command as a fresh process
of the venv's entry point, the interpreter's start included; median and best of {args.repeats}. The
ledgers are written with slurmvision.slurm.ledger as a run writes them (one file per attempt, 12 records
each; the coordinator's jobs and causes); local executor, so `status` asks no Slurm.

| command | median (s) | best (s) | ≤ {GOAL_S:g} s |
|---|---:|---:|---|
{table}

`status` on 1000 attempts takes {figures["status_1000_over_10"]:.2f}x its time on 10 (flat: about 1x);
the slowest command, {slowest:.2f} s, is {"within" if slowest <= GOAL_S else "over"} the {GOAL_S:g} s goal.
"""
    write_section(args.results, text)
    write_figures(args.json, JSON_KEY, figures)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
