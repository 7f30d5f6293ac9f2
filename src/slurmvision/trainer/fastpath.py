"""The GPU fast path both engines share: TF32 and cuDNN autotuning (`trainer.tf32`,
`trainer.cudnn_benchmark`) and `model.compile` with multi-scale shapes, a compile cache that
outlives the job, and a fallback.

The other keys live where they act: the optimizer implementation (`optim.fused`) in
trainer.optim, gradient bucket views (`trainer.gradient_as_bucket_view`) in trainer.ddp,
batches copied one step ahead (`data.prefetch_to_device`) in trainer.prefetch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from slurmvision.configs.schema import Config

log = logging.getLogger("slurmvision.trainer")


def set_backend_flags(config: Config, device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN's search for the fastest convolution per shape, on CUDA.

    TF32 keeps fp32's range with a 10-bit mantissa in matmuls outside autocast (Ampere and newer); under
    bf16/fp16 autocast it touches only the ops autocast leaves in fp32. cuDNN benchmarking times each new
    input shape once (a few per multi-scale run) and may pick a different algorithm per run, so GPU
    results are then not bit-reproducible across runs. On the CPU neither flag does anything.
    """
    if device.type != "cuda":
        return
    trainer = config.trainer
    torch.backends.cuda.matmul.allow_tf32 = trainer.tf32
    torch.backends.cudnn.allow_tf32 = trainer.tf32
    torch.backends.cudnn.benchmark = trainer.cudnn_benchmark


def compile_options(config: Config) -> dict[str, Any]:
    """torch.compile's options for the run's input shapes: one static graph per shape.

    Multi-scale training feeds a few shapes (one per scale and its batch size, plus the odd short
    batch after skipped samples). Static graphs per shape keep the fastest kernels; the recompile
    limit (8 by default, after which dynamo runs new shapes eagerly) is raised to hold them.
    """
    import torch._dynamo.config as dynamo_config

    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    shapes = 4 * len(config.data.resolutions)  # each scale's full batch, and room for short ones
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), shapes))
    return {"dynamic": False}


COMPILE_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def use_run_compile_cache(run_dir: Path) -> None:
    """torch.compile's on-disk caches (inductor's graphs, AOTAutograd's, the Triton kernels) in the run
    directory, unless the job's environment names another folder than torch's default
    (TORCHINDUCTOR_CACHE_DIR; importing inductor already sets it to the default). Set for the rank's
    whole process (torch reads the variable at each use), before its first compile.

    By default they live in the node's /tmp: a job requeued on another node compiled everything again
    (77 s for Swin V2 Tiny on an H200; with the cache a few seconds). The run directory is shared by
    the run's nodes and attempts. Inductor locks its cache with flock, which some shared filesystems
    refuse (Lustre mounted without `flock`): there the node's /tmp stays the cache, and the log says so.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(COMPILE_CACHE)
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return
    folder = run_dir / "cache" / "compile"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock-probe", "w") as probe:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(probe, fcntl.LOCK_UN)
    except OSError as err:
        log.warning(
            "model.compile: the run directory cannot hold the compile cache (%s: %s); each node compiles "
            "again after a restart. Set TORCHINDUCTOR_CACHE_DIR to a shared folder that allows flock",
            type(err).__name__,
            err,
        )
        return
    os.environ[COMPILE_CACHE] = str(folder)


def fallback_message(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    return (
        f"model.compile: torch.compile failed ({type(err).__name__}: {first_line}); training goes on "
        "without compilation (eager, slower). Set model.compile=false to silence this"
    )


class CompiledForward:
    """The forward pass of a compiled model, and the eager one from the first failure to compile on.

    torch.compile compiles lazily, at the first call with each new input shape: that is where a
    missing compiler, an unsupported Python or an operation dynamo cannot trace shows. Such a call
    is run again eagerly, the warning says why, and the run stays eager. An error the eager forward
    raises too is the model's, not the compiler's: it propagates, without the warning. Calls with
    a shape compiled before are not guarded.
    """

    def __init__(self, compiled: Optional[Callable], eager: Callable):
        self.compiled, self.eager = compiled, eager
        self.shapes: set[tuple] = set()

    def __call__(self, images: torch.Tensor, *args, **kwargs):
        if self.compiled is None:
            return self.eager(images, *args, **kwargs)
        shape = (tuple(images.shape), images.dtype, torch.is_grad_enabled())
        if shape in self.shapes:
            return self.compiled(images, *args, **kwargs)
        started, reused = time.monotonic(), _cache_hits()
        try:
            out = self.compiled(images, *args, **kwargs)
        except Exception as err:
            out = self.eager(images, *args, **kwargs)
            log.warning("%s", fallback_message(err))
            self.compiled = None
            return out
        self.shapes.add(shape)
        # The first step of each shape takes the compile: said, so that it does not look like a hang.
        log.info(
            "model.compile: the forward for input %s compiled in %.1fs (%d graph(s) from the compile cache)",
            "x".join(map(str, shape[0])),
            time.monotonic() - started,
            _cache_hits() - reused,
        )
        return out


def _cache_hits() -> int:
    """Compiled graphs inductor took from its on-disk cache in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def compile_model(model: torch.nn.Module, config: Config) -> CompiledForward:
    """`model` compiled for the run's shapes, with the fallback above; torch.compile raising at once
    (a torch build without dynamo support) falls back the same way."""
    try:
        compiled = torch.compile(model, **compile_options(config))
    except Exception as err:
        log.warning("%s", fallback_message(err))
        compiled = None
    return CompiledForward(compiled, model)
