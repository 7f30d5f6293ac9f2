"""`slurmvision eval`: a checkpoint evaluated on this machine, in one process or N ranks started by
`run_ranks` (as `train --nproc` starts them), and its record saved beside the run's own evaluations."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from slurmvision.checkpoints import open_checkpoint, run_of
from slurmvision.errors import DataError, RunError
from slurmvision.launch.local import run_ranks
from slurmvision.shards.manifest import MANIFEST_NAME, is_remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalJob:
    """What every rank evaluates; picklable, since it travels to spawned ranks."""

    checkpoint: str
    split: Optional[str]  # None: the run's data.val_split
    tta: str
    scales: tuple[int, ...]  # empty: the TTA mode's default (evaluate.tta.tta_scales)
    data_root: Optional[str]  # replaces the stored data.root; None: the run's own data


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    split: Optional[str] = None,
    tta: str = "none",
    data: Optional[str] = None,
    scales: Optional[Sequence[int]] = None,
    nproc: int = 1,
) -> dict:
    """Evaluate a checkpoint (a run's newest valid one) on `split` of its run's data or of `data`, with
    `nproc` ranks on this machine, and save the record as RUN/eval/<name>.json, with the confusion matrix
    beside it as <name>.csv and <name>.png (see `eval_name`). RUN is the run directory that holds the
    checkpoint; a checkpoint outside one (copied out of its run) gets eval/ beside it.

    `data` is a shards root (a directory with manifest.json, a URL, or a pipe: command, which runs: the
    user gave it) or an ImageFolder tree: `data/<split>/<class>/<image>`, or class folders directly
    (`data/<class>/<image>`, all read, without a split: the record's split is None). Its class names must
    be among the checkpoint's: the labels are matched by name, so a test set may hold some of the classes,
    in any order. `split` defaults to the run's data.val_split, or val/ of an ImageFolder tree.

    Returns the record: checkpoint, step, data, split, tta, scales, samples, top1, top5, f1_macro,
    precision_macro, recall_macro, per_class (class, precision, recall, f1, support), files.
    """
    from slurmvision.trainer.distributed import DistEnv

    checkpoint = open_checkpoint(checkpoint_path)  # chosen once: every rank reads this one
    with _shards_of(data, split) as (root, read, whole):
        job = EvalJob(str(checkpoint.path), read, tta, tuple(scales or ()), root)
        results = _evaluate(DistEnv(), job) if nproc == 1 else run_ranks(_evaluate, nproc, job)
    given = None if data is None else data if is_remote(data) else str(Path(data).resolve())
    split = None if whole else results["split"]
    record = {
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "data": given or results["data_root"],
        "split": split,
        "tta": tta,
        "scales": results["scales"],
        **{
            key: results[key]
            for key in ("samples", "top1", "top5", "f1_macro", "precision_macro", "recall_macro", "per_class")
        },
    }
    folder = (run_of(checkpoint.path) or checkpoint.path.parent) / "eval"
    name = eval_name(checkpoint.step, split, tta, results["scales"], given)
    _save(folder, name, record, results["confusion"], results["confusion_image"])
    return record


def eval_name(step: int, split: Optional[str], tta: str, scales: Sequence[int], data: Optional[str] = None) -> str:
    """`[DATA-HASH-][SPLIT-]TTA[-SCALES]-stepN`: one file per checkpoint and way of evaluating it, so that only
    the same evaluation run again replaces one. DATA is the last part of a `data` the user gave, HASH the
    start of its sha256 (two test sets both called `test` stay apart); the run's own data has neither.
    No `step-` prefix: RUN/eval/step-*.json are the trainer's evaluations, which `status` reads."""
    sizes = [str(size) for size in scales] if tta.startswith("multiscale") else []
    parts = [*([split] if split else []), tta, *sizes, f"step{step}"]
    if data is not None:
        tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.rstrip("/")).name).strip("_.-")[:40] or "data"
        parts = [tail, hashlib.sha256(data.encode()).hexdigest()[:8], *parts]
    return "-".join(parts)


