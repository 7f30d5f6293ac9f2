"""The restart breakdown: what a requeued attempt spends, phase by phase, before it trains again.

    python benchmarks/restart.py [--setups ddp1,ddp2,zero1_2] [--steps 5] [--more 3] [--repeats 2] [--quick]

On the digits recipe (its shards built in a temporary directory as `slurmvision demo` builds them), a
first attempt trains --steps steps, saves a checkpoint there (trainer.checkpoint_every) and is stopped
by SIGUSR2, as Slurm's time-limit warning stops it. Then --repeats restarts, one after another, each
resuming from the checkpoint the one before saved, training --more steps and stopping the same way
(the run requeued again and again). Each attempt starts its ranks as srun starts the tasks of a Slurm
job: one new interpreter per rank, here running what a submitit task runs, the job callable the
launcher submits (`slurmvision.launch.job.TrainJob`: the run's saved config, then
`trainer.entry.train`), each rank's place given by torchrun's variables (RANK, WORLD_SIZE, MASTER_*).
`train --nproc N` on one machine pays the same per rank, plus its own interpreter that spawns them.

Each rank records wall-clock timestamps through wrappers put around the trainer's functions from
outside (this script in the rank, before the job starts; nothing in src/ is changed); the launcher
records when it started each rank. Phases of rank 0 (in a collective, it waits for the slowest rank):

  interpreter start   the launch of the rank's process to the first line of this script in it
  imports             torch, timm, deepspeed (DeepSpeed setups), submitit (a Slurm task's entry), and
                      slurmvision's trainer (the shard reader, configs, TensorBoard...), each timed
  config, logging     the run's saved config loaded, the rank's environment, the rank log opened
  distributed init    trainer.distributed.init: threads, the process group's rendezvous
  run lock            the run directory's lock (rank 0) and its agreement
  model               models.build_model (timm.create_model)
  engine              trainer.engine.build_engine (DDP, or deepspeed.initialize)
  checkpoint load     trainer.resume.resume: the newest checkpoint chosen and verified (sha256), loaded
                      on every rank, the config compared, the engine, EMA and RNG states restored
  trainer setup       the rest of Trainer.__init__: the shard reader, the schedule, TensorBoard, ledger
  loader warm-up      the first batch: the loader worker forked, its shards opened at the saved
                      position, the shuffle buffer filled
  first step          the first step after the first batch (forward, backward, all-reduce, optimizer)

Reported: the median of each phase over the restarts, their sum as the total, each one's share, and
a steady step (the median of the restart's later steps) for scale. `--quick`: one rank, one step, then
one restart of two steps (a smoke test of this script; writes nothing unless --results/--json are given).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from results import WatchedBatches, machine, publish  # benchmarks/ is on the path of a script run from it

SECTION = "## Restart breakdown"
JSON_KEY = "restart"
LAUNCHED = "SV_BENCH_LAUNCHED"  # the launcher's time.time() when it started this rank's process


@dataclass(frozen=True)
class Setup:
    name: str  # the stable key in results.json
    label: str
    nproc: int
    overrides: tuple[str, ...] = ()

    @property
    def deepspeed(self) -> bool:
        return "trainer.engine=deepspeed" in self.overrides


SETUPS = (
    Setup("ddp1", "1 rank, DDP", 1),
    Setup("ddp2", "2 ranks, DDP", 2),
    Setup("zero1_2", "2 ranks, DeepSpeed ZeRO-1", 2, ("trainer.engine=deepspeed", "trainer.zero_stage=1")),
)
PHASES = {
    "interpreter": "interpreter start",
    "imports": "imports",
    "config": "config, environment, logging",
    "distributed_init": "distributed init (rendezvous)",
    "run_lock": "run lock",
    "model": "model (build_model)",
    "engine": "engine (build_engine)",
    "checkpoint_load": "checkpoint load (resume)",
    "trainer_setup": "trainer setup (reader, schedule, TensorBoard, ledger)",
    "loader_warmup": "loader warm-up (to the first batch)",
    "first_step": "first step",
}


# --- in each rank -----------------------------------------------------------------------------


def instrument(record: dict, stop_at: int) -> None:
    """Timestamps of the job's phases into `record`; SIGUSR2 to rank 0 once step `stop_at` is applied."""
    from slurmvision.trainer import build, distributed, loop

    def first_call(fn, key):
        def timed(*args, **kwargs):
            started = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                record.setdefault(key, [started, time.time()])

        return timed

    distributed.init = first_call(distributed.init, "distributed_init")  # called as distributed.init by entry.train
    build.build_model = first_call(build.build_model, "build_model")  # both called by build.build_models
    build.build_engine = first_call(build.build_engine, "build_engine")
    resume = loop.resume

    def timed_resume(*args, **kwargs):
        started = time.time()
        restored = resume(*args, **kwargs)
        record["resume"], record["resumed_step"] = [started, time.time()], restored.step
        if restored.checkpoint:  # its size, after the timing
            files = [p for p in Path(restored.checkpoint).rglob("*") if p.is_file()]
            record["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
        return restored

    loop.resume = timed_resume
    init, train_step, maybe_save = loop.Trainer.__init__, loop.Trainer.train_step, loop.Trainer.maybe_save

    def trainer_init(self, *args, **kwargs):
        started = time.time()
        init(self, *args, **kwargs)
        record["trainer"] = [started, time.time()]
        # fit() takes them from here; the wait for the first batch is the loader's warm-up
        self.batches = WatchedBatches(
            self.batches, lambda *wait: record.setdefault("first_batch", list(wait)), time.time
        )

    def timed_step(self, batches):
        started = time.time()
        result = train_step(self, batches)
        if result.applied:
            record["steps"].append([started, time.time()])
        return result

    def save_then_stop(self, due):
        maybe_save(self, due)
        if self.step >= stop_at and self.env.is_main and not record.get("signalled"):
            record["signalled"] = True
            os.kill(os.getpid(), signal.SIGUSR2)  # the time-limit warning: every rank stops at the next boundary

    loop.Trainer.__init__, loop.Trainer.train_step, loop.Trainer.maybe_save = trainer_init, timed_step, save_then_stop


def rank_main(run_dir: str, stop_at: int, deepspeed: bool, out: Path) -> None:
    """One rank of an attempt: imports timed one by one, then the job callable a Slurm task runs."""
    entered = time.time()
    import importlib

    record: dict = {"launched": float(os.environ[LAUNCHED]), "entered": entered, "imports": {}, "steps": []}
    modules = [("torch", "torch"), ("timm", "timm")]
    if deepspeed:
        modules.append(("deepspeed", "deepspeed"))
    modules += [("submitit", "submitit"), ("slurmvision", "slurmvision.trainer.entry")]
    if deepspeed:
        modules.append(("slurmvision", "slurmvision.trainer.deepspeed_engine"))
    for label, name in modules:
        started = time.time()
        importlib.import_module(name)
        record["imports"][label] = record["imports"].get(label, 0.0) + time.time() - started
    from slurmvision.launch.job import TrainJob

    record["imports_done"] = time.time()
    instrument(record, stop_at)
    record["result"] = TrainJob(run_dir)()
    out.write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not the interpreter's teardown, where DeepSpeed's CPU comm threads can abort a finished process


# --- the launcher -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attempt(setup: Setup, run_dir: Path, stop_at: int, name: str) -> list[dict]:
    """Start the setup's ranks as srun would, wait for them; each rank's record."""
    port, procs = free_port(), []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
    for rank in range(setup.nproc):
        out = run_dir.parent / f"{run_dir.name}-{name}-rank{rank}"
        env = {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(setup.nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, __file__, "--rank-run", str(run_dir), "--stop-at", str(stop_at)]
        command += ["--record", f"{out}.json", *(["--deepspeed"] if setup.deepspeed else [])]
        log = open(f"{out}.log", "w")
        env[LAUNCHED] = repr(time.time())
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, out))
    records, failed = [], []
    for proc, log, out in procs:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode or not Path(f"{out}.json").exists():
            failed.append(f"{out.name} exited with {proc.returncode}:\n" + Path(f"{out}.log").read_text()[-3000:])
        else:
            records.append(json.loads(Path(f"{out}.json").read_text()))
    if failed:
        raise SystemExit(f"{setup.name} {name} failed:\n" + "\n".join(failed))
    return records


