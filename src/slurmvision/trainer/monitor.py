"""What a run shows: rank-prefixed logs, a progress line and TensorBoard events (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from slurmvision.configs.compare import flatten
from slurmvision.trainer.distributed import DistEnv

EVAL_METRICS = ("top1", "top5", "f1_macro")
log = logging.getLogger("slurmvision.trainer")


def setup_logging(env: DistEnv, log_file: Optional[Path] = None) -> None:
    fmt = f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


class DataWait:
    """The share of step time a rank waits for its next batches, per log interval. Over `threshold`,
    one warning says what to change: where the loader workers and the compute threads want more
    cores than the rank has, that they do; otherwise that the loader does not keep up. The first
    interval is not judged: it holds the loader's start (workers forked, first shards opened)."""

    def __init__(self, workers: int, device: torch.device, world_size: int, threshold: float = 0.2):
        self.workers, self.device, self.threshold = workers, device, threshold
        # The rank's cores as distributed.init counts them when it sets the compute threads.
        self.cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, (os.cpu_count() or 1) // world_size)
        self.waited = self.took = 0.0
        self.intervals = 0
        self.warned = False

    def add(self, waited: float, took: float) -> None:
        self.waited += waited
        self.took += took

    def share(self) -> float:
        """The share since the last call."""
        share = self.waited / self.took if self.took else 0.0
        self.waited = self.took = 0.0
        self.intervals += 1
        if share > self.threshold and not self.warned and self.intervals > 1:
            self.warned = True
            log.warning("waiting for data %.0f%% of the step time: %s", 100 * share, self.advice())
        return share

    def advice(self) -> str:
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and self.workers and threads + self.workers > self.cores:
            return (
                f"data.workers={self.workers} loader worker(s) and {threads} compute threads share the "
                f"{self.cores} core(s) of this rank: set data.workers=0 to decode between steps, or give "
                "each rank more cores (cluster.cpus_per_task) than it has compute threads"
            )
        return (
            f"the loader does not keep up: raise data.workers (now {self.workers}) where the rank has "
            f"cores to spare ({self.cores} for {threads} compute threads), or check the shards' storage"
        )


class Monitor:
    """TensorBoard writer continued across resumes (`purge_step`), plus a progress line."""

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        start_step: int,
        max_steps: int,
        hparams: dict,
        share_with_group: bool = False,
    ):
        self.env, self.max_steps = env, max_steps
        self.run_dir, self.share_with_group = run_dir, share_with_group
        self.hparams = hparams
        self.writer = None
        # The pace for the ETA, from the attempt's first progress line on: the steps before it hold
        # the start-up, the loader's warm-up and torch.compile (a minute or more on a GPU).
        self.pace_from: Optional[tuple[int, float]] = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # A previous attempt may have logged steps past the checkpoint we resume from: TensorBoard
            # hides its events from purge_step on. Step start_step itself is in the checkpoint: kept.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            if start_step == 0:
                self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```", 0)
            self._share()

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def progress(self, step: int, loss: float, images_per_s: float, data_wait: Optional[float] = None) -> None:
        if not self.env.is_main:
            return
        now = time.monotonic()
        if self.pace_from is None:
            self.pace_from = (step, now)
        since_step, since = self.pace_from
        if step > since_step:
            eta = (now - since) / (step - since_step) * (self.max_steps - step)
            eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s"
        else:
            eta_text = "0m00s" if step >= self.max_steps else "from the next line on"
        logging.getLogger("slurmvision.progress").info(
            "step %d/%d  loss %.4f  %.0f img/s%s  ETA %s",
            step,
            self.max_steps,
            loss,
            images_per_s,
            "" if data_wait is None else f"  data wait {data_wait:.0%}",
            eta_text,
        )

    def eval(self, step: int, results: dict, image=None) -> None:
        if self.writer is None:
            return
        for key in EVAL_METRICS:
            self.writer.add_scalar(f"eval/{key}", results[key], step)
        for entry in results["per_class"]:
            self.writer.add_scalar(f"eval/f1/{entry['class']}", entry["f1"], step)
        if image is not None:
            self.writer.add_image("eval/confusion", image, step, dataformats="HWC")

    def pictures(self, step: int, name: str, pictures: list) -> None:
        if self.writer is None:
            return
        for i, picture in enumerate(pictures):
            self.writer.add_image(f"{name}/{i}", picture, step, dataformats="HWC")

    def final(self, step: int, results: dict) -> None:
        """The config as hyperparameters of this run, with its final eval `results` (logged by `eval` at
        `step` too), for TensorBoard's HPARAMS tab to set runs side by side: the tab shows the last value of
        each eval/ scalar the metrics name. Config values that are lists or tables go in as JSON text;
        torch's `hparams` writes booleans as 1 or 0 and leaves unset ones (None) out."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {
            key: value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flatten(self.hparams).items()
        }
        metrics = {f"eval/{key}": results[key] for key in EVAL_METRICS if key in results}  # none: not evaluated
        for summary in hparams(values, metrics):
            self.writer.file_writer.add_summary(summary, step)

    def memory(self, device: torch.device) -> Optional[float]:
        if device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(device) / 2**30

    def _share(self) -> None:
        """With run.share_with_group, the group may read the events: it may pass through the run
        directory (not list or write it) and read tb/; nothing becomes group-writable."""
        if not self.share_with_group:
            return
        self.run_dir.chmod(self.run_dir.stat().st_mode | stat.S_IXGRP)
        for folder, _, files in os.walk(self.run_dir / "tb"):
            for path, bits in (
                (folder, stat.S_IRGRP | stat.S_IXGRP),
                *((os.path.join(folder, f), stat.S_IRGRP) for f in files),
            ):
                os.chmod(path, (os.stat(path).st_mode | bits) & ~(stat.S_IWGRP | stat.S_IWOTH))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self._share()  # files written since the start (hparams)
