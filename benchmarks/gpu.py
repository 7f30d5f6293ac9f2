"""The GPU fast path and the trainer on one GPU: images/s, memory and data wait, in one command.

    benchmarks/gpu.sh OUT_DIR [--smoke] [--resume]   (runs: python benchmarks/gpu.py OUT_DIR ... [--budget-s 540])

What it measures (one table each, printed and written to OUT_DIR/RESULTS.md; every figure in
OUT_DIR/results.json under a stable key):

1. throughput: a bare reference loop, written as timm's train.py trains (timm.create_model, AdamW in
   torch's default implementation, autocast, a GradScaler for fp16, label smoothing, gradient clipping,
   cudnn.benchmark, one random batch held on the GPU), for swinv2_tiny_window8_256 and sgformer_s at
   224/256/288 px in bf16 and fp16, at the largest batch that fits: doubled from 64 until a step runs
   out of memory (at most 1024), found in bf16 and used for both.
2. fast-path keys: the DDP engine's own step (trainer.ddp.DDPEngine: the forward, loss, backward and
   optimizer step the training loop runs) on Swin V2 Tiny, uncompiled, with the defaults and with each
   key flipped: optim.fused, trainer.tf32, trainer.cudnn_benchmark, model.channels_last.
   trainer.gradient_as_bucket_view needs DDP on 2 or more GPUs and data.prefetch_to_device the loop:
   see 4b. 2b. model.compile: the same step eager and compiled, for each model (first step: the compile).
3. gradient checkpointing: the bare loop's peak memory and speed with and without, same batch.
4a. the trainer: `slurmvision train` (one rank, the real loop) on random batches in memory
   (data.synthetic) against the bare loop at the same batch, with the recipe's defaults (compiled) and
   eager (the loop's own cost). 4b. the shard reader: the same on shards written here (random JPEGs,
   the recipe's augmentation) with data.prefetch_to_device on and off: images/s and the share of the
   step spent waiting for data (train/data_wait_s over train/step_time_s, from TensorBoard).
5. DeepSpeed ZeRO-1 and ZeRO-2 in fp16 (one rank: the engines' overhead, not their memory savings)
   against the DDP engine in fp16, same batch, uncompiled.

Figures are medians over the timed steps after a warm-up; the later stages' batch is half the largest
that fits at 256 px. Everything runs within --budget-s, so that gpu.sh ends within 10 minutes on one
GPU: stage 1 at 256 px, then 2, 4a, 2b, 4b, 5, 3, then stage 1 at the other sizes (what the budget cuts
is the least needed); a measurement that would not fit is reported as skipped. RESULTS.md and
results.json are rewritten after each measurement; --resume keeps what they hold and measures what
they lack. It installs nothing: the project's venv only.

--smoke: the same stages on the CPU with tiny models and a few steps, in about a minute; it checks
that the script works (`make test` runs it) and measures nothing worth reporting.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from results import machine, write_figures  # benchmarks/ is on the path of a script run from it

RECIPE = "swinv2-tiny-a100"
KEY_MODEL = "swinv2_tiny_window8_256"
DROP_PATH = 0.1  # the bare loop's and the trainer's
LABEL_SMOOTHING = 0.1
CLIP = 5.0
NUM_CLASSES = 1000
TINY_SWIN = {"patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}


@dataclass(frozen=True)
class Plan:
    """What one mode measures, and how long."""

    device: str
    models: tuple[str, ...]
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    key_size: int  # the resolution of stages 2 to 5
    kwargs: dict = field(default_factory=dict)  # per model: extra timm.create_model arguments
    batch_start: int = 32
    batch_max: int = 1024
    warmup: int = 3
    steps: int = 10
    trainer_steps: int = 30  # logged steps of a `slurmvision train` run; the first third is warm-up
    data_batch_max: int = 256
    images: int = 8192  # the shards of stage 4
    image_side: int = 256
    workers: int = 8


GPU = Plan(
    device="cuda",
    models=("swinv2_tiny_window8_256", "sgformer_s"),
    sizes=(224, 256, 288),
    dtypes=("bf16", "fp16"),
    key_size=256,
    batch_start=64,
    workers=max(1, min(8, (os.cpu_count() or 2) - 2)),
)
SMOKE = Plan(
    device="cpu",
    models=("swinv2_tiny_window8_256",),
    sizes=(32,),
    dtypes=("bf16",),
    key_size=32,
    kwargs={"swinv2_tiny_window8_256": TINY_SWIN},
    batch_start=1,
    batch_max=2,
    warmup=1,
    steps=1,
    trainer_steps=2,
    data_batch_max=2,
    images=12,
    image_side=40,
    workers=0,
)


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def skipped(reason: str) -> dict:
    return {"skipped": reason}


def failed(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"}


class Bench:
    """The plan, the time budget and the figures of one run. Each measurement has a name in its stage;
    one that does not fit in the budget is reported as skipped, one that fails as its error, and with
    --resume one that an earlier run measured is kept as it was. `saved` is called after each one."""

    def __init__(self, plan: Plan, budget: Budget, figures: dict, resume: bool, out: Path, saved: Callable):
        self.plan, self.budget, self.figures, self.resume, self.out = plan, budget, figures, resume, out
        self.saved = saved

    def measure(self, stage: str, name: str, need_s: float, how: Callable[..., dict], *args, **kwargs) -> None:
        """results[stage][name] = how(*args, **kwargs), within the budget (`need_s` left at least)."""
        results = self.figures.setdefault(stage, {})
        earlier = results.get(name)
        if self.resume and isinstance(earlier, dict) and not {"skipped", "error"} & earlier.keys():
            return
        if not self.budget.allows(need_s):
            results[name] = skipped("time budget")
        else:
            try:
                results[name] = how(*args, **kwargs)
            except Exception as err:  # one measurement failing does not end the benchmark
                results[name] = failed(err)
                traceback.print_exc()
        print(f"{stage}: {name}", json.dumps(results[name]), flush=True)
        self.saved()

    def skip(self, stage: str, name: str, reason: str) -> None:
        self.figures.setdefault(stage, {})[name] = skipped(reason)

    def half_largest_batch(self, model_name: str) -> int:
        """Half the largest batch stage 1 found for the model at the key size: room for the variants
        that need more memory (compiling, fp32 master copies)."""
        found = self.figures.get("throughput", {}).get(f"{model_name}@{self.plan.key_size}", {}).get("largest_batch")
        return max(1, (found or self.plan.batch_start) // 2)

    NOT_COMPILED = "not on the CPU smoke run (slow compile)"

    def compiles(self) -> bool:
        """The recipe compiles the model; the CPU smoke run does not (compiling there is slow)."""
        return self.plan.device != "cpu"

    def eager_here(self) -> list[str]:
        return [] if self.compiles() else ["model.compile=false"]


# --- timing --------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def free_memory() -> None:
    torch = _torch()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(step: Callable[[], object], batch: int, warmup: int, steps: int, sync: Callable[[object], None]) -> dict:
    """Median images/s over `steps` single-step timings after `warmup` steps; the first step's time
    (compilation, cuDNN autotuning) and the peak memory of the timed steps."""
    torch = _torch()
    free_memory()  # what the measurement before left: its model, optimizer and batch are gone by now
    started = time.perf_counter()
    sync(step())
    first_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    sync(None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"batch": batch, "step_s": step_s, "images_per_s": batch / step_s, "first_step_s": first_s, "peak_gib": peak}


def cuda_sync(_out) -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- 1, 3: the bare reference loop ---------------------------------------------------------------


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": None}


def bare_loop(
    plan: Plan, model_name: str, size: int, dtype: str, batch: int, *, checkpointing=False, warmup=None, steps=None
) -> dict:
    """The reference loop, as timm's train.py trains (see the module's docstring)."""
    import timm
    import torch

    import slurmvision.models  # noqa: F401  (registers SG-Former with timm)

    device = torch.device(plan.device)
    torch.backends.cudnn.benchmark = True  # as train.py sets it
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's defaults
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = timm.create_model(
        model_name, num_classes=NUM_CLASSES, img_size=size, drop_path_rate=DROP_PATH, **plan.kwargs.get(model_name, {})
    ).to(device)
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    amp = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(images), targets, label_smoothing=LABEL_SMOOTHING)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return timed(step, batch, warmup or plan.warmup, steps or plan.steps, cuda_sync)


def largest_batch(fits: Callable[[int], None], start: int, cap: int) -> int:
    """The largest of start, 2*start, ... (at most cap) for which `fits` runs without running out of
    memory; below start, halved down to 1. 0 if not even 1 fits."""
    torch = _torch()

    def ok(batch: int) -> bool:
        try:
            fits(batch)
            return True
        except torch.OutOfMemoryError:
            pass
        free_memory()  # once the exception, and the frames holding the activations, are gone
        return False

    batch = start
    if not ok(batch):
        while batch > 1:
            batch //= 2
            if ok(batch):
                return batch
        return 0
    while batch * 2 <= cap and ok(batch * 2):
        batch *= 2
    return batch


def throughput(bench: Bench, sizes: tuple[int, ...]) -> None:
    """Stage 1 at `sizes`, for each model (results "MODEL@SIZE")."""
    plan = bench.plan
    for model_name in plan.models:
        for size in sizes:

            def largest_then_each_dtype(m=model_name, s=size) -> dict:
                batch = largest_batch(
                    lambda b: bare_loop(plan, m, s, "bf16", b, warmup=1, steps=1), plan.batch_start, plan.batch_max
                )
                return {"largest_batch": batch, **{d: bare_loop(plan, m, s, d, batch) for d in plan.dtypes}}

            bench.measure("throughput", f"{model_name}@{size}", 20, largest_then_each_dtype)


# --- 2, 5: the engines' own step -----------------------------------------------------------------


def run_config(
    plan: Plan,
    overrides: list[str],
    run_dir: Optional[Path] = None,
    *,
    data_root: Optional[str] = "/x",
    model_name: str = KEY_MODEL,
):
    """The recipe's config at the plan's size; `data_root` None: none (data.synthetic)."""
    from slurmvision.configs import load_config

    model_kwargs = dict(plan.kwargs.get(model_name, {}), img_size=plan.key_size)
    return load_config(
        RECIPE,
        [
            *([f"data.root={data_root}"] if data_root is not None else []),
            f"model.name={model_name}",
            f"data.img_size={plan.key_size}",
            f"model.kwargs={json.dumps(model_kwargs)}",
            f"model.drop_path={DROP_PATH}",
            "optim.warmup_epochs=0",
            "optim.warmup_steps=2",
            *overrides,
        ],
        cluster="local",
        run_dir=run_dir,
    )


def engine_step(
    plan: Plan, batch: int, overrides: list[str], engine_kind: str = "ddp", model_name: str = KEY_MODEL
) -> dict:
    """Images/s of an engine's training step, built from the config as the trainer builds it."""
    import torch

    from slurmvision.models import build_model
    from slurmvision.trainer.step import loss_fn

    config = run_config(plan, overrides, model_name=model_name)
    device = torch.device(plan.device)
    torch.manual_seed(0)
    model = build_model(config.model, NUM_CLASSES)
    if engine_kind == "deepspeed":
        from slurmvision.trainer.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, config, device)
    else:
        from slurmvision.trainer.ddp import DDPEngine

        engine = DDPEngine(model, config, device)
    images = torch.randn(batch, 3, plan.key_size, plan.key_size, device=device)
    if config.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        with engine.forward_context(sync=True):
            loss = loss_fn(engine.model(images), targets, LABEL_SMOOTHING)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())  # the loop reads every step's loss

    return timed(step, batch, plan.warmup, plan.steps, lambda _: None)