def span(record: dict, key: str) -> float:
    start, end = record[key]
    return end - start


def phases(record: dict) -> dict[str, float]:
    """Seconds per phase of one rank's restart (see the module's docstring), the total and a steady step."""
    trainer_start, trainer_end = record["trainer"]
    init_start, init_end = record["distributed_init"]
    first_batch_end = record["first_batch"][1]
    first_step_end = record["steps"][0][1]
    built = span(record, "build_model") + span(record, "build_engine") + span(record, "resume")
    parts = {
        "interpreter": record["entered"] - record["launched"],
        "imports": record["imports_done"] - record["entered"],
        "config": init_start - record["imports_done"],
        "distributed_init": init_end - init_start,
        "run_lock": trainer_start - init_end,
        "model": span(record, "build_model"),
        "engine": span(record, "build_engine"),
        "checkpoint_load": span(record, "resume"),
        "trainer_setup": trainer_end - trainer_start - built,
        "loader_warmup": first_batch_end - trainer_end,
        "first_step": first_step_end - first_batch_end,
    }
    later = [end - start for start, end in record["steps"][1:]]
    return {
        **parts,
        "total": first_step_end - record["launched"],
        "steady_step": statistics.median(later) if later else None,
        **{f"import_{name}": seconds for name, seconds in record["imports"].items()},
    }


