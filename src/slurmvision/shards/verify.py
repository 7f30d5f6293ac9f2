"""Check shards against their manifest: size, hash, count, and every sample's image and label.

Every problem is reported (shard, key, problem) instead of stopping at the first, so one
run tells what to rebuild. Key "" means the problem concerns the whole shard.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from slurmvision.shards.manifest import Manifest, ShardInfo, file_sha256
from slurmvision.shards.tario import IMAGE_EXTS, ShardFile


@dataclass
class VerifyReport:
    ok: bool
    shards: int
    samples: int
    bad: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "bad": [{"shard": b["shard"], "key": b["key"], "problem": b["problem"]} for b in self.bad],
        }


def check_sample(fields: dict[str, bytes], num_classes: int) -> Optional[str]:
    """None if the sample is usable, else the problem."""
    from PIL import Image, UnidentifiedImageError

    images = [ext for ext in fields if ext in IMAGE_EXTS]
    if len(images) != 1:
        return f"expected one image, found {len(images)} ({', '.join(sorted(fields))})"
    if "cls" not in fields:
        return "no cls (label) field"
    try:
        label = int(fields["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        return f"label {fields['cls'][:20]!r} is not an integer"
    if not 0 <= label < num_classes:
        return f"label {label} out of range 0..{num_classes - 1}"
    try:
        with Image.open(io.BytesIO(fields[images[0]])) as image:
            image.load()
    except UnidentifiedImageError:  # its message holds a BytesIO address, different every run
        return "image does not decode: not a known image format"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"image does not decode: {err}"
    return None


def verify_shard(path: Path, info: ShardInfo, num_classes: int) -> tuple[int, list[dict]]:
    """(samples read, problems) of one shard."""
    problems = []

    def bad(key: str, problem: str) -> None:
        problems.append({"shard": info.name, "key": key, "problem": problem})

    if not path.is_file():
        bad("", "shard file is missing")
        return 0, problems
    size = path.stat().st_size
    if size != info.bytes:
        bad("", f"size {size} bytes, manifest says {info.bytes}")
    if file_sha256(path) != info.sha256:
        bad("", "sha256 mismatch")
    shard = ShardFile(str(path))
    try:
        index = shard.index()
        checked = index.keys
        if index.error:
            bad(index.keys[-1] if index.keys else "", index.error)
            # The cut may fall inside the last sample: its missing fields are the truncation.
            checked = index.keys[:-1]
        for i, key in enumerate(checked):
            try:
                _, fields = shard.sample(i)
            except (LookupError, OSError) as err:
                bad(key, f"unreadable sample: {err}")
                continue
            problem = check_sample(fields, num_classes)
            if problem:
                bad(key, problem)
    finally:
        shard.close()
    if len(index.keys) != info.count:
        bad("", f"{len(index.keys)} samples, manifest says {info.count}")
    return len(index.keys), problems


def verify_shards(directory: str | Path, *, workers: int = 1, progress: bool = False) -> VerifyReport:
    """Verify every shard listed in `directory/manifest.json`, and flag tars it does not list."""
    from tqdm import tqdm

    directory = Path(directory)
    manifest = Manifest.load(directory)
    num_classes = len(manifest.classes)
    jobs = [(directory / info.name, info, num_classes) for info in manifest.shards]
    bar = dict(total=len(jobs), disable=not progress, desc="verify", unit="shard")
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(tqdm(pool.map(verify_shard, *zip(*jobs)), **bar))
    else:
        results = [verify_shard(*job) for job in tqdm(jobs, **bar)]
    bad = [problem for _, problems in results for problem in problems]
    listed = {info.name for info in manifest.shards}
    for extra in sorted(p.name for p in directory.glob("*.tar") if p.name not in listed):
        bad.append({"shard": extra, "key": "", "problem": "tar file not in the manifest"})
    return VerifyReport(ok=not bad, shards=len(manifest.shards), samples=sum(n for n, _ in results), bad=bad)
