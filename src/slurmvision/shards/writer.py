"""ImageFolder tree -> WebDataset tar shards + manifest, deterministically and atomically.

Each sample is `KEY.<ext>` (the original encoded bytes), `KEY.cls` (class index) and
`KEY.json` (source path, class name, image size). Within a split, samples are put in a
fixed pseudo-random order so every shard mixes the classes; the same input gives
byte-identical shards. Shards are written as `*.tar.tmp` and renamed when complete, the
manifest last: an interrupted build leaves nothing that looks valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from slurmvision.errors import DataError
from slurmvision.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
                  ".tif": "tif", ".tiff": "tif", ".ppm": "ppm"}
DEFAULT_SPLITS = ("train", "val", "test")
DEFAULT_SAMPLES_PER_SHARD = 1000

Sample = tuple[str, Path, str, int]  # key, source file, relative path, label


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan(src: Path, splits: Optional[Iterable[str]] = None) -> tuple[list[str], dict[str, list[Sample]]]:
    """Classes (from train, else the first split) and each split's samples in shard order."""
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist: give a directory with train/ (and val/, test/) inside")
    splits = [s for s in (splits or DEFAULT_SPLITS) if (src / s).is_dir()]
    if not splits:
        raise DataError(f"{src} has none of the split folders {', '.join(DEFAULT_SPLITS)}: lay it out as "
                        f"{src}/train/<class>/<image>")
    class_source = "train" if "train" in splits else splits[0]
    classes = sorted(d.name for d in (src / class_source).iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{src / class_source} has no class folders: put each class's images in {src / class_source}/<class>/")
    index = {name: i for i, name in enumerate(classes)}
    samples: dict[str, list[Sample]] = {}
    for split in splits:
        found = []
        for class_dir in sorted(d for d in (src / split).iterdir() if d.is_dir() and not d.name.startswith(".")):
            if class_dir.name not in index:
                raise DataError(f"class {class_dir.name!r} in {split}/ is not in {class_source}/: every class needs "
                                f"{class_source} images (classes: {', '.join(classes)})")
            found += [(path, class_dir.name) for path in _images(class_dir)]
        if not found:
            raise DataError(f"{src / split} holds no images ({', '.join(sorted(set(IMAGE_SUFFIXES.values())))}): "
                            f"add them or remove the folder")
        found.sort(key=lambda item: (item[1], str(item[0])))
        random.Random(f"slurmvision:{split}").shuffle(found)
        samples[split] = [(f"{split}-{i:08d}", path, str(path.relative_to(src)), index[name])
                          for i, (path, name) in enumerate(found)]
    return classes, samples


def _encoded(path: Path, max_side: Optional[int]) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height): the original bytes unless the image must shrink."""
    from PIL import Image

    data = path.read_bytes()
    ext = IMAGE_SUFFIXES[path.suffix.lower()]
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_side and max(width, height) > max_side:
                scale = max_side / max(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.convert("RGB") if ext == "jpg" else image
                small = image.resize(size, Image.LANCZOS)
                out = io.BytesIO()
                small.save(out, format=image.format or Image.registered_extensions()[f".{ext}"],
                           **({"quality": 95} if ext == "jpg" else {}))
                return out.getvalue(), ext, *size
    except Exception as err:  # PIL raises many types for unreadable files
        raise DataError(f"cannot read image {path}: {err}; fix or remove it, then rebuild") from None
    return data, ext, width, height


def _write_shard(out: Path, name: str, samples: list[Sample], classes: list[str], max_side: Optional[int]) -> ShardInfo:
    import tarfile

    final, tmp = out / name, out / f"{name}.tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, path, relative, label in samples:
                data, ext, width, height = _encoded(path, max_side)
                meta = {"path": relative, "class": classes[label], "width": width, "height": height}
                members = {ext: data, "cls": str(label).encode(),
                           "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()}
                for suffix in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    # Fixed metadata: the same input gives the same bytes.
                    info.size, info.mtime, info.mode = len(members[suffix]), 0, 0o444
                    info.uname = info.gname = "slurmvision"
                    tar.addfile(info, io.BytesIO(members[suffix]))
        f.flush()
        os.fsync(f.fileno())
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, final)
    return ShardInfo(name, samples[0][0].rsplit("-", 1)[0], len(samples), size, digest)


def _chunks(samples: list[Sample], samples_per_shard: Optional[int], shard_size_mb: Optional[float]) -> list[list[Sample]]:
    if shard_size_mb is None:
        per = samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
        return [samples[i:i + per] for i in range(0, len(samples), per)]
    limit = shard_size_mb * 2**20
    chunks, current, size = [], [], 0
    for sample in samples:
        cost = sample[1].stat().st_size + 3 * 1024  # image + cls/json members and tar headers
        if current and size + cost > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(sample)
        size += cost
    return chunks + ([current] if current else [])


def build_shards(src: str | Path, out: str | Path, *, samples_per_shard: Optional[int] = None,
                 shard_size_mb: Optional[float] = None, workers: int = 1, max_side: Optional[int] = None,
                 splits: Optional[Iterable[str]] = None, overwrite: bool = False, progress: bool = True) -> Manifest:
    src, out = Path(src), Path(out)
    if samples_per_shard is not None and samples_per_shard < 1 or shard_size_mb is not None and shard_size_mb <= 0:
        raise DataError("--samples-per-shard and --shard-size-mb must be positive")
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise DataError(f"{out} already holds shards (manifest.json): choose another directory or pass --overwrite")
    classes, samples = scan(src, splits)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for stale in [*out.glob("*.tar"), *out.glob("*.tar.tmp"), out / MANIFEST_NAME]:
            stale.unlink(missing_ok=True)
    jobs = [(f"{split}-{i:06d}.tar", chunk) for split, split_samples in samples.items()
            for i, chunk in enumerate(_chunks(split_samples, samples_per_shard, shard_size_mb))]
    total = sum(len(chunk) for _, chunk in jobs)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="shards", disable=not progress)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(_write_shard, out, name, chunk, classes, max_side) for name, chunk in jobs]
                infos = []
                for future, (_, chunk) in zip(futures, jobs):
                    infos.append(future.result())
                    bar.update(len(chunk))
        else:
            infos = []
            for name, chunk in jobs:
                infos.append(_write_shard(out, name, chunk, classes, max_side))
                bar.update(len(chunk))
    except BaseException:
        for partial in out.glob("*.tar.tmp"):
            partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    manifest = Manifest(classes, infos)
    manifest.save(out)
    return manifest
