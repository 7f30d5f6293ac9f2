"""ImageFolder tree -> WebDataset tar shards + manifest, deterministically and atomically.

Each sample is `KEY.<ext>` (the original encoded bytes), `KEY.cls` (class index) and
`KEY.json` (source path, class name, image size). Within a split, samples are put in a
fixed pseudo-random order so every shard mixes the classes; the same input gives
byte-identical shards, whatever the number of workers. The build happens in a staging
directory inside the output (shards written as `*.tar.tmp`, renamed when complete) and moves
into place at the end, the manifest last: a failed build removes what it wrote, and a failed
or killed one leaves the shards already there untouched.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable, Optional

from slurmvision.errors import DataError
from slurmvision.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, file_sha256

IMAGE_SUFFIXES = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".webp": "webp",
    ".bmp": "bmp",
    ".gif": "gif",
    ".tif": "tif",
    ".tiff": "tif",
    ".ppm": "ppm",
}
DEFAULT_SPLITS = ("train", "val", "test")
DEFAULT_SAMPLES_PER_SHARD = 1000
LOSSY_QUALITY = 95  # re-encoding happens once, so keep it close to the source
STAGING_PREFIX = ".slurmvision-staging-"  # + pid; inside the output, so moving out of it is a rename

Sample = tuple[str, Path, str, int]  # key, source file, relative path (posix), label
Job = tuple[str, str, list[Sample]]  # shard name, split, samples


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _resolve_splits(src: Path, splits: Optional[Iterable[str]]) -> list[str]:
    if splits is None:
        found = [s for s in DEFAULT_SPLITS if (src / s).is_dir()]
        if not found:
            raise DataError(
                f"{src} has none of the split folders {', '.join(DEFAULT_SPLITS)}: lay it out as "
                f"{src}/train/<class>/<image>"
            )
        return found
    splits = [splits] if isinstance(splits, str) else list(splits)
    for split in splits:
        # The split starts every key and shard name; webdataset cuts keys at the first dot.
        if not re.fullmatch(r"[\w-]+", split):
            raise DataError(f"split name {split!r} must be letters, digits, '_' or '-' (no dots or slashes)")
        if not (src / split).is_dir():
            raise DataError(
                f"split folder {src / split} does not exist: create it or leave {split!r} out of the splits"
            )
    if not splits or len(set(splits)) != len(splits):
        raise DataError(f"give each split once (got {splits}): e.g. train val test")
    return splits


def scan(src: Path, splits: Optional[Iterable[str]] = None) -> tuple[list[str], dict[str, list[Sample]]]:
    """Classes and each split's samples in shard order."""
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist: give a directory with train/ (and val/, test/) inside")
    splits = _resolve_splits(src, splits)
    class_dirs = {split: _visible_dirs(src / split) for split in splits}
    if "train" in splits:
        classes = [d.name for d in class_dirs["train"]]
        for split in splits:
            missing = sorted({d.name for d in class_dirs[split]} - set(classes))
            if missing:
                raise DataError(
                    f"class {missing[0]!r} in {split}/ is not in train/: every class needs train "
                    f"images (classes: {', '.join(classes)})"
                )
    else:
        classes = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    if not classes:
        where = src / ("train" if "train" in splits else splits[0])
        raise DataError(f"{where} has no class folders: put each class's images in {where}/<class>/")
    index = {name: i for i, name in enumerate(classes)}
    samples: dict[str, list[Sample]] = {}
    for split in splits:
        found = [(d.name, p.relative_to(src).as_posix(), p) for d in class_dirs[split] for p in _images(d)]
        if not found:
            raise DataError(
                f"{src / split} holds no images ({', '.join(sorted(set(IMAGE_SUFFIXES.values())))}): "
                f"add them or remove the folder"
            )
        found.sort(key=lambda item: (item[0], item[1]))
        # A fixed seed per split: deterministic, and each shard gets a mix of classes.
        random.Random(f"slurmvision:{split}").shuffle(found)
        samples[split] = [
            (f"{split}-{i:08d}", path, relative, index[name]) for i, (name, relative, path) in enumerate(found)
        ]
    return classes, samples


def _meta(relative: str, class_name: str, width: int, height: int) -> bytes:
    meta = {"path": relative, "class": class_name, "width": width, "height": height}
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()


