"""What an evaluation during training leaves behind: its metrics in the monitor and in eval/step-N.json,
a log line, and Grad-CAM pictures of the same val images each time."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from slurmvision.configs import Config
from slurmvision.errors import SlurmVisionError
from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.monitor import Monitor

log = logging.getLogger("slurmvision.trainer")


class EvalReport:
    def __init__(
        self,
        config: Config,
        env: DistEnv,
        device: torch.device,
        run_dir: Path,
        monitor: Monitor,
        classes: Sequence[str],
        normalize: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.config, self.env, self.device, self.run_dir, self.monitor = config, env, device, run_dir, monitor
        self.classes, self.normalize = classes, normalize
        self._gradcam_images: Optional[torch.Tensor] = None  # the val images of trainer.gradcam_images, read once

    def __call__(self, step: int, results: dict, model: torch.nn.Module) -> None:
        """Every rank calls it with the `results` of `model` at `step`; their confusion image goes to the monitor."""
        image = results.pop("confusion_image", None)
        self.monitor.eval(step, results, image)
        if self.env.is_main and self.config.trainer.gradcam_images:
            self._log_gradcam(step, model)
        if self.env.is_main:
            out = self.run_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step-{step:08d}.json").write_text(json.dumps(results, indent=1))
            log.info(
                "eval at step %d: top-1 %.4f top-5 %.4f F1 %.4f",
                step,
                results["top1"],
                results["top5"],
                results["f1_macro"],
            )

    def _log_gradcam(self, step: int, model: torch.nn.Module) -> None:
        """Grad-CAM overlays of the same first val images at each evaluation, to watch what the model
        looks at as it trains. Without the optional grad-cam package: one warning, no pictures."""
        from slurmvision.evaluate.explain import gradcam_pictures, require_gradcam
        from slurmvision.shards.reader import eval_batches

        if self._gradcam_images is None:
            try:
                require_gradcam()
            except SlurmVisionError as err:
                log.warning("%s; set trainer.gradcam_images=0 to silence this", err)
                self._gradcam_images = torch.empty(0)
                return
            batches = eval_batches(self.config.data, self.config.data.val_split, rank=0, world_size=1)
            try:
                self._gradcam_images = next(batches).images[: self.config.trainer.gradcam_images]
            finally:
                batches.close()
        if not len(self._gradcam_images):
            return
        pictures = gradcam_pictures(model, self._gradcam_images.to(self.device), self.classes, self.normalize)
        self.monitor.pictures(step, "gradcam", pictures)
