"""INT8 quantization of an exported model through onnxruntime, written only when it keeps the model's top-1 on the
val split (`slurmvision export --int8`)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from slurmvision.configs.data import DataConfig
from slurmvision.errors import DataError, SlurmVisionError
from slurmvision.evaluate.export import INPUT, OUTPUT, export_onnx

# Batches stay small for onnxruntime on a CPU machine: calibrating Swin V2-T at 256 px in batches of 8 peaks at 3.5 GB.
CALIBRATION_SAMPLES, CALIBRATION_BATCH, VAL_BATCH = 128, 8, 32
LATENCY_BATCHES, LATENCY_RUNS = (1, 32), 5
# Only ops that carry weights are quantized: attention's activation-by-activation products, softmax and the norms
# stay in float, which is where transformers lose accuracy in INT8. Dynamic mode quantizes the linear layers, which
# hold nearly all the weights of Swin V2 and SG-Former; their few convolutions stay in float.
INT8_OPS = {"static": ["Conv", "MatMul", "Gemm"], "dynamic": ["MatMul", "Gemm"]}


def export_int8(
    model: torch.nn.Module,
    data: DataConfig,
    num_classes: int,
    out: Path,
    size: int,
    opset: int,
    mode: str,
    calibration: Optional[str],
    max_drop: float,
) -> dict:
    """export_run's INT8 model and its record (export_onnx's, with "path" `out`, and "int8"). The float32 export and
    its quantization stay in a hidden folder next to `out`; the INT8 file moves to `out` only once its top-1 on the
    val split is close enough."""
    from slurmvision.shards.transforms import DeviceAugment

    normalize = DeviceAugment(data, num_classes, torch.device("cpu"), seed=0, rank=0).normalize
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        fp32, quantized = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        record = {**export_onnx(model, fp32, img_size=size, opset=opset), "path": str(out)}
        calibration_data = ()
        if mode == "static":
            # The shard writer mixes the classes in every shard, so the first images of a split are a fair sample.
            train = dataclasses.replace(data, root=calibration or data.root)
            batches = itertools.islice(
                _batches(train, train.train_split, size, normalize, CALIBRATION_BATCH),
                CALIBRATION_SAMPLES // CALIBRATION_BATCH,
            )
            calibration_data = (images for images, _ in batches)
        quantize_onnx(fp32, quantized, mode, calibration_data)
        val = _batches(data, data.val_split, size, normalize, VAL_BATCH)
        models, samples = compare_onnx({"fp32": fp32, "int8": quantized}, val, size)
        drop = 100 * (models["fp32"]["top1"] - models["int8"]["top1"])
        record["int8"] = {
            "mode": mode,
            "calibration": (calibration or data.root) if mode == "static" else None,
            "max_drop": max_drop,
            "drop": drop,
            "val_samples": samples,
            "models": models,
        }
        if drop > max_drop:
            raise SlurmVisionError(
                f"the INT8 model's top-1 {models['int8']['top1']:.4f} is {drop:.2f} points below the float32 model's "
                f"{models['fp32']['top1']:.4f} on {samples} {data.val_split} images (--max-drop {max_drop:g}): "
                f"{out} not written; try --int8 {'dynamic' if mode == 'static' else 'static'} or a larger --max-drop"
            )
        os.replace(quantized, out)
    return record


def _batches(
    data: DataConfig, split: str, size: int, normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(normalised images, targets) of a split, read and preprocessed as evaluation reads them."""
    from slurmvision.shards.reader import eval_batches

    for batch in eval_batches(
        dataclasses.replace(data, batch_size=batch_size), split, rank=0, world_size=1, resolution=size
    ):
        if len(batch.keys):  # a batch whose samples were all bad
            yield normalize(batch.images).numpy(), batch.targets.numpy()


def quantize_onnx(fp32: Path, out: Path, mode: str, calibration: Iterable[np.ndarray] = ()) -> None:
    """INT8 weights (per channel) of INT8_OPS[mode]; static mode also fixes activation ranges (QDQ format) from
    `calibration`, batches of normalised images."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(f"{out.stem}.prepared.onnx")
    # The shape inference and graph optimisation onnxruntime advises before quantizing; its symbolic shape
    # inference cannot follow Swin V2's window reshapes, ONNX's own can.
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    # 7-bit weights: on CPUs without VNNI (AVX2 only), products of uint8 activations and int8 weights can saturate.
    common = {
        "per_channel": True,
        "reduce_range": True,
        "weight_type": QuantType.QInt8,
        "op_types_to_quantize": INT8_OPS[mode],
    }
    if mode == "dynamic":
        quantize_dynamic(prepared, out, **common)
    else:
        # MatMulConstBOnly: MatMuls of two activations (attention) stay in float.
        quantize_static(
            prepared,
            out,
            _Feed(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            extra_options={"MatMulConstBOnly": True},
            **common,
        )
    prepared.unlink()


class _Feed:
    """onnxruntime's CalibrationDataReader protocol over batches of images."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self.batches = iter(batches)
        self.samples = 0

    def get_next(self) -> Optional[dict]:
        images = next(self.batches, None)
        if images is None:
            if not self.samples:
                raise DataError("no images to calibrate static INT8 quantization with: the split is empty")
            return None
        self.samples += len(images)
        return {INPUT: images}


def compare_onnx(
    paths: dict[str, Path], batches: Iterable[tuple[np.ndarray, np.ndarray]], image_size: int
) -> tuple[dict, int]:
    """({name: {"top1", "size_mb", "latency_ms": {batch: median ms}}}, samples) for ONNX models run by onnxruntime
    on this machine's CPU over the same (images, targets) batches."""
    import onnxruntime

    sessions = {
        name: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in paths.items()
    }
    correct, samples = dict.fromkeys(sessions, 0), 0
    for images, targets in batches:
        for name, session in sessions.items():
            correct[name] += int((session.run([OUTPUT], {INPUT: images})[0].argmax(1) == targets).sum())
        samples += len(targets)
    if not samples:
        raise DataError("no val images to compare the models on: the val split is empty")
    return {
        name: {
            "top1": correct[name] / samples,
            "size_mb": os.path.getsize(paths[name]) / 2**20,
            "latency_ms": {batch: _latency_ms(session, batch, image_size) for batch in LATENCY_BATCHES},
        }
        for name, session in sessions.items()
    }, samples


def _latency_ms(session, batch: int, image_size: int) -> float:
    """Median wall time of LATENCY_RUNS runs on one batch, after a warm-up run."""
    images = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    times = []
    for _ in range(LATENCY_RUNS + 1):
        start = time.perf_counter()
        session.run([OUTPUT], {INPUT: images})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])
