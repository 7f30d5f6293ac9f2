"""The GPU fast path and the trainer on one GPU: images/s, memory and data wait, in one command.

    benchmarks/gpu.sh OUT_DIR [--smoke]        (runs: python benchmarks/gpu.py OUT_DIR [--smoke] [--budget-s 540])

What it measures (one table each, printed and written to OUT_DIR/RESULTS.md; every figure in
OUT_DIR/results.json under a stable key):

1. throughput: a bare reference loop, written as timm's train.py trains (timm.create_model, AdamW in
   torch's default implementation, autocast, a GradScaler for fp16, label smoothing, gradient clipping,
   cudnn.benchmark, one random batch held on the GPU), for swinv2_tiny_window8_256 and sgformer_s at
   224/256/288 px in bf16 and fp16, at the largest batch that fits: doubled from 32 until a step runs
   out of memory (at most 1024), found in bf16 and used for both.
2. fast-path keys: the DDP engine's own step (trainer.ddp.DDPEngine: the forward, loss, backward and
   optimizer step the training loop runs) on Swin V2 Tiny at 256 px, bf16, with the defaults and with
   each key flipped: optim.fused, trainer.tf32, trainer.cudnn_benchmark, model.channels_last,
   model.compile (its compile time apart). trainer.gradient_as_bucket_view needs DDP on 2 or more
   GPUs and data.prefetch_to_device the loop: see 4.
3. gradient checkpointing: the bare loop's peak memory and speed with and without, same batch.
4. trainer and data: `slurmvision train` (one rank, the real loop) on random batches in memory
   (data.synthetic) against the bare loop at the same batch; then on shards written here (random
   JPEGs, the recipe's augmentation) with data.prefetch_to_device on and off: images/s and the share
   of the step spent waiting for data (train/data_wait_s over train/step_time_s, from TensorBoard).
5. DeepSpeed ZeRO-1 and ZeRO-2 in fp16 (one rank: the engines' overhead, not their memory savings)
   against the DDP engine in fp16, same batch.

Figures are medians over the timed steps after a warm-up. Everything runs within --budget-s (the
stages in the order above; a stage that would not fit is reported as skipped), so that gpu.sh ends
within 10 minutes on one GPU. It installs nothing: the project's venv only.

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


def throughput(plan: Plan, budget: Budget) -> dict:
    results = {}
    for model_name in plan.models:
        for size in plan.sizes:
            key = f"{model_name}@{size}"
            if not budget.allows(20):
                results[key] = skipped("time budget")
                continue
            try:
                batch = largest_batch(
                    lambda b, m=model_name, s=size: bare_loop(plan, m, s, "bf16", b, warmup=1, steps=1),
                    plan.batch_start,
                    plan.batch_max,
                )
                results[key] = {"largest_batch": batch}
                for dtype in plan.dtypes:
                    results[key][dtype] = bare_loop(plan, model_name, size, dtype, batch)
            except Exception as err:  # one model or size failing does not end the benchmark
                results[key] = failed(err)
                traceback.print_exc()
            print(key, json.dumps(results[key]), flush=True)
    return results


# --- 2, 5: the engines' own step -----------------------------------------------------------------


def run_config(plan: Plan, overrides: list[str], run_dir: Optional[Path] = None, *, data_root: Optional[str] = "/x"):
    """The recipe's config at the plan's size; `data_root` None: none (data.synthetic)."""
    from slurmvision.configs import load_config

    model_kwargs = dict(plan.kwargs.get(KEY_MODEL, {}), img_size=plan.key_size)
    return load_config(
        RECIPE,
        [
            *([f"data.root={data_root}"] if data_root is not None else []),
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


def engine_step(plan: Plan, batch: int, overrides: list[str], engine_kind: str = "ddp", steps=None) -> dict:
    """Images/s of an engine's training step, built from the config as the trainer builds it."""
    import torch

    from slurmvision.models import build_model
    from slurmvision.trainer.step import loss_fn

    config = run_config(plan, overrides)
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

    return timed(step, batch, plan.warmup, steps or plan.steps, lambda _: None)


KEYS = {
    "defaults": [],
    "optim.fused=foreach": ["optim.fused=foreach"],
    "optim.fused=off": ["optim.fused=off"],
    "trainer.tf32=false": ["trainer.tf32=false"],
    "trainer.cudnn_benchmark=false": ["trainer.cudnn_benchmark=false"],
    "model.channels_last=true": ["model.channels_last=true"],
    "model.compile=true": ["model.compile=true"],
    "all off": [
        "optim.fused=off",
        "trainer.tf32=false",
        "trainer.cudnn_benchmark=false",
        "model.channels_last=false",
        "model.compile=false",
    ],
}
CUDA_ONLY = ("trainer.tf32=false", "trainer.cudnn_benchmark=false")