KEYS = {
    "defaults": [],
    "optim.fused=foreach": ["optim.fused=foreach"],
    "optim.fused=off": ["optim.fused=off"],
    "trainer.tf32=false": ["trainer.tf32=false"],
    "trainer.cudnn_benchmark=false": ["trainer.cudnn_benchmark=false"],
    "model.channels_last=true": ["model.channels_last=true"],
    "all off": [
        "optim.fused=off",
        "trainer.tf32=false",
        "trainer.cudnn_benchmark=false",
        "model.channels_last=false",
    ],
}
CUDA_ONLY = ("trainer.tf32=false", "trainer.cudnn_benchmark=false")


def fast_path_keys(bench: Bench) -> None:
    """Stage 2, uncompiled (compiling is stage 2b's): each key against the defaults."""
    plan = bench.plan
    batch = bench.half_largest_batch(KEY_MODEL)
    for name, overrides in KEYS.items():
        if plan.device == "cpu" and name in CUDA_ONLY:
            bench.skip("keys", name, "CUDA only")
            continue
        settings = [f"trainer.precision={plan.dtypes[0]}", "model.compile=false", *overrides]
        bench.measure("keys", name, 20, engine_step, plan, batch, settings)


def compiled_and_eager(bench: Bench) -> None:
    """Stage 2b: model.compile per model, the DDP engine's step eager and compiled (first step: the
    compile time)."""
    plan = bench.plan
    for model_name in plan.models:
        batch = bench.half_largest_batch(model_name)
        precision = f"trainer.precision={plan.dtypes[0]}"
        for name, compiles in (("eager", False), ("compiled", True)):
            if compiles and not bench.compiles():
                bench.skip("compile", f"{model_name}, {name}", bench.NOT_COMPILED)
                continue
            settings = [precision, f"model.compile={str(compiles).lower()}"]
            bench.measure(
                "compile",
                f"{model_name}, {name}",
                150 if compiles else 20,
                engine_step,
                plan,
                batch,
                settings,
                model_name=model_name,
            )
            if compiles:
                _torch()._dynamo.reset()  # its graphs and their memory


