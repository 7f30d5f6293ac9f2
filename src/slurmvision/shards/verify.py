"""Check shards against their manifest: size, hash, count, and every sample's image and label."""

from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from slurmvision.shards.manifest import Manifest, ShardInfo
from slurmvision.shards.tario import IMAGE_EXTS, ShardFile


@dataclass
class VerifyReport:
    ok: bool
    shards: int
    samples: int
    bad: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "bad": self.bad}


def check_sample(fields: dict[str, bytes], num_classes: int) -> str | None:
    """None if the sample is usable, else the problem."""
    from PIL import Image
    import io

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
    data = path.read_bytes()
    if len(data) != info.bytes:
        bad("", f"size {len(data)} bytes, manifest says {info.bytes}")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        bad("", "sha256 mismatch")
    shard = ShardFile(str(path))
    index = shard.index()
    if index.error:
        bad(index.keys[-1] if index.keys else "", index.error)
    for i, key in enumerate(index.keys):
        _, fields = shard.sample(i)
        problem = check_sample(fields, num_classes)
        if problem:
            bad(key, problem)
    if len(index.keys) != info.count:
        bad("", f"{len(index.keys)} samples, manifest says {info.count}")
    shard.close()
    return len(index.keys), problems


def verify_shards(directory: str | Path, *, workers: int = 1, progress: bool = False) -> VerifyReport:
    from tqdm import tqdm

    directory = Path(directory)
    manifest = Manifest.load(directory)
    num_classes = len(manifest.classes)
    jobs = [(directory / info.name, info, num_classes) for info in manifest.shards]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(verify_shard, *zip(*jobs)), total=len(jobs), disable=not progress, desc="verify"))
    else:
        results = [verify_shard(*job) for job in tqdm(jobs, disable=not progress, desc="verify")]
    bad = [problem for _, problems in results for problem in problems]
    listed = {info.name for info in manifest.shards}
    for extra in sorted(p.name for p in directory.glob("*.tar") if p.name not in listed):
        bad.append({"shard": extra, "key": "", "problem": "tar file not in the manifest"})
    return VerifyReport(ok=not bad, shards=len(manifest.shards), samples=sum(n for n, _ in results), bad=bad)