def _evaluate(env, job: EvalJob) -> dict:
    """One rank's part of `evaluate_checkpoint`: every rank returns the totals of all ranks."""
    from slurmvision.evaluate.model import load_model
    from slurmvision.evaluate.tta import check_scales, tta_scales
    from slurmvision.trainer import distributed
    from slurmvision.trainer.evaluation import evaluate

    device = distributed.init(env)
    try:
        model, config, checkpoint, num_classes = load_model(
            job.checkpoint, job.data_root, any_size=job.tta.startswith("multiscale")
        )
        scales = tta_scales(job.tta, job.scales, config.data)
        model.to(device)
        check_scales(model, scales, device)
        classes = checkpoint.meta.get("classes")
        if classes is None and job.data_root is not None and env.is_main:
            log.warning(
                "%s does not name its classes (saved by an older slurmvision): the data's classes are "
                "taken to be the model's, in the data's order",
                checkpoint.path,
            )
        results = evaluate(
            model, config, env, device, num_classes, split=job.split, tta=job.tta, scales=scales, classes=classes
        )
    finally:
        distributed.shutdown()
    return {**results, "scales": scales, "data_root": config.data.root}


@contextlib.contextmanager
def _shards_of(data: Optional[str], split: Optional[str]) -> Iterator[tuple[Optional[str], Optional[str], bool]]:
    """(shards root, split to read, whether that is a whole folder of class folders). The root is None (the
    stored one), `data` when it is a shards root, or shards built from an ImageFolder tree in a temporary
    directory ($TMPDIR), removed afterwards. Building shards (the images' own bytes, not re-encoded) lets a
    user's test set go through the reader the run's own data goes through: the same decoding, eval
    transform and split of the samples over the ranks, at the cost of one copy of the images."""
    if data is None or is_remote(data) or (Path(data) / MANIFEST_NAME).is_file():
        yield data, split, False
        return
    from slurmvision.shards.writer import DEFAULT_SPLITS, build_shards

    src = Path(data)
    if not src.is_dir():
        raise DataError(
            f"--data {data}: no such directory; give a shards directory (with {MANIFEST_NAME}), "
            f"a URL or pipe: command, or an ImageFolder tree"
        )
    splits = sorted(name for name in {*DEFAULT_SPLITS, *([split] if split else [])} if (src / name).is_dir())
    whole = not splits
    if whole and split:
        raise DataError(f"{src} has no {split}/ folder: leave out --split to evaluate on all its class folders")
    read = "all" if whole else split or "val"
    if read not in splits and not whole:
        raise DataError(f"{src} has the split folders {', '.join(splits)} but no {read}/: choose one with --split")
    with tempfile.TemporaryDirectory(prefix="slurmvision-eval-") as tmp:
        if whole:  # the class folders become the one split of the shards
            (Path(tmp) / "images").mkdir()
            os.symlink(src.resolve(), Path(tmp) / "images" / read)
            src = Path(tmp) / "images"
        log.info("reading the ImageFolder tree %s through temporary shards in %s", data, tmp)
        build_shards(src, Path(tmp) / "shards", splits=[read], workers=os.cpu_count() or 1, progress=False)
        yield str(Path(tmp) / "shards"), read, whole


def _save(folder: Path, name: str, record: dict, confusion: list[list[int]], image) -> None:
    """<name>.csv and .png, then <name>.json (it names the other two), each written whole then renamed."""
    from PIL import Image

    from slurmvision.evaluate.metrics import confusion_csv

    paths = {ext: folder / f"{name}.{ext}" for ext in ("csv", "png", "json")}
    record["files"] = {ext: str(path) for ext, path in paths.items()}
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    contents = {
        "csv": confusion_csv(confusion, [entry["class"] for entry in record["per_class"]]).encode(),
        "png": png.getvalue(),
        "json": json.dumps(record, indent=1, ensure_ascii=False).encode(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for ext, path in paths.items():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(contents[ext])
            os.replace(tmp, path)
    except OSError as err:
        raise RunError(
            f"cannot write the evaluation to {folder}: {err.strerror or err}; copy the checkpoint "
            "directory somewhere you can write and evaluate the copy"
        ) from None