def fast_path_keys(plan: Plan, batch: int, budget: Budget) -> dict:
    results = {}
    for name, overrides in KEYS.items():
        compiles = "model.compile=true" in overrides
        if plan.device == "cpu" and (name in CUDA_ONLY or compiles):
            results[name] = skipped("CUDA only" if not compiles else "not on the CPU smoke run (slow compile)")
        elif not budget.allows(150 if compiles else 20):
            results[name] = skipped("time budget")
        else:
            try:
                results[name] = engine_step(plan, batch, [f"trainer.precision={plan.dtypes[0]}", *overrides])
            except Exception as err:
                results[name] = failed(err)
                traceback.print_exc()
            if compiles:
                _torch()._dynamo.reset()  # its graphs and their memory
        print(name, json.dumps(results[name]), flush=True)
    return results


def deepspeed_fp16(plan: Plan, batch: int, budget: Budget) -> dict:
    # fp16 on the GPU; the CPU smoke run uses bf16 (CPU autocast's fp16 underflows in Swin V2's norms).
    precision = "trainer.precision=" + ("fp16" if plan.device == "cuda" else "bf16")
    deepspeed = [precision, "trainer.engine=deepspeed"]
    results = {}
    settings = {
        "ddp": ("ddp", [precision]),
        "zero1": ("deepspeed", [*deepspeed, "trainer.zero_stage=1"]),
        "zero2": ("deepspeed", [*deepspeed, "trainer.zero_stage=2"]),
    }
    for name, (kind, overrides) in settings.items():
        if not budget.allows(30):
            results[name] = skipped("time budget")
            continue
        try:
            results[name] = engine_step(plan, batch, overrides, kind)
        except Exception as err:
            results[name] = failed(err)
            traceback.print_exc()
        print(name, json.dumps(results[name]), flush=True)
    return results


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


def trainer_and_data(plan: Plan, out: Path, batch: int, budget: Budget) -> dict:
    from slurmvision.configs.data import DataConfig

    results: dict = {}
    precision = f"trainer.precision={plan.dtypes[0]}"
    # The bare loop does no augmentation: neither does the trainer on random batches.
    plain = ["data.mixup=0", "data.cutmix=0", "data.reprob=0", "data.color_jitter=0", "data.auto_augment=null"]
    if "synthetic" in DataConfig.__dataclass_fields__:
        if budget.allows(60):
            try:
                results["bare"] = bare_loop(plan, KEY_MODEL, plan.key_size, plan.dtypes[0], batch)
                results["trainer synthetic"] = trainer_run(
                    plan, out / "runs" / "synthetic", batch, [precision, "data.synthetic=true", *plain], None
                )
                results["trainer/bare"] = results["trainer synthetic"]["images_per_s"] / results["bare"]["images_per_s"]
            except Exception as err:
                results["trainer synthetic"] = failed(err)
                traceback.print_exc()
        else:
            results["trainer synthetic"] = skipped("time budget")
    else:
        results["trainer synthetic"] = skipped("this checkout has no data.synthetic")
    print("trainer", json.dumps(results), flush=True)
    if not budget.allows(90):
        results["shards"] = skipped("time budget")
        return results
    try:
        shards = write_shards(plan, out / "data")
    except Exception as err:
        results["shards"] = failed(err)
        traceback.print_exc()
        return results
    data_batch = min(batch, plan.data_batch_max)
    variants = {"prefetch on": ["data.prefetch_to_device=true"], "prefetch off": ["data.prefetch_to_device=false"]}
    if plan.device == "cpu":
        variants = {"prefetch on": variants["prefetch on"]}  # the CPU reads no batch ahead
    for name, overrides in variants.items():
        if not budget.allows(45):
            results[f"shards, {name}"] = skipped("time budget")
            continue
        try:
            run_dir = out / "runs" / name.replace(" ", "-")
            results[f"shards, {name}"] = trainer_run(plan, run_dir, data_batch, [precision, *overrides], str(shards))
        except Exception as err:
            results[f"shards, {name}"] = failed(err)
            traceback.print_exc()
        print(name, json.dumps(results[f"shards, {name}"]), flush=True)
    return results


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


