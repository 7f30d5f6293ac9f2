"""ONNX export of a trained model, checked against torch with onnxruntime before it lands (`export_run`; its INT8
path is in evaluate.int8)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from slurmvision.errors import SlurmVisionError

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "logits"


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    img_size: int,
    in_chans: int = 3,
    opset: int = 18,
    check: bool = True,
    dynamic_batch: bool = True,
) -> dict:
    """Write `model` (in eval mode, float32, on the CPU) as ONNX to `path`, atomically.

    The TorchScript exporter goes first: it handles timm's Swin V2 models and is several times
    faster than the torch.export one, which is the fallback for models it cannot trace. With
    `check`, onnxruntime runs a random batch of 2 (and of 3 with a dynamic batch) and its logits
    must match torch's; a model that does not match never replaces the file at `path`.

    Returns {"path", "opset", "exporter", "max_abs_diff" (None without check), "inputs",
    "outputs"}, where inputs and outputs map each name to its shape ("batch" when dynamic).
    """
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise SlurmVisionError(
            "ONNX export needs onnx and onnxruntime: pip install onnx onnxscript onnxruntime"
        ) from None
    path = Path(path)
    # The exporters may write weights next to the graph (ONNX external data, named after the graph file),
    # so the whole export goes into a hidden folder and the graph file is moved into place last.
    staging = path.parent / f".{path.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tmp = staging / path.name
    model = copy.deepcopy(model).eval().float().cpu()  # the caller's model keeps its mode and device
    generator = torch.Generator().manual_seed(0)  # leave the global RNG of the caller alone
    example = torch.randn(2, in_chans, img_size, img_size, generator=generator)
    try:
        exporter = _export(model, example, tmp, opset, dynamic_batch)
        graph = onnx.load(str(tmp), load_external_data=False).graph
        result = {
            "path": str(path),
            "opset": opset,
            "exporter": exporter,
            "max_abs_diff": None,
            "inputs": {value.name: _shape(value) for value in graph.input},
            "outputs": {value.name: _shape(value) for value in graph.output},
        }
        if check:
            onnx.checker.check_model(str(tmp))
            result["max_abs_diff"] = _compare(
                model, tmp, onnxruntime, example.shape[1:], [2, 3] if dynamic_batch else [2], generator
            )
        for extra in staging.iterdir():
            if extra != tmp:
                os.replace(extra, path.parent / extra.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _register_stable_sort() -> None:
    """Teach the TorchScript exporter the stable overloads of sort and argsort, which both of torch's exporters
    refuse (SG-Former sorts its tokens stably). ONNX's TopK puts equal values in index order, as a stable sort
    does, so the ordinary symbolic serves once the `stable` flag is dropped from the arguments."""
    from torch.onnx import symbolic_opset11

    for name in ("sort", "argsort"):
        plain = getattr(symbolic_opset11, name)  # (g, self, dim, descending); .stable has (g, self, stable, dim, ...)
        torch.onnx.register_custom_op_symbolic(f"aten::{name}", lambda g, x, *args, f=plain: f(g, x, *args[-2:]), 11)


def _export(model: torch.nn.Module, example: torch.Tensor, out: Path, opset: int, dynamic_batch: bool) -> str:
    names = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset}
    _register_stable_sort()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (see export_onnx); tracing notes Python-level
            # shape checks, and the onnxruntime comparison is the real check of the result.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (example,), str(out), dynamic_axes=axes, dynamo=False, **names)
        return "torchscript"
    except Exception as error:  # noqa: BLE001  (any failure of the first exporter is a reason to try the other)
        first = f"{type(error).__name__}: {error}".splitlines()[0]
        log.warning("the TorchScript ONNX exporter failed (%s); trying the torch.export one", first)
        for partial in out.parent.iterdir():  # what it wrote before failing must not ship with the other's output
            partial.unlink()
    try:
        import onnxscript  # noqa: F401  (the torch.export exporter writes its graph with it)
    except ImportError:
        raise SlurmVisionError(
            f"the TorchScript ONNX exporter failed ({first}) and the other one needs onnxscript: pip install onnxscript"
        ) from None
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        # One self-contained file unless the weights pass protobuf's 2 GB limit.
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
            external_data=size > 1.8e9,
            **names,
        )
    except Exception as error:  # noqa: BLE001
        second = f"{type(error).__name__}: {error}".splitlines()[0]
        raise SlurmVisionError(
            f"neither ONNX exporter handles this model at opset {opset} ({first}; {second}): try another --opset"
        ) from error
    return "dynamo"


def _compare(
    model: torch.nn.Module,
    onnx_path: Path,
    onnxruntime,
    image_shape: torch.Size,
    batches: list[int],
    generator: torch.Generator,
) -> float:
    """The largest |onnx - torch| over random batches; raises if it is beyond float32 noise."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failure is raised below as one line; onnxruntime would log it as well
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst, scale = 0.0, 1.0
    for batch in batches:
        images = torch.randn(batch, *image_shape, generator=generator)
        with torch.inference_mode():
            expected = model(images).numpy()
        try:
            got = session.run([OUTPUT], {INPUT: images.numpy()})[0]
        except Exception as error:  # noqa: BLE001  (onnxruntime's own error types)
            raise SlurmVisionError(
                f"onnxruntime fails on the exported model with a batch of {batch}: {str(error).splitlines()[0]}"
            ) from error
        if got.shape != expected.shape:
            raise SlurmVisionError(
                f"the ONNX model gives shape {got.shape} for a batch of {batch}, torch "
                f"{expected.shape}: export with dynamic_batch=False or another --opset"
            )
        worst, scale = max(worst, float(np.abs(got - expected).max())), max(scale, float(np.abs(expected).max()))
    if not worst <= 1e-3 * scale:  # also catches NaN
        raise SlurmVisionError(
            f"the ONNX model differs from torch by up to {worst:.2e} (outputs up to {scale:.2e}): "
            "export with another --opset"
        )
    return worst