def measure(setup: Setup, steps: int, more: int, repeats: int, shards: Path, work: Path) -> dict:
    from slurmvision.configs import load_config, save_config

    run_dir = Path(tempfile.mkdtemp(prefix=f"{setup.name}-", dir=work))
    overrides = [f"data.root={shards}", f"trainer.checkpoint_every={steps}", *setup.overrides]
    save_config(load_config("digits-demo", overrides, run_dir=run_dir), run_dir)
    started = time.perf_counter()
    attempt(setup, run_dir, steps, "first")
    first_attempt_s = time.perf_counter() - started
    restarts = []
    for i in range(repeats):
        resume_at, started = steps + i * more, time.perf_counter()
        records = attempt(setup, run_dir, resume_at + more, f"restart{i + 1}")
        wall = time.perf_counter() - started
        for record in records:
            if record.get("resumed_step") != resume_at:
                raise SystemExit(
                    f"{setup.name}: restart {i + 1} resumed at {record.get('resumed_step')}, not {resume_at}"
                )
        ranks = [phases(record) for record in records]
        restarts.append({"rank0": ranks[0], "ranks": ranks, "attempt_wall_s": wall})
        print(f"{setup.name} restart {i + 1}: " + json.dumps({k: round(v or 0, 3) for k, v in ranks[0].items()}))
    keys = [*PHASES, "steady_step", *sorted({k for r in restarts for k in r["rank0"] if k.startswith("import_")})]
    values = {key: [r["rank0"][key] for r in restarts if r["rank0"].get(key) is not None] for key in keys}
    median = {key: statistics.median(found) if found else None for key, found in values.items()}
    median["total"] = sum(median[key] for key in PHASES)
    median["share"] = {key: median[key] / median["total"] for key in PHASES}
    median["checkpoint_bytes"] = records[0].get("checkpoint_bytes")
    return {
        "label": setup.label,
        "nproc": setup.nproc,
        "first_attempt_s": first_attempt_s,
        **median,
        "restarts": restarts,
    }


# --- the report -------------------------------------------------------------------------------