def report(figures: dict, command: str) -> str:
    where = figures["machine"]
    lines = [
        "## GPU fast path (benchmarks/gpu.sh)",
        "",
        f"`{command}` on {where['device']} ({where['cpu_cores']} CPU cores, load {where['load_average_1m']}), "
        f"torch {where['torch']}, {where['date']}. Images/s: median of single-step timings after a warm-up.",
        "",
        "### Bare reference loop (timm train.py style), largest batch that fits",
        "",
        "| model | px | batch | " + " | ".join(f"{d} img/s" for d in figures["plan"]["dtypes"]) + " | peak GiB |",
        "|---|---:|---:|" + "---:|" * (len(figures["plan"]["dtypes"]) + 1),
    ]
    for key, result in figures["throughput"].items():
        model_name, size = key.split("@")
        if "largest_batch" not in result:
            lines.append(f"| {model_name} | {size} | {cell(result)} |")
            continue
        rates = " | ".join(cell(result[d]) for d in figures["plan"]["dtypes"])
        peak = cell(result[figures["plan"]["dtypes"][0]], "peak_gib", ".1f")
        lines.append(f"| {model_name} | {size} | {result['largest_batch']} | {rates} | {peak} |")
    keys = figures["keys"]
    base = keys.get("defaults", {}).get("images_per_s")
    lines += [
        "",
        f"### Fast-path keys: the DDP engine's step, {KEY_MODEL} at {figures['plan']['key_size']} px, "
        f"{figures['plan']['dtypes'][0]}, batch {figures['key_batch']}",
        "",
        "| setting | img/s | vs defaults | first step (s) | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in keys.items():
        ratio = result.get("images_per_s") / base if base and result.get("images_per_s") else None
        lines.append(
            f"| {name} | {cell(result)} | {fmt(ratio, '.2f')} | {cell(result, 'first_step_s', '.1f')} | "
            f"{cell(result, 'peak_gib', '.1f')} |"
        )
    checkpointing = figures["grad_checkpointing"]
    lines += [
        "",
        f"### Gradient checkpointing: bare loop, {KEY_MODEL}, batch {figures['key_batch']}",
        "",
        "| grad checkpointing | img/s | peak GiB |",
        "|---|---:|---:|",
    ]
    for name, result in checkpointing.items():
        lines.append(f"| {name} | {cell(result)} | {cell(result, 'peak_gib', '.1f')} |")
    trainer = figures["trainer"]
    lines += [
        "",
        "### The trainer (`slurmvision train`, 1 rank) against the bare loop, and the shard reader feeding it",
        "",
        "| run | batch | img/s | data wait share | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in trainer.items():
        if isinstance(result, dict):
            lines.append(
                f"| {name} | {result.get('batch', '')} | {cell(result)} | {cell(result, 'data_wait_share', '.1%')} | "
                f"{cell(result, 'peak_gib', '.1f')} |"
            )
    if isinstance(trainer.get("trainer/bare"), float):
        lines.append(f"\ntrainer / bare loop on random batches: {trainer['trainer/bare']:.2f}x (target ≥ 1.2x).")
    lines += [
        "",
        "### DeepSpeed ZeRO-1/2 against the DDP engine (1 rank; fp16 on the GPU, bf16 on the CPU), "
        f"batch {figures['key_batch']}",
        "",
        "| engine | img/s | peak GiB |",
        "|---|---:|---:|",
    ]
    for name, result in figures["deepspeed"].items():
        lines.append(f"| {name} | {cell(result)} | {cell(result, 'peak_gib', '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for results.json, RESULTS.md and the runs")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: does it run?")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this")
    args = parser.parse_args()
    import torch

    plan = SMOKE if args.smoke else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.sh needs a CUDA GPU; --smoke runs its CPU check", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    where = machine()
    where["device"] = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (smoke)"
    where["cuda"] = torch.version.cuda
    figures: dict = {"machine": where, "plan": asdict(plan)}

    figures["throughput"] = throughput(plan, budget)
    found = figures["throughput"].get(f"{KEY_MODEL}@{plan.key_size}", {}).get("largest_batch") or plan.batch_start
    # Half the largest batch: room for the variants that need more memory (compiling, fp32 master copies).
    batch = figures["key_batch"] = max(1, found // 2)
    figures["keys"] = fast_path_keys(plan, batch, budget)
    figures["grad_checkpointing"] = {}
    for name, on in (("off", False), ("on", True)):
        try:
            figures["grad_checkpointing"][name] = (
                bare_loop(plan, KEY_MODEL, plan.key_size, plan.dtypes[0], batch, checkpointing=on)
                if budget.allows(20)
                else skipped("time budget")
            )
        except Exception as err:
            figures["grad_checkpointing"][name] = failed(err)
    figures["trainer"] = trainer_and_data(plan, args.out, batch, budget)
    figures["deepspeed"] = deepspeed_fp16(plan, batch, budget)

    command = "benchmarks/gpu.sh " + " ".join(sys.argv[1:])
    text = report(figures, command)
    (args.out / "RESULTS.md").write_text(text)
    write_figures(args.out / "results.json", "gpu", figures)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