def _shape(value) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def set_image_size(model: torch.nn.Module, size: int) -> None:
    """Make `model` take `size` x `size` images. Swin V2 builds its attention windows and relative positions for one
    input size, and timm's `set_input_size` rebuilds them (windows scaled with the patch grid, as timm does for
    fine-tuning at another size); models without it (SG-Former takes any multiple of 32) are left as they are."""
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(size, size))


def export_run(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    opset: int = 18,
    data_root: Optional[str] = None,
    image_size: Optional[int] = None,
    int8: Optional[str] = None,
    calibration: Optional[str] = None,
    max_drop: float = 1.0,
) -> dict:
    """`slurmvision export`: the checkpoint's model as float32 ONNX at `out` (export_onnx's record), or with `int8`
    ("dynamic" or "static") as an INT8 model, written only if its top-1 on the run's val split is at most
    `max_drop` points below the float32 model's.

    Dynamic quantization stores INT8 weights and scales activations per batch as they come; static fixes
    activation ranges beforehand from the first CALIBRATION_SAMPLES images of the train split of `calibration`
    (a shards directory; default the run's own data), not of the val split, which then judges the result.
    Dynamic is what the CLI's bare --int8 means: it needs no data, and on a busy 2-core CPU with onnxruntime 1.32
    it was the faster: Swin V2-T at 256 px ran batch 1 in 710 ms against static's 790 (float32: 1080), SG-Former-S
    at 224 px batch 32 in 17.3 s against 21.4 (float32: 22.8). Static writes the smaller file (SG-Former-S: 24 MB
    against 34; float32: 86).
    The INT8 record adds "int8": {"mode", "calibration", "max_drop", "drop", "val_samples", "models"}, where
    models maps "fp32" and "int8" to {"top1", "size_mb", "latency_ms": {batch: median ms}}.
    """
    from slurmvision.evaluate.model import load_model

    if calibration and int8 != "static":
        raise SlurmVisionError("--calibration gives the data of static INT8 quantization: add --int8 static")
    model, config, checkpoint, num_classes = load_model(checkpoint_path, data_root)
    size = image_size or config.data.img_size
    if image_size:
        set_image_size(model, size)
    record = {"checkpoint": str(checkpoint.path), "image_size": size}
    if not int8:
        return {**export_onnx(model, out, img_size=size, opset=opset), **record}
    from slurmvision.evaluate.int8 import export_int8

    quantized = export_int8(model, config.data, num_classes, Path(out), size, opset, int8, calibration, max_drop)
    return {**record, **quantized}
