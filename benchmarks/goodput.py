"""Goodput under repeated preemption, on the local Slurm cluster (`make slurm-up`).

    export SLURM_CONF=$PWD/.devslurm/etc/slurm.conf
    python benchmarks/goodput.py [--preempt-every 40] [--max-steps 600]

The digits recipe runs as a 2-rank job in the preemptible `low` partition with the
coordinator watching; every `--preempt-every` seconds of training a job in the `high`
partition takes the node (SIGTERM, grace time). Reported, from the ledger, sacct and the
rank-0 log: steps lost per preemption (target 0), restart overhead from job start to the
first step (target <= 30 s), and goodput = training time kept / time allocated (target
>= 98%), leaving out Slurm's queue and requeue delay (the requeued job is started at once
with `scontrol update StartTime=now`). The figures go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from results import machine, publish  # benchmarks/ is on the path of a script run from it

SECTION = "## Goodput under preemption"
JSON_KEY = "goodput"
STEP_LINE = re.compile(r"^(\S+ \S+) \[rank 0\] INFO slurmvision.progress: step (\d+)/")


def slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout.strip()


def state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def attempt_windows(job_id: str, timeout: float = 120) -> list[tuple[datetime, datetime]]:
    """(start, end) of every attempt of the job; accounting lags the job's end by a moment."""
    deadline = time.monotonic() + timeout
    while True:
        rows = slurm("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "--format=Start,End").splitlines()
        if all("Unknown" not in row for row in rows) or time.monotonic() > deadline:
            return [tuple(datetime.fromisoformat(t) for t in row.split("|")) for row in rows if "Unknown" not in row]
        time.sleep(2)


def attempt_steps(log: Path) -> list[list[tuple[datetime, int]]]:
    """The (time, step) lines of each attempt, from the rank-0 log every attempt appends to
    (each logs its schedule once before training)."""
    attempts: list[list[tuple[datetime, int]]] = []
    for line in log.read_text().splitlines():
        if "[rank 0]" in line and "peak lr" in line:
            attempts.append([])
        elif attempts and (match := STEP_LINE.match(line)):
            attempts[-1].append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"), int(match.group(2))))
    return [a for a in attempts if a]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preempt-every", type=float, default=40.0, help="seconds of training between preemptions")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF"):
        print(
            "needs the local cluster: `make slurm-up`, then the `export SLURM_CONF=...` line it prints", file=sys.stderr
        )
        return 2

    from slurmvision.configs import load_config
    from slurmvision.launch.demo import prepare_shards
    from slurmvision.launch.launcher import submit
    from slurmvision.slurm.ledger import Ledger

    with tempfile.TemporaryDirectory(prefix="sv-goodput-") as tmp:
        shards = prepare_shards(Path(tmp) / "work")
        run_dir = Path(tmp) / "run"
        config = load_config(
            "digits-demo",
            [
                f"data.root={shards}",
                f"trainer.max_steps={args.max_steps}",
                "trainer.log_every=1",
                "cluster.retry_backoff_s=0",
            ],
            cluster="devslurm",
            run_dir=run_dir,
        )
        job_id = str(submit(config).job_id)
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "slurmvision", "coordinate", str(run_dir), "--poll", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        log = run_dir / "logs" / "rank-00000.log"
        cpus = slurm("sinfo", "-h", "-o", "%c").split()[0]
        preemptions, training_since = 0, None
        while coordinator.poll() is None:
            current = state(job_id)
            lines = log.read_text().splitlines() if log.exists() else []  # empty until rank 0's first record
            if current == "RUNNING" and lines and STEP_LINE.search(lines[-1]):
                training_since = training_since or time.monotonic()
                if time.monotonic() - training_since >= args.preempt_every:
                    slurm("sbatch", "-p", "high", "-n", cpus, "-o", "/dev/null", "--wrap", "sleep 2")
                    preemptions += 1
                    training_since = None
                    while state(job_id) == "RUNNING":
                        time.sleep(0.2)
            elif current == "PENDING":
                training_since = None
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], capture_output=True)
            time.sleep(0.5)

        attempts = Ledger(run_dir).attempts()
        windows = attempt_windows(job_id)
        steps = attempt_steps(log)
        allocated = sum((end - start).total_seconds() for start, end in windows)
        overheads = [(a[0][0] - start).total_seconds() for (start, _), a in zip(windows, steps)]
        intervals = sorted((t2 - t1).total_seconds() for a in steps for (t1, _), (t2, _) in zip(a, a[1:]))
        step_time = intervals[len(intervals) // 2]
        lost = [a["lost_steps"] or 0 for a in attempts[:-1]]
        # Training time: first to last step of each attempt, plus its first step, less what was redone.
        useful = sum((a[-1][0] - a[0][0]).total_seconds() + step_time for a in steps) - sum(lost) * step_time
        figures = {
            **machine(),
            "preempt_every_s": args.preempt_every,
            "max_steps": args.max_steps,
            "preemptions": preemptions,
            "attempts": len(attempts),
            "steps_lost": lost,
            "restart_overhead_s": [round(o, 1) for o in overheads],
            "median_step_s": round(step_time, 4),
            "goodput": round(useful / allocated, 4),
            "not_training_per_preemption_s": round((allocated - useful) / max(preemptions, 1), 1),
        }
    publish(figures, report, args.results, args.json, JSON_KEY)
    return 0


def report(f: dict, command: str) -> str:
    return f"""{SECTION}

`{command}` on the local cluster ({f["cpu_cores"]} CPU cores, the `digits-demo` recipe, 2 ranks, {f["max_steps"]} steps,
a `high` job preempting every {f["preempt_every_s"]:.0f} s of training; {f["date"]}).

| figure | value | target |
|---|---:|---:|
| preemptions | {f["preemptions"]} | |
| attempts | {f["attempts"]} | |
| steps lost per preemption | {", ".join(map(str, f["steps_lost"])) or "none"} | 0 |
| restart overhead, job start to first step (s) | {", ".join(f"{o:.1f}" for o in f["restart_overhead_s"])} | <= 30 |
| goodput | {f["goodput"]:.1%} | >= 98% |
| allocated time not training, per preemption (s) | {f["not_training_per_preemption_s"]:.1f} | |

Useful time is each attempt's first to last step (median step {f["median_step_s"]:.3f} s), less the steps
redone; allocated time is the sum of the attempts' sacct Start..End. The restart overhead
(interpreter, imports, model, loader workers, resume) is each attempt's time before its first
step; the rest of the gap is the save and exit after the signal, and the last evaluation.
Goodput depends on the interval: a fixed cost of c seconds per preemption every T seconds of
training gives about T / (T + c).
"""


if __name__ == "__main__":
    raise SystemExit(main())
