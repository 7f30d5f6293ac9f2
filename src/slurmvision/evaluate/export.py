"""ONNX export of a trained model, checked against torch with onnxruntime."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from slurmvision.errors import SlurmVisionError


def export_onnx(model: torch.nn.Module, path: str | Path, *, img_size: int, in_chans: int = 3, opset: int = 18,
                check: bool = True, dynamic_batch: bool = True) -> dict:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError:
        raise SlurmVisionError("ONNX export needs onnx and onnxruntime: pip install onnx onnxscript onnxruntime") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    model = model.eval().float().cpu()
    example = torch.randn(2, in_chans, img_size, img_size)
    dynamic_axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # Tracing notes Python-level shape checks; the onnxruntime comparison below is the real check.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                          opset_version=opset, dynamic_axes=dynamic_axes, dynamo=False)
    os.replace(tmp, path)
    result = {"path": str(path), "opset": opset, "inputs": ["images"], "outputs": ["logits"], "max_abs_diff": None}
    if check:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in ([2, 3] if dynamic_batch else [2]):
            images = torch.randn(batch, in_chans, img_size, img_size)
            with torch.inference_mode():
                expected = model(images).numpy()
            got = session.run(["logits"], {"images": images.numpy()})[0]
            worst = max(worst, float(np.abs(got - expected).max()))
        if worst > 1e-3 * max(1.0, float(np.abs(expected).max())):
            raise SlurmVisionError(f"the ONNX model differs from torch by {worst:.2e}: export with another --opset")
        result["max_abs_diff"] = worst
    return result
