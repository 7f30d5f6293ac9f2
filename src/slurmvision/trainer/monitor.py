"""What a run shows: rank-prefixed logs, a progress line and TensorBoard events (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from slurmvision.trainer.distributed import DistEnv


def setup_logging(env: DistEnv, log_file: Optional[Path] = None) -> None:
    fmt = f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


class Monitor:
    """TensorBoard writer continued across resumes (`purge_step`), plus a progress line."""

    def __init__(self, run_dir: Path, env: DistEnv, start_step: int, max_steps: int, hparams: dict):
        self.env, self.max_steps = env, max_steps
        self.writer = None
        self.started, self.start_step = time.monotonic(), start_step
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # A previous attempt may have logged steps past the checkpoint we resume from: TensorBoard
            # hides its events from purge_step on. Step start_step itself is in the checkpoint: kept.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            if start_step == 0:
                self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, Optional[float]]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def progress(self, step: int, loss: float, images_per_s: float) -> None:
        if not self.env.is_main:
            return
        done = step - self.start_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        logging.getLogger("slurmvision.progress").info(
            "step %d/%d  loss %.4f  %.0f img/s  ETA %dm%02ds", step, self.max_steps, loss, images_per_s, eta // 60, eta % 60)

    def eval(self, step: int, results: dict, image=None) -> None:
        if self.writer is None:
            return
        for key in ("top1", "top5", "f1_macro"):
            self.writer.add_scalar(f"eval/{key}", results[key], step)
        if image is not None:
            self.writer.add_image("eval/confusion", image, step, dataformats="HWC")

    def memory(self, device: torch.device) -> Optional[float]:
        if device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(device) / 2**30

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
