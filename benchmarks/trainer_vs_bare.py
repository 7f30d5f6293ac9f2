"""The trainer against a bare loop: seconds per step of `slurmvision train` and of a reference loop
written the way timm's `train.py` trains, on the digits recipe, and where the trainer's time goes.

    python benchmarks/trainer_vs_bare.py [--steps 150] [--repeats 1] [--only NAME,...] [--quick]

The reference (`bare`) is the recipe's model made by timm.create_model, AdamW from timm's optimizer
factory (no weight decay on norms and biases), timm's cosine schedule stepped every update, label
smoothing cross-entropy, gradient clipping at optim.clip_grad, autocast as trainer.precision says (fp32
here), one random normalised batch held in memory (as timm's benchmark.py), the loss read every
step on one rank and reduced every 50 steps on several (as train.py logs), and DDP over gloo with
one process per rank and the trainer's CPU threads per rank. DeepSpeed rows compare with the DDP
reference at the same number of ranks (timm has no DeepSpeed loop).

Per step = (T(2N) - T(N)) / N, T the wall time of the whole command for N and 2N steps: start-up,
the final checkpoint and the final evaluation are in both and cancel. The breakdown times the phases
of the trainer's step (wrapped from outside, in the ranks) over a short run after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from results import WatchedBatches, machine, publish  # benchmarks/ is on the path of a script run from it

SECTION = "## Trainer against a bare loop"
JSON_KEY = "trainer_vs_bare"
SYNTHETIC = ["data.synthetic=true"]
NO_SHARDS = ["data.synthetic=true", "data.synthetic_classes=10"]  # the digits' 10 classes, without their shards


@dataclass(frozen=True)
class Setup:
    name: str  # the stable key in results.json
    label: str
    nproc: int
    overrides: tuple[str, ...] = ()
    bare: bool = False
    shards: bool = False  # reads the digits shards
    threads: int = 0  # compute threads per rank (SLURM_CPUS_PER_TASK, read by distributed.init); 0: its default

    def reference(self) -> str:
        return f"bare_{self.nproc}"


DEEPSPEED = ("trainer.engine=deepspeed",)
SETUPS = (
    Setup("bare_1", "bare loop (timm train.py style), 1 rank", 1, bare=True),
    Setup("ddp1_synthetic", "slurmvision, DDP engine, 1 rank, data.synthetic", 1, tuple(SYNTHETIC)),
    Setup("ddp1_shards", "slurmvision, DDP engine, 1 rank, shards (recipe: 1 loader worker)", 1, shards=True),
    Setup(
        "ddp1_shards_workers0",
        "slurmvision, DDP engine, 1 rank, shards, data.workers=0",
        1,
        ("data.workers=0",),
        shards=True,
    ),
    Setup(
        "ddp1_shards_threads1",
        "slurmvision, DDP engine, 1 rank, shards, 1 loader worker, 1 compute thread",
        1,
        shards=True,
        threads=1,
    ),
    Setup("bare_2", "bare loop (timm train.py style), DDP, 2 ranks", 2, bare=True),
    Setup("ddp2_synthetic", "slurmvision, DDP engine, 2 ranks, data.synthetic", 2, tuple(SYNTHETIC)),
    Setup("ddp2_shards", "slurmvision, DDP engine, 2 ranks, shards (1 loader worker each)", 2, shards=True),
    Setup(
        "ddp2_shards_workers0",
        "slurmvision, DDP engine, 2 ranks, shards, data.workers=0",
        2,
        ("data.workers=0",),
        shards=True,
    ),
    Setup(
        "zero1_synthetic",
        "slurmvision, DeepSpeed ZeRO-1, 2 ranks, data.synthetic",
        2,
        (*DEEPSPEED, "trainer.zero_stage=1", *SYNTHETIC),
    ),
    Setup(
        "zero2_synthetic",
        "slurmvision, DeepSpeed ZeRO-2, 2 ranks, data.synthetic",
        2,
        (*DEEPSPEED, "trainer.zero_stage=2", *SYNTHETIC),
    ),
)
BREAKDOWNS = ("ddp1_synthetic", "ddp1_shards", "ddp2_synthetic", "zero2_synthetic")
QUICK = ("bare_1", "ddp1_synthetic")
PHASES = {
    "data_wait": "data wait (next batch from the reader)",
    "stop_agreement": "stop agreement (Boundary all-reduce before the step)",
    "augment": "host-to-device copy and batch augmentation",
    "forward": "forward",
    "loss": "loss",
    "backward": "backward (DDP: with the gradient all-reduce)",
    "totals_allreduce": "loss/images all-reduce (StepTotals)",
    "optimizer": "optimizer: unscale, clip, step, zero grads",
    "schedule": "LR/weight-decay schedule",
    "logging": "logging (TensorBoard scalars, progress line)",
    "other": "the rest (loss to host, ledger, timers)",
}


# --- the reference loop -----------------------------------------------------------------------


def bare_rank(rank: int, nproc: int, port: int, steps: int, warmup: int) -> None:
    """One rank of the reference loop, as timm's train.py trains (see the module's docstring); rank 0
    prints its mean step time after `warmup` steps (`STEADY_MS x`), timed as the breakdown times the trainer's."""
    import timm
    import torch
    import torch.distributed as dist
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from slurmvision.configs import load_config

    config = load_config("digits-demo", NO_SHARDS)
    data, optim = config.data, config.optim
    # As distributed.init sets them for the trainer's CPU ranks:
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, (os.cpu_count() or 1) // nproc))
    if nproc > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    torch.manual_seed(rank)
    model = timm.create_model(
        config.model.name,
        num_classes=data.synthetic_classes,
        drop_path_rate=config.model.drop_path,
        **config.model.kwargs,
    )
    optimizer = create_optimizer_v2(
        model,
        "adamw",
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=tuple(optim.betas),
        eps=optim.eps,
        filter_bias_and_bn=True,
    )
    if nproc > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps,
        lr_min=optim.min_lr,
        warmup_t=optim.warmup_steps,
        warmup_lr_init=optim.warmup_lr,
        t_in_epochs=False,
    )
    loss_fn = LabelSmoothingCrossEntropy(data.label_smoothing) if data.label_smoothing else torch.nn.CrossEntropyLoss()
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.trainer.precision]
    scaler = torch.amp.GradScaler("cpu", enabled=dtype is torch.float16)
    images = torch.randn(data.batch_size, 3, data.img_size, data.img_size)
    targets = torch.randint(0, data.synthetic_classes, (data.batch_size,))
    model.train()
    timed = 0.0
    for update in range(1, steps + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if optim.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(num_updates=update)
        if nproc == 1:
            loss.item()  # train.py's losses_m.update, every step without distributed
        elif update % 50 == 0:
            reduced = loss.detach().clone()
            dist.all_reduce(reduced)
        if update > warmup:
            timed += time.perf_counter() - started
    if rank == 0 and steps > warmup:
        print(f"STEADY_MS {1000 * timed / (steps - warmup):.3f}", flush=True)
    if nproc > 1:
        dist.destroy_process_group()


def run_bare(nproc: int, steps: int, warmup: int) -> None:
    if nproc == 1:
        bare_rank(0, 1, 0, steps, warmup)
        return
    import torch.multiprocessing as mp

    from slurmvision.trainer.distributed import free_port

    mp.spawn(bare_rank, args=(nproc, free_port(), steps, warmup), nprocs=nproc)


# --- the trainer, from outside ------------------------------------------------------------------


def command(setup: Setup, steps: int, run_dir: Path, shards: Optional[Path], warmup: int = 0) -> list[str]:
    if setup.bare:
        return [
            sys.executable,
            __file__,
            "--bare-run",
            str(steps),
            "--bare-warmup",
            str(warmup),
            "--nproc",
            str(setup.nproc),
        ]
    data = [f"data.root={shards}"] if shards else NO_SHARDS
    return [
        sys.executable,
        "-m",
        "slurmvision",
        "train",
        "digits-demo",
        "--run-dir",
        str(run_dir),
        "--nproc",
        str(setup.nproc),
        *data,
        *setup.overrides,
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={10 * steps}",  # only the final save, in both run lengths
    ]


def run_length(setup: Setup, steps: int, work: Path, shards: Optional[Path], warmup: int = 0) -> float:
    """Wall seconds of the whole command for `steps` steps (a fresh run directory each time)."""
    return run_logged(setup, steps, work, shards, warmup)[0]


def run_logged(setup: Setup, steps: int, work: Path, shards: Optional[Path], warmup: int = 0) -> tuple[float, str]:
    """(wall seconds, output) of the whole command for `steps` steps, in a fresh run directory."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{setup.name}-{steps}-", dir=work))
    log = run_dir.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as out:
        env = {**os.environ, "SLURM_CPUS_PER_TASK": str(setup.threads)} if setup.threads else None
        command_line = command(setup, steps, run_dir, shards, warmup)
        done = subprocess.run(command_line, stdout=out, stderr=subprocess.STDOUT, env=env)
    took = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{setup.name} failed ({done.returncode}):\n" + log.read_text()[-3000:])
    return took, log.read_text()


def bare_steady_ms(setup: Setup, steps: int, warmup: int, work: Path) -> float:
    """The bare loop's mean step time in its process after `warmup` steps: the breakdown's measure."""
    output = run_logged(setup, steps, work, None, warmup)[1]
    return float(next(line.split()[1] for line in output.splitlines() if line.startswith("STEADY_MS ")))


# --- the breakdown: the trainer's step, timed phase by phase in the ranks ----------------------


class StepTimers:
    def __init__(self, warmup: int):
        self.warmup, self.steps = warmup, 0
        self.totals: dict[str, float] = defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] += seconds

    def end_step(self, seconds: float) -> None:
        self.steps += 1
        self.totals["step"] += seconds
        if self.steps == self.warmup:
            self.totals.clear()

    def per_step_ms(self) -> dict[str, float]:
        timed = self.steps - self.warmup
        phases = {key: 1000 * self.totals[key] / timed for key in PHASES if key != "other"}
        step = 1000 * self.totals["step"] / timed
        return {**phases, "other": step - sum(phases.values()), "step": step}


class Timed:
    """`fn` called through, its time added under `key`; its other attributes passed on."""

    def __init__(self, fn, timers: StepTimers, key: str):
        self.fn, self.timers, self.key = fn, timers, key

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.timers.add(self.key, time.perf_counter() - started)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def instrument(trainer, loop, timers: StepTimers) -> None:
    """Wrap the phases of `trainer`'s step with timers (CPU: the calls are synchronous)."""
    trainer.batches = WatchedBatches(trainer.batches, lambda started, ended: timers.add("data_wait", ended - started))
    trainer.augment = Timed(trainer.augment, timers, "augment")
    trainer.engine.backward = Timed(trainer.engine.backward, timers, "backward")
    trainer.engine.step = Timed(trainer.engine.step, timers, "optimizer")
    trainer.schedule_at = Timed(trainer.schedule_at, timers, "schedule")
    trainer._log_step = Timed(trainer._log_step, timers, "logging")
    loop.loss_fn = Timed(loop.loss_fn, timers, "loss")
    agree = loop.agree
    loop.agree = lambda record, device, **local: Timed(
        agree, timers, "totals_allreduce" if record.__name__ == "StepTotals" else "stop_agreement"
    )(record, device, **local)
    module, forward_started = trainer.engine.module, []

    def before_forward(*_):
        forward_started.append(time.perf_counter())

    def after_forward(*_):
        started = forward_started.pop()
        if module.training:  # not the evaluation's
            timers.add("forward", time.perf_counter() - started)

    module.register_forward_pre_hook(before_forward)
    module.register_forward_hook(after_forward)
    step = trainer.train_step

    def train_step(batches):
        started = time.perf_counter()
        result = step(batches)
        timers.end_step(time.perf_counter() - started)
        return result

    trainer.train_step = train_step


def timed_rank(env, config, warmup: int) -> dict:
    """One rank of `slurmvision train`'s job (trainer.entry.train without the run lock), timed."""
    from slurmvision.trainer import distributed, loop
    from slurmvision.trainer.monitor import setup_logging

    setup_logging(env, Path(config.run.dir) / "logs" / f"rank-{env.rank:05d}.log")
    device = distributed.init(env, config.cluster.gpus_per_node)
    try:
        trainer = loop.Trainer(config, env, device)
        timers = StepTimers(warmup)
        instrument(trainer, loop, timers)
        trainer.fit()
        return timers.per_step_ms()
    finally:
        distributed.shutdown()


def breakdown(setup: Setup, steps: int, warmup: int, work: Path, shards: Optional[Path]) -> dict[str, float]:
    from slurmvision.configs import load_config, save_config
    from slurmvision.launch.local import run_ranks

    run_dir = Path(tempfile.mkdtemp(prefix=f"breakdown-{setup.name}-", dir=work))
    data = [f"data.root={shards}"] if shards else NO_SHARDS
    overrides = [*data, *setup.overrides, f"trainer.max_steps={steps}", f"trainer.checkpoint_every={10 * steps}"]
    config = load_config("digits-demo", overrides, run_dir=run_dir)
    save_config(config, run_dir)
    return run_ranks(timed_rank, setup.nproc, config, warmup)


# --- the report ---------------------------------------------------------------------------------


def report(figures: dict, command_line: str) -> str:
    runs, parts = figures["runs"], figures["breakdown"]
    lines = [
        SECTION,
        "",
        f"`{command_line}` on {figures['machine']} with {figures['cpu_cores']} CPU cores, torch {figures['torch']}, "
        f"{figures['date']}; load average {figures['load_average_1m']} at the start, "
        f"{figures['load_average_1m_end']} at the end (other jobs shared the machine when it is above 0). "
        f"Digits recipe (tiny Swin V2 at 32 px, batch 32 per rank, AdamW, clip 5, fp32, CPU), "
        f"{figures['threads_per_rank'] or 'cores / ranks'} compute thread(s) per rank. "
        f"Per step = (T({2 * figures['steps']}) - T({figures['steps']})) / {figures['steps']} of the whole command, "
        f"best of {figures['repeats']}.",
        "",
        "| setup | ranks | s/step | × bare loop | T(N) s | T(2N) s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for setup in SETUPS:
        if setup.name not in runs:
            continue
        run = runs[setup.name]
        ratio = f"{run['ratio']:.3f}" if run.get("ratio") is not None else "–"
        lines.append(
            f"| {setup.label} | {setup.nproc} | {run['s_per_step']:.4f} | {ratio} | "
            f"{run['t_n']:.1f} | {run['t_2n']:.1f} |"
        )
    lines += steady_lines(figures)
    if parts:
        names = [name for name in BREAKDOWNS if name in parts]
        lines += [
            "",
            f"Where a step's time goes (ms per step, rank 0, {figures['breakdown_steps']} steps after "
            f"{figures['breakdown_warmup']} of warm-up; the phases wrapped with timers from outside the loop):",
            "",
            "| phase | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for key, label in {**PHASES, "step": "whole step"}.items():
            lines.append(f"| {label} | " + " | ".join(f"{parts[name][key]:.2f}" for name in names) + " |")
    return "\n".join(lines) + "\n"


STEADY_PAIRS = (("bare_1", "ddp1_synthetic"), ("bare_2", "ddp2_synthetic"))  # (bare loop, the trainer's setup)


def steady_ratios(figures: dict) -> dict[str, float]:
    """The trainer's step (its breakdown) over the bare loop's, both timed in their process after the same
    warm-up: start-up noise (seconds here, against a few ms of difference per step) cannot enter it."""
    steady, parts = figures["steady_ms"], figures["breakdown"]
    return {ours: parts[ours]["step"] / steady[bare] for bare, ours in STEADY_PAIRS if bare in steady and ours in parts}


def steady_lines(figures: dict) -> list[str]:
    ratios, steady, parts = figures.get("steady_ratio", {}), figures.get("steady_ms", {}), figures["breakdown"]
    if not ratios:
        return []
    lines = [
        "",
        f"The same step timed inside the process (ms, mean of {figures['breakdown_steps']} steps after "
        f"{figures['breakdown_warmup']} of warm-up; the trainer's as in the breakdown below):",
        "",
        "| ranks | bare loop ms | slurmvision, data.synthetic ms | × bare loop |",
        "|---:|---:|---:|---:|",
    ]
    for bare, ours in STEADY_PAIRS:
        if ours in ratios:
            lines.append(f"| {bare[-1]} | {steady[bare]:.1f} | {parts[ours]['step']:.1f} | {ratios[ours]:.3f} |")
    goal = ratios.get("ddp1_synthetic")
    if goal is not None:
        lines += [
            "",
            f"Goal, synthetic data ≤ 3% slower than the bare loop per step (1 rank, in-process): {goal - 1:+.1%}, "
            f"{'met' if goal <= 1.03 else 'NOT met'}.",
        ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="N: each setup runs N and 2N steps")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each length")
    parser.add_argument("--only", help="comma-separated setups: " + ", ".join(s.name for s in SETUPS))
    parser.add_argument("--breakdown-steps", type=int, default=60)
    parser.add_argument("--breakdown-warmup", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        help="compute threads per rank for every setup (SLURM_CPUS_PER_TASK); default: cores/ranks",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps of two setups, to test the script")
    parser.add_argument("--results", type=Path, help="default benchmarks/RESULTS.md (--quick: none)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results.json (--quick: none)")
    parser.add_argument("--bare-run", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    parser.add_argument("--bare-warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_run:
        run_bare(args.nproc, args.bare_run, args.bare_warmup)
        return 0
    if args.quick:
        args.steps, args.breakdown_steps, args.breakdown_warmup = 3, 4, 1
        args.only = args.only or ",".join(QUICK)
    else:
        args.results = args.results or Path(__file__).with_name("RESULTS.md")
        args.json = args.json or Path(__file__).with_name("results.json")
    chosen = set(args.only.split(",")) if args.only else {s.name for s in SETUPS}
    unknown = chosen - {s.name for s in SETUPS}
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}: choose from {', '.join(s.name for s in SETUPS)}")
    setups = [s for s in SETUPS if s.name in chosen]
    if args.threads:  # read by every rank's distributed.init and by the bare loop, in every process started here
        os.environ["SLURM_CPUS_PER_TASK"] = str(args.threads)
    figures = {
        **machine(),
        "threads_per_rank": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": {},
        "breakdown": {},
        "steady_ms": {},
    }
    with tempfile.TemporaryDirectory(prefix="sv-bare-") as tmp:
        work = Path(tmp)
        shards = None
        if any(s.shards for s in setups) or not args.quick:
            from slurmvision.launch.demo import prepare_shards

            shards = prepare_shards(work / "digits")
        for setup in setups:
            where = shards if setup.shards or not args.quick else None
            t_n = min(run_length(setup, args.steps, work, where) for _ in range(args.repeats))
            t_2n = min(run_length(setup, 2 * args.steps, work, where) for _ in range(args.repeats))
            run = {"t_n": t_n, "t_2n": t_2n, "s_per_step": (t_2n - t_n) / args.steps}
            reference = figures["runs"].get(setup.reference())
            run["ratio"] = run["s_per_step"] / reference["s_per_step"] if reference and not setup.bare else None
            figures["runs"][setup.name] = run
            print(f"{setup.name:24s} {run['s_per_step']:.4f} s/step  T(N) {t_n:.1f}s  T(2N) {t_2n:.1f}s", flush=True)
        figures.update(breakdown_steps=args.breakdown_steps, breakdown_warmup=args.breakdown_warmup)
        for name in BREAKDOWNS if not args.quick else ("ddp1_synthetic",):
            setup = next(s for s in SETUPS if s.name == name)
            if name not in chosen and not args.quick:
                continue
            where = shards if setup.shards or not args.quick else None
            total = args.breakdown_steps + args.breakdown_warmup
            figures["breakdown"][name] = breakdown(setup, total, args.breakdown_warmup, work, where)
            print(f"breakdown {name}: " + json.dumps({k: round(v, 2) for k, v in figures["breakdown"][name].items()}))
        for setup in (s for s in setups if s.bare):
            total = args.breakdown_steps + args.breakdown_warmup
            figures["steady_ms"][setup.name] = bare_steady_ms(setup, total, args.breakdown_warmup, work)
            print(f"steady {setup.name}: {figures['steady_ms'][setup.name]:.2f} ms/step", flush=True)
        figures["steady_ratio"] = steady_ratios(figures)
    publish(figures, report, args.results, args.json, JSON_KEY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