def _encoded(path: Path, max_side: Optional[int]) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height): the original bytes unless the image must shrink."""
    from PIL import Image, UnidentifiedImageError

    ext = IMAGE_SUFFIXES[path.suffix.lower()]
    try:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise DataError(f"cannot read image {path}: not a known image format; fix or remove it, then rebuild") from None
    except Exception as err:  # PIL raises many types for unreadable files
        raise DataError(f"cannot read image {path}: {err}; fix or remove it, then rebuild") from None
    if not max_side or max(width, height) <= max_side:
        return data, ext, width, height
    try:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        fmt = image.format
        if ext == "jpg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        small = image.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.save(out, format=fmt, **({"quality": LOSSY_QUALITY} if ext in ("jpg", "webp") else {}))
    except Exception as err:
        raise DataError(
            f"cannot shrink image {path} to max_side {max_side}: {err}; fix or remove it, or build without max_side"
        ) from None
    return out.getvalue(), ext, *size


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    # Fixed metadata: the same input gives the same bytes.
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = "slurmvision"
    tar.addfile(info, io.BytesIO(data))


def _write_shard(
    out: Path, name: str, split: str, samples: list[Sample], classes: list[str], max_side: Optional[int]
) -> ShardInfo:
    final, tmp = out / name, out / f"{name}.tmp"
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, path, relative, label in samples:
                    data, ext, width, height = _encoded(path, max_side)
                    members = {
                        ext: data,
                        "cls": str(label).encode(),
                        "json": _meta(relative, classes[label], width, height),
                    }
                    for suffix in sorted(members):
                        _add(tar, f"{key}.{suffix}", members[suffix])
            f.flush()
            os.fsync(f.fileno())
        info = ShardInfo(name, split, len(samples), tmp.stat().st_size, file_sha256(tmp))
        os.replace(tmp, final)
    except OSError as err:  # reading an image raises DataError: this is the writing (disk full, quota)
        raise DataError(f"cannot write {tmp}: {err.strerror or err}; free space or choose another directory") from None
    return info


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_bytes(members: int) -> int:
    """File size of a tar whose members take `members` bytes: end marker, then padding to a record."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _sample_bytes(sample: Sample, classes: list[str]) -> int:
    """Bytes one sample takes in the tar: three headers plus padded data (an upper bound for
    the json, whose width/height are not read here; with max_side the image shrinks)."""
    _, path, relative, label = sample
    meta = _meta(relative, classes[label], 10**9, 10**9)
    return 3 * tarfile.BLOCKSIZE + _padded(path.stat().st_size) + _padded(len(str(label))) + _padded(len(meta))


def _chunks(samples: list[Sample], classes: list[str], per: Optional[int], limit: Optional[int]) -> list[list[Sample]]:
    """Cut a split into shards at `per` samples and/or before `limit` bytes (both apply when given)."""
    chunks: list[list[Sample]] = []
    current: list[Sample] = []
    size = 0
    for sample in samples:
        cost = _sample_bytes(sample, classes) if limit else 0
        if current and ((per and len(current) >= per) or (limit and _tar_bytes(size + cost) > limit)):
            chunks.append(current)
            current, size = [], 0
        current.append(sample)
        size += cost
    return chunks + ([current] if current else [])


def _replaced_shards(out: Path, overwrite: bool) -> list[str]:
    """The shards a build into `out` replaces: those its manifest lists (an unreadable one lists none)."""
    if not (out / MANIFEST_NAME).exists():
        return []
    if not overwrite:
        raise DataError(
            f"{out} already holds shards ({MANIFEST_NAME}): choose another directory or pass "
            f"--overwrite (overwrite=True) to replace them"
        )
    try:
        return [shard.name for shard in Manifest.load(out).shards]
    except DataError:
        return []


def _staging(out: Path) -> Path:
    """A fresh staging directory in `out`, after removing those that killed builds left."""
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale)
        staging.mkdir()
    except OSError as err:
        raise DataError(
            f"cannot write the shards to {out}: {err.strerror or err}; choose a directory you can write to"
        ) from None
    return staging