def deepspeed_fp16(bench: Bench) -> None:
    """Stage 5, uncompiled: the engines' own overhead."""
    plan = bench.plan
    batch = bench.half_largest_batch(KEY_MODEL)
    # fp16 on the GPU; the CPU smoke run uses bf16 (CPU autocast's fp16 underflows in Swin V2's norms).
    common = ["trainer.precision=" + ("fp16" if plan.device == "cuda" else "bf16"), "model.compile=false"]
    deepspeed = [*common, "trainer.engine=deepspeed"]
    settings = {
        "ddp": ("ddp", common),
        "zero1": ("deepspeed", [*deepspeed, "trainer.zero_stage=1"]),
        "zero2": ("deepspeed", [*deepspeed, "trainer.zero_stage=2"]),
    }
    for name, (kind, overrides) in settings.items():
        bench.measure("deepspeed", name, 30, engine_step, plan, batch, overrides, kind)


def grad_checkpointing(bench: Bench) -> None:
    """Stage 3: the bare loop with and without, at the key batch."""
    plan = bench.plan
    batch = bench.half_largest_batch(KEY_MODEL)
    for name, on in (("off", False), ("on", True)):
        bench.measure(
            "grad_checkpointing",
            name,
            20,
            bare_loop,
            plan,
            KEY_MODEL,
            plan.key_size,
            plan.dtypes[0],
            batch,
            checkpointing=on,
        )


