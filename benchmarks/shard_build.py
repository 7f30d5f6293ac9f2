"""Shard build throughput: `slurmvision shards build` and `shards verify`, images/s and MiB/s, against the
input (its size, its images' format and pixel size) and the number of worker processes.

    python benchmarks/shard_build.py [--workers 1 2] [--repeats 2] [--samples-per-shard 250] [--dir DIR] [--quick]

The inputs are ImageFolder trees (train/ and val/, 10 classes, 90/10) generated in a temporary
directory, deterministically: photo-like pictures (smooth colour fields plus noise, so that a
256x256 JPEG at quality 90 takes about 25 KiB and a 500x375 one about 70 KiB, ImageNet's typical size),
saved as JPEG or PNG. Each case is built by `shards.writer.build_shards` (what `slurmvision shards
build SRC OUT --workers W --samples-per-shard S` calls; timed in this process, without the command's
interpreter start) into a fresh directory, then checked by `shards.verify.verify_shards` (`shards
verify OUT --workers W`: each shard's size and sha256, every image decoded, every label read). The
build copies each image's bytes into the tar as they are, unless --max-side shrinks it (decoded,
resized, re-encoded); one case measures that too. Both spread the shards over W processes (W=1: in
this process), so a split needs more than one shard for W to matter. Median of --repeats runs; the
inputs are in the page cache (just written), the shards are written and fsynced to --dir. MiB/s: of
the image files for the build, of the shards for verify. `--quick`: three small inputs (a smoke test
of this script; writes nothing unless --results/--json are given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from checkpoint_io import disk_of  # benchmarks/ is on the path of a script run from it
from results import machine, publish

SECTION = "## Shard build throughput"
JSON_KEY = "shard_build"
CLASSES = 10
VAL_SHARE = 0.1
NOISE = 10.0  # grey levels: sets how well the pictures compress (see the docstring)


@dataclass(frozen=True)
class Case:
    name: str  # the stable key in results.json
    images: int
    width: int
    height: int
    ext: str  # jpg or png
    max_side: Optional[int] = None

    @property
    def label(self) -> str:
        kind = "JPEG q90" if self.ext == "jpg" else "PNG"
        shrink = f", --max-side {self.max_side} (re-encoded)" if self.max_side else ""
        return f"{self.images} {kind} {self.width}x{self.height}{shrink}"


CASES = (
    Case("jpg256_1000", 1000, 256, 256, "jpg"),
    Case("jpg256_4000", 4000, 256, 256, "jpg"),
    Case("jpg500x375_1000", 1000, 500, 375, "jpg"),
    Case("png256_1000", 1000, 256, 256, "png"),
    Case("jpg500x375_1000_max256", 1000, 500, 375, "jpg", max_side=256),
)
QUICK = (
    Case("jpg256_96", 96, 256, 256, "jpg"),
    Case("png256_48", 48, 256, 256, "png"),
    Case("jpg500x375_32_max256", 32, 500, 375, "jpg", max_side=256),
)


def picture(rng, width: int, height: int):
    """A photo-like picture: a smooth random colour field with noise."""
    import numpy as np
    from PIL import Image

    field = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    smooth = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(smooth, dtype=np.float32) + rng.normal(0.0, NOISE, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_imagefolder(case: Case, root: Path) -> tuple[Path, int]:
    """The case's ImageFolder tree under `root` (deterministic); its image bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    val = round(case.images * VAL_SHARE)
    total = 0
    for i in range(case.images):
        split = "val" if i < val else "train"
        folder = root / split / f"class_{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.{case.ext}"
        options = {"quality": 90} if case.ext == "jpg" else {}
        picture(rng, case.width, case.height).save(path, **options)
        total += path.stat().st_size
    return root, total


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def measure(case: Case, workers: list[int], repeats: int, per_shard: int, work: Path) -> dict:
    from slurmvision.shards.verify import verify_shards
    from slurmvision.shards.writer import build_shards

    started = time.perf_counter()
    src, input_bytes = write_imagefolder(case, work / f"{case.name}-images")
    generated_s = time.perf_counter() - started
    figures: dict = {
        "label": case.label,
        "images": case.images,
        "input_bytes": input_bytes,
        "format": case.ext,
        "width": case.width,
        "height": case.height,
        "max_side": case.max_side,
        "samples_per_shard": per_shard,
        "generate_s": generated_s,
        "build": {},
        "verify": {},
    }
    for count in workers:
        builds, verifies = [], []
        for _ in range(repeats):
            out = work / f"{case.name}-shards"
            seconds, manifest = timed(
                build_shards,
                src,
                out,
                samples_per_shard=per_shard,
                workers=count,
                max_side=case.max_side,
                progress=False,
            )
            builds.append(seconds)
            figures["shards"] = len(manifest.shards)
            figures["output_bytes"] = sum(shard.bytes for shard in manifest.shards)
            seconds, report = timed(verify_shards, out, workers=count)
            if not report.ok or report.samples != case.images:
                raise SystemExit(f"{case.name}: the shards do not verify: {report.to_json()}")
            verifies.append(seconds)
            shutil.rmtree(out)
        # MiB/s of what each reads: the build, the image files; verify, the shards.
        for kind, runs, nbytes in (("build", builds, input_bytes), ("verify", verifies, figures["output_bytes"])):
            seconds = statistics.median(runs)
            figures[kind][str(count)] = {
                "s": seconds,
                "images_per_s": case.images / seconds,
                "mib_per_s": nbytes / 2**20 / seconds,
                "runs_s": runs,
            }
        one = str(workers[0])
        for kind in ("build", "verify"):
            figures[kind][str(count)]["x_first"] = figures[kind][one]["s"] / figures[kind][str(count)]["s"]
        print(
            f"{case.name:24s} workers {count}: build {figures['build'][str(count)]['images_per_s']:.0f} img/s "
            f"{figures['build'][str(count)]['mib_per_s']:.1f} MiB/s, verify "
            f"{figures['verify'][str(count)]['images_per_s']:.0f} img/s",
            flush=True,
        )
    shutil.rmtree(src)
    return figures