def _move_in(staging: Path, out: Path, old: list[str], new: list[str]) -> None:
    """Replace the old shards in `out` with the staged ones. The old manifest goes first (it must
    never list a shard once one is replaced), then the old shards it lists, no other file; the
    new manifest comes last, since shards count as built only once it is there."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for name in set(old) - set(new):
        (out / name).unlink(missing_ok=True)
    for name in [*new, MANIFEST_NAME]:
        os.replace(staging / name, out / name)
    staging.rmdir()


def _check_options(
    src: Path,
    out: Path,
    samples_per_shard: Optional[int],
    shard_size_mb: Optional[float],
    workers: int,
    max_side: Optional[int],
) -> None:
    """Refuse bad options, and an output inside the source, before anything is read or written."""
    for option, value in (
        ("samples_per_shard", samples_per_shard),
        ("shard_size_mb", shard_size_mb),
        ("max_side", max_side),
    ):
        if value is not None and not value > 0:
            raise DataError(f"{option} must be positive (got {value}): give a positive number or leave it out")
    if workers < 1:
        raise DataError(f"workers must be at least 1 (got {workers})")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory: give a directory for the shards")
    if src.resolve() in (out.resolve(), *out.resolve().parents):
        raise DataError(f"{out} is in the image folder {src}: write the shards outside it")


def _jobs(
    samples: dict[str, list[Sample]],
    classes: list[str],
    samples_per_shard: Optional[int],
    shard_size_mb: Optional[float],
) -> list[Job]:
    """(shard name, split, samples) of every shard, in manifest order."""
    per = samples_per_shard or (None if shard_size_mb else DEFAULT_SAMPLES_PER_SHARD)
    limit = int(shard_size_mb * 2**20) if shard_size_mb else None
    return [
        (f"{split}-{i:06d}.tar", split, chunk)
        for split, split_samples in samples.items()
        for i, chunk in enumerate(_chunks(split_samples, classes, per, limit))
    ]


def _write_shards(
    staging: Path,
    jobs: list[Job],
    classes: list[str],
    max_side: Optional[int],
    workers: int,
    advance: Callable[[int], None],
) -> list[Optional[ShardInfo]]:
    """Write the shards into `staging`, in a process pool when there are several workers and shards; their infos in
    job order. `advance` is told the samples of each shard written."""
    infos: list[Optional[ShardInfo]] = [None] * len(jobs)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            futures = {
                pool.submit(_write_shard, staging, name, split, chunk, classes, max_side): i
                for i, (name, split, chunk) in enumerate(jobs)
            }
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    infos[i] = future.result()
                    advance(len(jobs[i][2]))
            except BaseException:
                # Fail fast: drop the shards not started instead of building them all first.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        for i, (name, split, chunk) in enumerate(jobs):
            infos[i] = _write_shard(staging, name, split, chunk, classes, max_side)
            advance(len(chunk))
    return infos


def build_shards(
    src: str | Path,
    out: str | Path,
    *,
    samples_per_shard: Optional[int] = None,
    shard_size_mb: Optional[float] = None,
    workers: int = 1,
    max_side: Optional[int] = None,
    splits: Optional[Iterable[str]] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write `src/<split>/<class>/<image>` as `out/<split>-NNNNNN.tar` shards and `out/manifest.json`.

    A shard ends at `samples_per_shard` samples (1000 if neither limit is given) and/or before
    it would pass `shard_size_mb` (sized from the source files, so with `max_side` shards
    come out smaller). `overwrite` replaces the shards that the manifest in `out` lists; the
    directory's other files stay.
    """
    src, out = Path(src), Path(out)
    _check_options(src, out, samples_per_shard, shard_size_mb, workers, max_side)
    classes, samples = scan(src, splits)
    old = _replaced_shards(out, overwrite)
    jobs = _jobs(samples, classes, samples_per_shard, shard_size_mb)  # before staging: sizing a file may fail
    staging = _staging(out)
    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(chunk) for *_, chunk in jobs), unit="img", desc="shards", disable=None if progress else True
    )  # None: only on a terminal
    try:
        manifest = Manifest(classes, _write_shards(staging, jobs, classes, max_side, workers, bar.update))
        manifest.save(staging)
        _move_in(staging, out, old, [name for name, *_ in jobs])
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return manifest
