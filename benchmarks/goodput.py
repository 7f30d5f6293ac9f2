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

SECTION = "## Goodput under preemption"
STEP_LINE = re.compile(r"^(\S+ \S+) \[rank 0\] INFO slurmvision.progress: step (\d+)/")


def slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True).stdout.strip()


def state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def attempts_from_sacct(job_id: str) -> list[tuple[datetime, datetime]]:
    rows = slurm("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "--format=Start,End")
    return [tuple(datetime.fromisoformat(t) for t in line.split("|")) for line in rows.splitlines() if "Unknown" not in line]


def first_steps(log: Path) -> list[datetime]:
    """When each attempt logged its first step (attempts append to the same log; each logs
    its schedule once before training)."""
    firsts, waiting = [], False
    for line in log.read_text().splitlines():
        if "[rank 0]" in line and "peak lr" in line:
            waiting = True
        elif waiting and (match := STEP_LINE.match(line)):
            firsts.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"))
            waiting = False
    return firsts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preempt-every", type=float, default=40.0, help="seconds of training between preemptions")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF"):
        print("needs the local cluster: `make slurm-up`, then the `export SLURM_CONF=...` line it prints", file=sys.stderr)
        return 2

    from slurmvision.configs import load_config
    from slurmvision.launch.demo import prepare_shards
    from slurmvision.launch.launcher import submit
    from slurmvision.slurm.ledger import Ledger

    with tempfile.TemporaryDirectory(prefix="sv-goodput-") as tmp:
        shards = prepare_shards(Path(tmp) / "work")
        run_dir = Path(tmp) / "run"
        config = load_config("digits-demo", [f"data.root={shards}", f"trainer.max_steps={args.max_steps}",
                                              "trainer.log_every=1", "cluster.retry_backoff_s=0"],
                             cluster="devslurm", run_dir=run_dir)
        job_id = str(submit(config).job_id)
        coordinator = subprocess.Popen([sys.executable, "-m", "slurmvision", "coordinate", str(run_dir), "--poll", "2"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = run_dir / "logs" / "rank-00000.log"
        cpus = slurm("sinfo", "-h", "-o", "%c").split()[0]
        preemptions, training_since = 0, None
        while coordinator.poll() is None:
            current = state(job_id)
            if current == "RUNNING" and log.exists() and STEP_LINE.search(log.read_text().splitlines()[-1] or ""):
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
        windows = attempts_from_sacct(job_id)
        starts = first_steps(log)
        allocated = sum((end - start).total_seconds() for start, end in windows)
        overheads = [(first - start).total_seconds() for (start, _), first in zip(windows, starts)]
        step_time = sorted(a["step_time"] for a in attempts if a["step_time"])[len(attempts) // 2]
        lost = [a["lost_steps"] or 0 for a in attempts[:-1]]
        useful = args.max_steps * step_time
        goodput = useful / allocated
        goodput_without_restarts = useful / (allocated - sum(overheads))

    command = " ".join(["python", "benchmarks/goodput.py", *sys.argv[1:]])
    text = f"""{SECTION}

`{command}` on the local cluster (2 CPU cores, the `digits-demo` recipe, 2 ranks, {args.max_steps} steps,
a `high` job preempting every {args.preempt_every:.0f} s of training; {time.strftime('%Y-%m-%d')}).

| figure | value | target |
|---|---:|---:|
| preemptions | {preemptions} | |
| attempts | {len(attempts)} | |
| steps lost per preemption | {', '.join(map(str, lost)) or 'none'} | 0 |
| restart overhead, job start to first step (s) | {', '.join(f'{o:.1f}' for o in overheads)} | <= 30 |
| goodput | {goodput:.1%} | >= 98% |
| goodput without the restart overheads | {goodput_without_restarts:.1%} | |

Useful time is {args.max_steps} steps x the median step time ({step_time:.3f} s); allocated time is the
sum of the attempts' sacct Start..End. The restart overhead (interpreter, imports, model,
loader workers, resume) is the part of each attempt before its first step.
"""
    old = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    head, _, rest = old.partition(SECTION)
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    args.results.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