# --- 4: the trainer, on random batches and on shards ---------------------------------------------


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def trainer_run(plan: Plan, run_dir: Path, batch: int, overrides: list[str], data_root: Optional[str]) -> dict:
    """`slurmvision train` on one rank (its own process, as train_here starts it); figures from its
    TensorBoard scalars, after the first third of the steps."""
    from slurmvision.launch.local import train_here

    free_memory()  # the GPU memory this process cached, for the trainer's process
    shutil.rmtree(run_dir, ignore_errors=True)  # a run left from an earlier benchmark would resume, not train
    steps = plan.trainer_steps
    config = run_config(
        plan,
        [
            f"data.batch_size={batch}",
            f"data.workers={plan.workers}",
            f"trainer.max_steps={steps}",
            "trainer.log_every=1",
            f"trainer.checkpoint_every={steps}",
            "trainer.gradcam_images=0",
            *overrides,
        ],
        run_dir,
        data_root=data_root,
    )
    started = time.monotonic()
    train_here(config, nproc=1)
    wall = time.monotonic() - started
    scalars = tensorboard_scalars(run_dir)
    warm = max(1, steps // 3)
    step_s = scalars["train/step_time_s"][warm:]
    waits = scalars["train/data_wait_s"][warm:]
    return {
        "batch": batch,
        "images_per_s": statistics.median(scalars["train/images_per_s"][warm:]),
        "step_s": statistics.median(step_s),
        "data_wait_share": sum(waits) / sum(step_s),
        "wall_s": wall,
        "peak_gib": max(scalars.get("train/gpu_mem_gib", [0.0]) or [0.0]) or None,
    }


def write_shards(plan: Plan, out: Path) -> Path:
    """Random JPEGs (smooth colour fields plus noise, 10 classes) as shards; a train and a small val split."""
    import numpy as np
    from PIL import Image

    from slurmvision.shards.writer import build_shards

    shutil.rmtree(out, ignore_errors=True)
    root = out / "images"
    rng = np.random.default_rng(0)
    unique = []
    for _ in range(64):  # encoded once each, written many times under other names
        side = plan.image_side
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(base).resize((side, side), Image.BICUBIC)
        noise = rng.integers(-20, 20, (side, side, 3))
        picture = Image.fromarray(np.clip(np.asarray(picture) + noise, 0, 255).astype(np.uint8))
        encoded = io.BytesIO()
        picture.save(encoded, format="JPEG", quality=90)
        unique.append(encoded.getvalue())
    for split, count in (("train", plan.images), ("val", max(20, plan.images // 64))):
        for i in range(count):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(unique[i % len(unique)])
    build_shards(root, out / "shards", samples_per_shard=1000, workers=max(1, plan.workers), progress=False)
    return out / "shards"


def trainer_against_bare(bench: Bench) -> None:
    """Stage 4a: `slurmvision train` on random batches in memory (data.synthetic) against the bare loop,
    with the recipe's defaults (compiled) and eager (the loop's own cost)."""
    plan = bench.plan
    batch = bench.half_largest_batch(KEY_MODEL)
    precision = f"trainer.precision={plan.dtypes[0]}"
    # The bare loop does no augmentation: neither does the trainer on random batches.
    plain = ["data.mixup=0", "data.cutmix=0", "data.reprob=0", "data.color_jitter=0", "data.auto_augment=null"]
    synthetic = [precision, "data.synthetic=true", *plain]
    runs = bench.out / "runs"
    bench.measure("trainer", "bare", 20, lambda: bare_loop(plan, KEY_MODEL, plan.key_size, plan.dtypes[0], batch))
    bench.measure(
        "trainer",
        "trainer synthetic, eager",
        45,
        lambda: trainer_run(plan, runs / "eager", batch, [*synthetic, "model.compile=false"], None),
    )
    if not bench.compiles():
        bench.skip("trainer", "trainer synthetic", bench.NOT_COMPILED)
    else:
        bench.measure(
            "trainer", "trainer synthetic", 150, lambda: trainer_run(plan, runs / "synthetic", batch, synthetic, None)
        )


def shard_reader(bench: Bench) -> None:
    """Stage 4b: the trainer (recipe defaults) on shards written here, with data.prefetch_to_device on
    and off: is the GPU waiting for data?"""
    plan = bench.plan
    batch = min(bench.half_largest_batch(KEY_MODEL), plan.data_batch_max)
    written: list[Path] = []

    def run(name: str, overrides: list[str]) -> dict:
        if not written:  # once, and only if a measurement needs them
            written.append(write_shards(plan, bench.out / "data"))
        settings = [f"trainer.precision={plan.dtypes[0]}", *bench.eager_here(), *overrides]
        return trainer_run(plan, bench.out / "runs" / name.replace(" ", "-"), batch, settings, str(written[0]))

    variants = {"prefetch on": ["data.prefetch_to_device=true"], "prefetch off": ["data.prefetch_to_device=false"]}
    if plan.device == "cpu":
        variants = {"prefetch on": variants["prefetch on"]}  # the CPU reads no batch ahead
    for name, overrides in variants.items():
        bench.measure("data", f"shards, {name}", 45 if plan.device == "cpu" else 120, run, name, overrides)


# --- the report ----------------------------------------------------------------------------------


def fmt(value, spec: str = ".0f") -> str:
    return "–" if value is None else format(value, spec)


def cell(result: dict, key: str = "images_per_s", spec: str = ".0f") -> str:
    """A figure; for a measurement skipped or failed, why, in its images/s column only."""
    if "skipped" in result or "error" in result:
        if key != "images_per_s":
            return "–"
        return f"skipped ({result['skipped']})" if "skipped" in result else f"failed: {result['error']}"
    return fmt(result.get(key), spec)


def table(results: dict, order: list[str], columns: dict[str, tuple[str, str]], base: str = "") -> list[str]:
    """Rows of name, batch and `columns` (heading: (figure, format)), in `order` (results.json keeps its
    keys sorted); with `base` (a row's name), img/s against that row's."""
    if not results:
        return ["Not measured."]
    base_rate = results.get(base, {}).get("images_per_s")
    headings = ["batch", *columns, *([f"vs {base}"] if base_rate else [])]
    lines = ["| | " + " | ".join(headings) + " |", "|---|" + "---:|" * len(headings)]
    for name in sorted(results, key=lambda name: order.index(name) if name in order else len(order)):
        result = results[name]
        cells = [str(result.get("batch", "")), *(cell(result, key, spec) for key, spec in columns.values())]
        if base_rate:
            rate = result.get("images_per_s")
            cells.append(fmt(rate / base_rate if rate else None, ".2f"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ratio(results: dict, a: str, b: str) -> Optional[float]:
    rate_a, rate_b = (results.get(k, {}).get("images_per_s") for k in (a, b))
    return rate_a / rate_b if rate_a and rate_b else None


def report(figures: dict, command: str) -> str:
    where, plan = figures["machine"], figures["plan"]
    rate, peak, first = ("images_per_s", ".0f"), ("peak_gib", ".1f"), ("first_step_s", ".1f")
    lines = [
        "## GPU fast path (benchmarks/gpu.sh)",
        "",
        f"`{command}` on {where['device']} ({where['cpu_cores']} CPU cores, load {where['load_average_1m']}), "
        f"torch {where['torch']}, CUDA {where['cuda']}, {where['date']}. Images/s: median of single-step timings "
        f"after a warm-up; {plan['key_size']} px and {plan['dtypes'][0]} unless a table says otherwise.",
        "",
        "### Bare reference loop (timm train.py style), largest batch that fits",
        "",
        "| model | px | batch | " + " | ".join(f"{d} img/s" for d in plan["dtypes"]) + " | peak GiB |",
        "|---|---:|---:|" + "---:|" * (len(plan["dtypes"]) + 1),
    ]

    def by_model_and_size(item):
        model_name, size = item[0].split("@")
        return plan["models"].index(model_name), int(size)

    for key, result in sorted(figures.get("throughput", {}).items(), key=by_model_and_size):
        model_name, size = key.split("@")
        if "largest_batch" not in result:
            lines.append(f"| {model_name} | {size} | {cell(result)} |")
            continue
        rates = " | ".join(cell(result[d]) for d in plan["dtypes"])
        memory = cell(result[plan["dtypes"][0]], *peak)
        lines.append(f"| {model_name} | {size} | {result['largest_batch']} | {rates} | {memory} |")
    lines += ["", f"### Fast-path keys: the DDP engine's step, {KEY_MODEL}, uncompiled", ""]
    lines += table(
        figures.get("keys", {}), list(KEYS), {"img/s": rate, "first step (s)": first, "peak GiB": peak}, "defaults"
    )
    compiled = figures.get("compile", {})
    lines += ["", "### model.compile: the DDP engine's step, eager and compiled (first step: the compile)", ""]
    by_model = [f"{m}, {how}" for m in plan["models"] for how in ("eager", "compiled")]
    lines += table(compiled, by_model, {"img/s": rate, "first step (s)": first, "peak GiB": peak})
    for model_name in plan["models"]:
        speedup = ratio(compiled, f"{model_name}, compiled", f"{model_name}, eager")
        if speedup:
            lines.append(f"\n{model_name}: compiled / eager {speedup:.2f}x.")
    trainer = figures.get("trainer", {})
    waits = {"img/s": rate, "data wait share": ("data_wait_share", ".1%"), "peak GiB": peak}
    lines += ["", "### The trainer (`slurmvision train`, 1 rank) against the bare loop, on random batches", ""]
    lines += table(trainer, ["bare", "trainer synthetic, eager", "trainer synthetic"], waits)
    for name, target in (("trainer synthetic", "target ≥ 1.2x"), ("trainer synthetic, eager", "goal ≥ 0.97x")):
        share = ratio(trainer, name, "bare")
        if share:
            lines.append(f"\n{name} / bare loop: {share:.2f}x ({target}).")
    lines += ["", "### The shard reader feeding the trainer (recipe defaults): is the GPU waiting for data?", ""]
    lines += table(figures.get("data", {}), ["shards, prefetch on", "shards, prefetch off"], waits)
    lines += ["", "### DeepSpeed ZeRO-1/2 against the DDP engine (1 rank; fp16 on the GPU, bf16 on the CPU)", ""]
    lines += table(figures.get("deepspeed", {}), ["ddp", "zero1", "zero2"], {"img/s": rate, "peak GiB": peak}, "ddp")
    lines += ["", f"### Gradient checkpointing: bare loop, {KEY_MODEL}", ""]
    lines += table(figures.get("grad_checkpointing", {}), ["off", "on"], {"img/s": rate, "peak GiB": peak}, "off")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for results.json, RESULTS.md and the runs")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: does it run?")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep what OUT/results.json already holds and measure only what it lacks (skipped or failed)",
    )
    args = parser.parse_args()
    import torch

    plan = SMOKE if args.smoke else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.sh needs a CUDA GPU; --smoke runs its CPU check", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    if args.resume and (args.out / "results.json").exists():
        figures = json.loads((args.out / "results.json").read_text()).get("gpu", {})
        if figures.get("plan", {}).get("device") != plan.device:
            print(f"{args.out}/results.json holds another mode's figures: resume with the same mode", file=sys.stderr)
            return 2
    where = machine()
    where["device"] = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (smoke)"
    where["cuda"] = torch.version.cuda
    figures.update(machine=where, plan=asdict(plan))
    command = "benchmarks/gpu.sh " + " ".join(sys.argv[1:])

    def save() -> None:  # a run stopped at a time limit keeps what it measured, and --resume goes on from there
        write_figures(args.out / "results.json", "gpu", figures)
        (args.out / "RESULTS.md").write_text(report(figures, command))

    bench = Bench(plan, Budget(args.budget_s), figures, args.resume, args.out, save)

    # The key size first (its largest batch sizes the later stages), the other sizes last: what the
    # budget cuts is the least needed.
    stages = [
        lambda: throughput(bench, (plan.key_size,)),
        lambda: fast_path_keys(bench),
        lambda: trainer_against_bare(bench),
        lambda: compiled_and_eager(bench),
        lambda: shard_reader(bench),
        lambda: deepspeed_fp16(bench),
        lambda: grad_checkpointing(bench),
        lambda: throughput(bench, tuple(s for s in plan.sizes if s != plan.key_size)),
    ]
    for stage in stages:
        stage()
    if torch.distributed.is_initialized():  # the engines' process group (DeepSpeed starts one)
        torch.distributed.destroy_process_group()
    print(report(figures, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