def report(figures: dict, command_line: str) -> str:
    runs = figures["setups"]
    names = list(runs)
    lines = [
        SECTION,
        "",
        f"`{command_line}` on {figures['machine']} with {figures['cpu_cores']} CPU cores, torch {figures['torch']}, "
        f"{figures['date']}; load average {figures['load_average_1m']} at the start, "
        f"{figures['load_average_1m_end']} at the end (other jobs shared the machine when it is above 0). "
        f"Digits recipe (tiny Swin V2 at 32 px, batch 32 per rank, 1 loader worker, fp32, CPU) on its shards: "
        f"a first attempt trains {figures['steps']} step(s) and saves, is stopped by SIGUSR2, then "
        f"{figures['repeats']} restart(s) one after another, each resuming and training {figures['more']} step(s). "
        f"Every rank of an attempt is a new interpreter running the job callable a Slurm task runs "
        f"(`TrainJob`), started as srun starts tasks; its phases are timed from outside the trainer "
        f"(wrappers put around its functions in the rank). Seconds of rank 0, from the start of its process to "
        f"the end of its first step; the median of each phase over the restarts, the total their sum. "
        f"Files warm in the page cache.",
        "",
        "| phase | " + " | ".join(f"{runs[n]['label']} s | share" for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    for key, label in PHASES.items():
        cells = " | ".join(f"{runs[n][key]:.2f} | {runs[n]['share'][key]:.0%}" for n in names)
        lines.append(f"| {label} | {cells} |")
    lines.append(
        "| **total, launch to first step done** | "
        + " | ".join(f"**{runs[n]['total']:.2f}** | 100%" for n in names)
        + " |"
    )
    steady = " | ".join(
        f"{runs[n]['steady_step']:.3f} | {runs[n]['total'] / runs[n]['steady_step']:.0f} steps"
        if runs[n].get("steady_step")
        else "– | –"
        for n in names
    )
    lines.append(f"| a steady step after it (the restart costs as many) | {steady} |")
    lines += [
        "",
        "Imports, one by one (rank 0, s): "
        + "; ".join(
            f"{runs[n]['label']}: "
            + ", ".join(f"{k[len('import_') :]} {runs[n][k]:.2f}" for k in sorted(runs[n]) if k.startswith("import_"))
            for n in names
        )
        + ".",
    ]
    lines += ["", dominant(runs)]
    return "\n".join(lines) + "\n"


def dominant(runs: dict) -> str:
    """The sentence on where the restart's time goes."""
    parts = []
    for run in runs.values():
        start = run["interpreter"] + run["imports"]
        top = max(PHASES, key=lambda key: run[key])
        parts.append(
            f"{run['label']}: interpreter and imports {start:.1f} s of {run['total']:.1f} s "
            f"({start / run['total']:.0%}); the largest phase {PHASES[top]} ({run['share'][top]:.0%})"
        )
    return (
        "Where the time goes: "
        + "; ".join(parts)
        + ". Ranks that srun starts (through submitit) on a cluster pay the interpreter start and the imports "
        "again on every attempt, each rank for itself; where the Python environment sits on a shared file "
        "system and the node's page cache is cold (a requeued job often lands on other nodes), the imports "
        "take longer than here, and the rendezvous waits for the slowest rank's. Not in the table: Slurm's "
        "time to requeue the job and give it nodes again."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", help="comma-separated, of: " + ", ".join(s.name for s in SETUPS))
    parser.add_argument("--steps", type=int, default=5, help="steps of the first attempt, saved at its end")
    parser.add_argument("--more", type=int, default=3, help="steps of each restart (the first one is timed)")
    parser.add_argument("--repeats", type=int, default=2, help="restarts, one after another")
    parser.add_argument("--quick", action="store_true", help="1 rank, 1 step, 1 restart of 2 steps, to test the script")
    parser.add_argument("--results", type=Path, help="default benchmarks/RESULTS.md (--quick: none)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results.json (--quick: none)")
    parser.add_argument("--rank-run", help=argparse.SUPPRESS)  # RUN_DIR: be one rank of an attempt
    parser.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_main(args.rank_run, args.stop_at, args.deepspeed, args.record)
    if args.quick:
        args.steps, args.more, args.repeats = 1, 2, 1
        args.setups = args.setups or "ddp1"
    else:
        args.results = args.results or Path(__file__).with_name("RESULTS.md")
        args.json = args.json or Path(__file__).with_name("results.json")
    chosen = args.setups.split(",") if args.setups else [s.name for s in SETUPS]
    unknown = set(chosen) - {s.name for s in SETUPS}
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}: choose from {', '.join(s.name for s in SETUPS)}")
    if args.steps < 1 or args.more < 1 or args.repeats < 1:
        parser.error("--steps, --more and --repeats must be at least 1")
    figures = {**machine(), "steps": args.steps, "more": args.more, "repeats": args.repeats, "setups": {}}
    with tempfile.TemporaryDirectory(prefix="sv-restart-") as tmp:
        work = Path(tmp)
        from slurmvision.launch.demo import prepare_shards

        shards = prepare_shards(work / "digits")
        for setup in (s for s in SETUPS if s.name in chosen):
            figures["setups"][setup.name] = measure(setup, args.steps, args.more, args.repeats, shards, work)
    publish(figures, report, args.results, args.json, JSON_KEY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