def report(figures: dict, command_line: str) -> str:
    cases, workers = figures["cases"], figures["workers"]
    first = workers[0]
    lines = [
        SECTION,
        "",
        f"`{command_line}` on {figures['machine']} with {figures['cpu_cores']} CPU cores, {figures['date']}; "
        f"load average {figures['load_average_1m']} at the start, {figures['load_average_1m_end']} at the end "
        f"(other jobs shared the machine when it is above 0); shards written to {figures['disk']}. "
        f"Generated ImageFolder trees (10 classes, train and val), {figures['samples_per_shard']} samples per "
        f"shard; `build_shards` and `verify_shards` timed in-process, median of {figures['repeats']}; "
        f"MiB/s of what each reads: the image files (build), the shards (verify); ×: the speed-up over the "
        f"same input with {first} worker(s).",
        "",
        "| input | input MiB | shards (MiB) | workers | build s | images/s | MiB/s | × "
        "| verify s | images/s | MiB/s | × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases.values():
        for count in workers:
            b, v = case["build"][str(count)], case["verify"][str(count)]
            lines.append(
                f"| {case['label']} | {case['input_bytes'] / 2**20:.1f} "
                f"| {case['shards']} ({case['output_bytes'] / 2**20:.1f}) | {count} "
                f"| {b['s']:.2f} | {b['images_per_s']:.0f} | {b['mib_per_s']:.1f} | {b['x_first']:.2f} "
                f"| {v['s']:.2f} | {v['images_per_s']:.0f} | {v['mib_per_s']:.1f} | {v['x_first']:.2f} |"
            )
    lines += [
        "",
        "- **build**: each image's bytes copied into the tar as they are (its header read for the size), "
        "each shard fsynced and hashed (sha256) for the manifest; with `--max-side` an image larger than it "
        "is decoded, resized and re-encoded. `--workers W` builds W "
        "shards at a time in W processes (a pool forked once per build); one split of one shard gets no "
        "help from it.",
        "- **verify**: every shard's size and sha256 against the manifest, then every image decoded and every "
        "label read: the decoding is work the build does not do (without `--max-side`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, min(cores, 8)}))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--only", help="comma-separated cases: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--dir", type=Path, help="where to generate and write (default: the system's temp dir)")
    parser.add_argument("--quick", action="store_true", help="three small inputs, one run each, to test the script")
    parser.add_argument("--results", type=Path, help="default benchmarks/RESULTS.md (--quick: none)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results.json (--quick: none)")
    args = parser.parse_args()
    if any(w < 1 for w in args.workers) or args.repeats < 1 or args.samples_per_shard < 1:
        parser.error("--workers, --repeats and --samples-per-shard must be at least 1")
    if args.quick:
        cases, args.repeats, args.samples_per_shard = QUICK, 1, 24
        args.workers = args.workers if "--workers" in sys.argv else [1, 2]
    else:
        cases = CASES
        args.results = args.results or Path(__file__).with_name("RESULTS.md")
        args.json = args.json or Path(__file__).with_name("results.json")
    if args.only:
        chosen = set(args.only.split(","))
        unknown = chosen - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}: choose from {', '.join(c.name for c in cases)}")
        cases = tuple(c for c in cases if c.name in chosen)
    workers = sorted(set(args.workers))
    figures = {
        **machine(),
        "workers": workers,
        "repeats": args.repeats,
        "samples_per_shard": args.samples_per_shard,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="sv-shard-build-", dir=args.dir) as tmp:
        work = Path(tmp)
        figures["disk"] = disk_of(work)
        for case in cases:
            figures["cases"][case.name] = measure(case, workers, args.repeats, args.samples_per_shard, work)
    publish(figures, report, args.results, args.json, JSON_KEY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
