"""A seeded chaos run on the local Slurm cluster (`make slurm-up`): nothing lost, nothing seen twice.

    export SLURM_CONF=$PWD/.devslurm/etc/slurm.conf
    python benchmarks/chaos.py --seed 1 --faults 10

The digits recipe trains as a 2-rank job in the preemptible `low` partition, with the
coordinator running as a daemon (so that it can be killed). Faults drawn from the seed (each
kind once before any repeats, at distinct random steps) are injected when rank 0 logs that
step:

  preemption           a `high` job takes the node (SIGTERM, grace time, Slurm requeues)
  usr2-warning         the time-limit warning (`scancel --signal=USR2`): save, requeue
  kill-rank            SIGKILL of rank 1's task: the job fails, the coordinator resubmits
  kill-during-save     SIGKILL of rank 0's task while a checkpoint is being written
  node-down            the job's node set DOWN: NODE_FAIL, Slurm requeues, the node returns
  coordinator-restart  the coordinator SIGKILLed, a new one started a moment later
  slurmctld-restart    slurmctld stopped and started again (its state survives on disk)
  slurmdbd-outage      slurmdbd stopped for --dbd-outage-s seconds (no sacct meanwhile)

At the end the final weights are compared with an uninterrupted 2-rank run of the same config,
and the samples each epoch trained (data.audit) with that run's: lost = in the reference but
not here, repeated = here more often than there. Steps lost come from the ledger. A requeued
job is started as soon as the old attempt's processes are surely gone (KillWait + 2 s) rather
than after Slurm's requeue delay (~2 min). slurmctld-restart and slurmdbd-outage disturb every
job of the cluster: `--kinds job` leaves them (and nothing else) out, for runs next to others.
The table goes to RESULTS.md; `--json` writes the figures for a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from results import write_section  # benchmarks/ is on the path of a script run from it

SECTION = "## Chaos run"
CLUSTER_WIDE = ("slurmctld-restart", "slurmdbd-outage")
JOB_LEVEL = ("preemption", "usr2-warning", "kill-rank", "kill-during-save", "node-down", "coordinator-restart")
STEP = re.compile(r"slurmvision.progress: step (\d+)/")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60).stdout.strip()


def wait(condition, what: str, timeout: float = 300, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def plan(seed: int, faults: int, kinds: tuple[str, ...], max_steps: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    drawn: list[str] = []
    while len(drawn) < faults:
        drawn += rng.sample(kinds, len(kinds))
    steps = sorted(rng.sample(range(3, max_steps - 3), faults))
    return list(zip(steps, drawn[:faults]))


class Chaos:
    def __init__(self, run_dir: Path, dbd_outage_s: float):
        self.run_dir, self.dbd_outage_s = run_dir, dbd_outage_s
        self.daemons = Path(os.environ["SLURM_CONF"]).resolve().parent.parent / "run"
        self.kill_wait = int(re.search(r"KillWait\s*=\s*(\d+)", sh("scontrol", "show", "config")).group(1))
        self.coordinator: Optional[subprocess.Popen] = None
        self.coordinator_output = ""
        self.dbd_back_at: Optional[float] = None  # while slurmdbd is down: when it comes back

    # the run
    def job_id(self) -> str:
        from slurmvision.slurm.ledger import Ledger

        return Ledger(self.run_dir).jobs()[-1]["job_id"]

    def step(self) -> int:
        """The last step the current attempt trained, -1 before its first (each attempt logs its
        schedule, "peak lr", once before training)."""
        log = self.run_dir / "logs" / "rank-00000.log"
        text = log.read_text() if log.exists() else ""
        steps = STEP.findall(text[text.rfind("peak lr") :])
        return int(steps[-1]) if steps else -1

    def state(self) -> str:
        return sh("squeue", "-h", "-j", self.job_id(), "-o", "%T", check=False)

    def start_coordinator(self) -> None:
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "slurmvision", "coordinate", str(self.run_dir), "--poll", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop_coordinator(self) -> None:
        self.coordinator.kill()
        self.coordinator_output += self.coordinator.communicate()[0]

    def hurry(self) -> None:
        """A requeued job waits Slurm's requeue delay: start it once the old attempt is surely gone.
        Also ends a slurmdbd outage when it is due."""
        if self.dbd_back_at is not None and time.monotonic() >= self.dbd_back_at:
            self._start_daemon("slurmdbd", ["sacctmgr", "-n", "list", "cluster"])
            self.dbd_back_at = None
        job = self.job_id()
        reason = sh("squeue", "-h", "-j", job, "-o", "%T %r", check=False)
        if reason.startswith("PENDING") and "BeginTime" in reason:
            time.sleep(self.kill_wait + 2)
            sh("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)

    def wait_for_step(self, step: int, timeout: float = 600) -> None:
        def reached() -> bool:
            self.hurry()
            return self.state() == "RUNNING" and self.step() >= step

        wait(reached, f"step {step}", timeout, every=0.1)

    def task_pid(self, rank: int) -> int:
        """The rank's Python process: a child of slurmstepd. The srun of the batch script names the
        same folder in its command line and has SLURM_PROCID=0 too (killing it is another fault),
        and the rank's loader workers are its own children."""
        folder = str((self.run_dir / "slurm").resolve())
        pids = sh("pgrep", "-f", f"submitit.core._submit {folder}", check=False).split()
        for pid in pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                parent_name = Path(f"/proc/{parent}/comm").read_text().strip()
            except OSError:
                continue
            if f"SLURM_PROCID={rank}".encode() in environ and parent_name == "slurmstepd":
                return int(pid)
        raise RuntimeError(f"no task of rank {rank} among {pids}")

    def until_requeued(self, job: str) -> None:
        wait(lambda: sh("squeue", "-h", "-j", job, "-o", "%T", check=False) in ("PENDING", ""), f"job {job} requeued")

    # the faults; each returns a note on how it landed
    def preemption(self) -> str:
        job, cpus = self.job_id(), sh("sinfo", "-h", "-p", "high", "-o", "%c").split()[0]
        high = sh("sbatch", "--parsable", "-p", "high", "-n", cpus, "-o", "/dev/null", "--wrap", "sleep 3")
        self.until_requeued(job)
        wait(lambda: not sh("squeue", "-h", "-j", high, "-o", "%T", check=False), f"high job {high} gone")
        return ""

    def usr2_warning(self) -> str:
        job = self.job_id()
        sh("scancel", "--signal=USR2", job)
        self.until_requeued(job)
        return ""

    def kill_rank(self) -> str:
        os.kill(self.task_pid(1), signal.SIGKILL)
        return ""

    def kill_during_save(self) -> str:
        pid = self.task_pid(0)
        checkpoints = self.run_dir / "checkpoints"

        def writing() -> set[str]:
            return {path.name for path in checkpoints.iterdir() if path.name.endswith(".tmp")}

        before = writing()  # left by an earlier kill: not this save
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if writing() - before:
                os.kill(pid, signal.SIGKILL)
                return "mid-write"
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        return "no write seen in 120 s: killed anyway"

    def node_down(self) -> str:
        job = self.job_id()
        node = sh("squeue", "-h", "-j", job, "-o", "%N")
        sh("scontrol", "update", f"nodename={node}", "state=down", "reason=chaos")
        try:
            self.until_requeued(job)
        finally:
            sh("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            wait(
                lambda: (
                    not any(word in sh("sinfo", "-h", "-n", node, "-o", "%T") for word in ("down", "drain", "fail"))
                ),
                f"node {node} back",
            )
        return node

    def coordinator_restart(self) -> str:
        self.stop_coordinator()
        time.sleep(2)
        self.start_coordinator()
        return ""

    def _stop_daemon(self, name: str) -> None:
        pid = int((self.daemons / f"{name}.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait(lambda: not Path(f"/proc/{pid}").exists(), f"{name} stopped", 60)

    def _start_daemon(self, name: str, answers: list[str]) -> None:
        subprocess.run([name], check=True, env=os.environ)
        wait(lambda: subprocess.run(answers, capture_output=True).returncode == 0, f"{name} answering", 60, 0.5)

    def slurmctld_restart(self) -> str:
        self._stop_daemon("slurmctld")
        time.sleep(1)
        self._start_daemon("slurmctld", ["scontrol", "ping"])
        return ""

    def slurmdbd_outage(self) -> str:
        """slurmdbd stays down while the run and the next faults go on; `hurry` starts it when due."""
        if self.dbd_back_at is not None:
            self.dbd_back_at += self.dbd_outage_s
        else:
            self._stop_daemon("slurmdbd")
            self.dbd_back_at = time.monotonic() + self.dbd_outage_s
        return f"{self.dbd_outage_s:.0f} s"


def trained_samples(run_dir: Path) -> dict[int, Counter]:
    per_epoch: dict[int, Counter] = {}
    for path in (run_dir / "audit").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            per_epoch.setdefault(entry["epoch"], Counter()).update(entry["keys"])
    return per_epoch


def compare_samples(reference: dict[int, Counter], chaos: dict[int, Counter]) -> tuple[int, int]:
    """(lost, repeated) over all epochs."""
    lost = repeated = 0
    for epoch in set(reference) | set(chaos):
        ref, got = reference.get(epoch, Counter()), chaos.get(epoch, Counter())
        lost += sum((ref - got).values())
        repeated += sum((got - ref).values())
    return lost, repeated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument(
        "--kinds",
        choices=("all", "job"),
        default="all",
        help="job: leave out the faults that disturb the whole cluster",
    )
    parser.add_argument("--dbd-outage-s", type=float, default=60.0)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF"):
        print(
            "needs the local cluster: `make slurm-up`, then the `export SLURM_CONF=...` line it prints", file=sys.stderr
        )
        return 2

    from slurmvision.configs import load_config
    from slurmvision.evaluate.inspect import inspect_checkpoint
    from slurmvision.launch.demo import prepare_shards
    from slurmvision.launch.launcher import submit
    from slurmvision.launch.local import train_here
    from slurmvision.slurm.ledger import Ledger

    kinds = JOB_LEVEL + (CLUSTER_WIDE if args.kinds == "all" else ())
    max_steps = 12 + 8 * args.faults
    faults = plan(args.seed, args.faults, kinds, max_steps)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sv-chaos-") as tmp:
        shards = prepare_shards(Path(tmp) / "work")
        overrides = [
            f"data.root={shards}",
            f"trainer.max_steps={max_steps}",
            "trainer.checkpoint_every=5",
            "trainer.log_every=1",
            "data.audit=true",
            "cluster.retry_backoff_s=0",
            f"cluster.crash_retries={args.faults + 1}",
            f"cluster.max_attempts={2 * args.faults + 2}",
        ]
        reference_dir = Path(tmp) / "reference"
        train_here(load_config("digits-demo", overrides, cluster="local", run_dir=reference_dir), nproc=2)
        run_dir = Path(tmp) / "run"
        submit(load_config("digits-demo", overrides, cluster="devslurm", run_dir=run_dir))
        chaos = Chaos(run_dir, args.dbd_outage_s)
        chaos.start_coordinator()
        injected = []
        try:
            for step, kind in faults:
                chaos.wait_for_step(step)
                at = chaos.step()
                note = getattr(chaos, kind.replace("-", "_"))()
                injected.append({"kind": kind, "planned_step": step, "step": at, "note": note})
                print(f"chaos: {kind} at step {at} {note}".rstrip(), flush=True)
            while chaos.coordinator.poll() is None:
                chaos.hurry()
                time.sleep(1)
        finally:  # the cluster outlives the run: never leave slurmdbd down
            if chaos.dbd_back_at is not None:
                chaos._start_daemon("slurmdbd", ["sacctmgr", "-n", "list", "cluster"])
        chaos.coordinator_output += chaos.coordinator.communicate()[0]
        attempts = Ledger(run_dir).attempts()
        finished = chaos.coordinator.returncode == 0 and "run finished" in chaos.coordinator_output
        equal = (
            finished
            and inspect_checkpoint(run_dir)["params_sha256"] == inspect_checkpoint(reference_dir)["params_sha256"]
        )
        lost_samples, repeated = compare_samples(trained_samples(reference_dir), trained_samples(run_dir))
        figures = {
            "seed": args.seed,
            "faults": injected,
            "finished": finished,
            "weights_equal": equal,
            "attempts": len(attempts),
            "jobs": len(Ledger(run_dir).jobs()),
            "steps_lost": sum(a["lost_steps"] or 0 for a in attempts),
            "samples_lost": lost_samples,
            "samples_repeated": repeated,
            "max_steps": max_steps,
            "minutes": (time.monotonic() - started) / 60,
            "coordinator_output": chaos.coordinator_output[-4000:],
        }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    rows = "\n".join(f"| {i} | {f['kind']} | {f['step']} | {f['note']} |" for i, f in enumerate(injected, 1))
    command = " ".join(["python", "benchmarks/chaos.py", *sys.argv[1:]])
    text = f"""{SECTION}

`{command}` on the local cluster (2 CPU cores, the `digits-demo` recipe, 2 ranks, {max_steps} steps,
checkpoints every 5 steps, the coordinator as a daemon; {time.strftime("%Y-%m-%d")}, {figures["minutes"]:.0f} min).

| # | fault | at step | note |
|---|---|---:|---|
{rows}

| figure | value | target |
|---|---:|---:|
| faults injected | {len(injected)} | |
| run finished | {"yes" if finished else "NO"} | yes |
| final weights equal to an uninterrupted run | {"yes" if equal else "NO"} | yes |
| attempts (jobs) | {len(attempts)} ({figures["jobs"]}) | |
| steps lost (trained again after a resume) | {figures["steps_lost"]} | |
| samples lost / seen twice | {lost_samples} / {repeated} | 0 / 0 |

Steps lost are those an attempt trained past its last checkpoint before a SIGKILL (a kill
or a node failure): the next attempt trains them again from that checkpoint, on the same
samples, so the run's samples and weights are still those of the uninterrupted run.
"""
    write_section(args.results, text)
    print(text)
    return 0 if finished and equal and lost_samples == repeated == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
