"""Data-pipeline benchmark: images/s of ImageFolder vs the shard reader vs decode+transform alone.

    python benchmarks/data_pipeline.py [--images 2000] [--workers N] [--results benchmarks/RESULTS.md]

All three use the same timm training transform at 224 (RandomResizedCrop, flip, colour
jitter, normalisation) and the same number of loader workers, on JPEGs of several hundred
pixels a side made from the photographs that ship with scikit-image:
  (a) torchvision ImageFolder + DataLoader, timm's usual float pipeline;
  (b) slurmvision's shard reader (TrainReader): uint8 batches, as they go to the GPU, which
      jitters the colours and normalises them; (b') with that batch work done here, on the
      CPU, as a CPU-only run does in its main process;
  (c) decode + transform only: the reader's per-image work in the same number of processes,
      from bytes already in memory, with no I/O, batching or transfer (the limit for (b)).
Targets: (b) >= 1.5 x (a) and (b) >= 85% of (c). The figures go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from results import write_section  # benchmarks/ is on the path of a script run from it

RESOLUTION = 224
BATCH = 64
COLOR_JITTER = 0.4
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "camera",
)
SECTION = "## Data pipeline"


def make_imagefolder(root: Path, count: int, seed: int = 0) -> Path:
    """ImageNet-like JPEGs: random crops of real photographs, 400–640 px on the longer side."""
    from PIL import Image
    from skimage import data as photos

    rng = np.random.default_rng(seed)
    loaded = [getattr(photos, name)() for name in PHOTOS]
    # stereo_motorcycle is a (left, right, disparity) triple: its left photograph.
    sources = [Image.fromarray(p[0] if isinstance(p, tuple) else p).convert("RGB") for p in loaded]
    for i in range(count):
        label = i % len(sources)
        source = sources[label]
        width, height = source.size
        area = rng.uniform(0.5, 1.0)
        crop_w = int(width * np.sqrt(area) * rng.uniform(0.85, 1.0))
        crop_h = int(height * np.sqrt(area) * rng.uniform(0.85, 1.0))
        left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
        image = source.crop((left, top, left + crop_w, top + crop_h))
        longer = rng.integers(400, 641)
        scale = longer / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / "train" / PHOTOS[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=int(rng.integers(85, 96)))
    return root


def data_config(shards: Path, workers: int):
    from slurmvision.configs.data import DataConfig

    return DataConfig(
        root=str(shards),
        batch_size=BATCH,
        workers=workers,
        img_size=RESOLUTION,
        color_jitter=COLOR_JITTER,
        interpolation="bicubic",
        shuffle_buffer=1000,
    )


def steady_rate(batch_sizes) -> float:
    """Images/s from the first batch on: loader start-up (worker processes, imports) is left
    out, as a long training epoch amortises it."""
    sizes = iter(batch_sizes)
    next(sizes)
    start, seen = time.perf_counter(), 0
    for size in sizes:
        seen += size
    return seen / (time.perf_counter() - start)


def bench_imagefolder(images: Path, workers: int) -> float:
    import torch
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    transform = create_transform(RESOLUTION, is_training=True, color_jitter=COLOR_JITTER, interpolation="bicubic")
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(images / "train"), transform=transform),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    return steady_rate(len(batch) for batch, _ in loader)


def bench_shards(shards: Path, workers: int, device_work_here: bool) -> float:
    import torch

    from slurmvision.shards.reader import TrainReader
    from slurmvision.shards.transforms import DeviceAugment

    config = data_config(shards, workers)
    reader = TrainReader(config, seed=0, rank=0, world_size=1)
    batches = (batch for _, batch in zip(range(reader.batches_in_epoch()), reader))
    if not device_work_here:  # the uint8 batch is what goes to the GPU
        return steady_rate(len(batch.images) for batch in batches)
    augment = DeviceAugment(config, num_classes=len(PHOTOS), device=torch.device("cpu"), seed=0, rank=0)
    return steady_rate(len(augment(batch.images, batch.targets, step)[0]) for step, batch in enumerate(batches))


def _transform_all(args) -> int:
    import random

    import torch

    from slurmvision.shards.transforms import train_transform

    shards, workers, encoded, offset = args
    torch.set_num_threads(1)  # as in a DataLoader worker
    transform = train_transform(data_config(Path(shards), workers), RESOLUTION)
    for i, data in enumerate(encoded):
        random.seed(offset + i)  # per-sample seeding, as the reader does
        torch.default_generator.manual_seed(offset + i)
        transform(data)
    return len(encoded)


def bench_decode_only(images: Path, shards: Path, workers: int) -> float:
    files = sorted((images / "train").rglob("*.jpg"))
    encoded = [f.read_bytes() for f in files]
    chunks = [(str(shards), workers, encoded[w::workers], w * len(encoded)) for w in range(workers)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_transform_all, [(str(shards), workers, encoded[:8], 0)] * workers)  # start-up, imports
        start = time.perf_counter()
        seen = sum(pool.map(_transform_all, chunks))
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per pipeline")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    from slurmvision.shards.writer import build_shards

    with tempfile.TemporaryDirectory(prefix="sv-bench-") as tmp:
        images, shards = make_imagefolder(Path(tmp) / "images", args.images), Path(tmp) / "shards"
        build_shards(images, shards, samples_per_shard=256, workers=args.workers, progress=False)
        sizes = [f.stat().st_size for f in (images / "train").rglob("*.jpg")]
        figures = {}
        for name, run in (
            ("imagefolder", lambda: bench_imagefolder(images, args.workers)),
            ("shards", lambda: bench_shards(shards, args.workers, device_work_here=False)),
            ("shards_cpu_norm", lambda: bench_shards(shards, args.workers, device_work_here=True)),
            ("decode_only", lambda: bench_decode_only(images, shards, args.workers)),
        ):
            figures[name] = max(run() for _ in range(args.repeats))
            print(f"{name:12s} {figures[name]:8.1f} images/s", flush=True)

    speedup = figures["shards"] / figures["imagefolder"]
    of_limit = figures["shards"] / figures["decode_only"]
    command = " ".join(["python", "benchmarks/data_pipeline.py", *sys.argv[1:]])
    text = f"""{SECTION}

`{command}` on {platform.machine()} with {os.cpu_count()} CPU cores, {args.workers} loader workers,
{args.images} JPEGs from scikit-image photographs (mean {np.mean(sizes) / 1024:.0f} KiB, 400–640 px on the
longer side), timm training transform at {RESOLUTION} (RandomResizedCrop, flip, colour jitter
{COLOR_JITTER}, normalisation), batch {BATCH}, best of {args.repeats} passes, loader start-up excluded; {time.strftime("%Y-%m-%d")}.

| pipeline | images/s |
|---|---:|
| (a) torchvision ImageFolder + DataLoader | {figures["imagefolder"]:.1f} |
| (b) slurmvision shard reader (uint8 batches; colour jitter and normalisation on the device) | {figures["shards"]:.1f} |
| (b') the same, with the jitter and normalisation on this CPU by the training process | {figures["shards_cpu_norm"]:.1f} |
| (c) the reader's decode + transform only (the limit) | {figures["decode_only"]:.1f} |

(b) / (a) = {speedup:.2f} (target >= 1.5: {"met" if speedup >= 1.5 else "NOT met"});
(b) / (c) = {of_limit:.0%} (target >= 85%: {"met" if of_limit >= 0.85 else "NOT met"}).
"""
    write_section(args.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
