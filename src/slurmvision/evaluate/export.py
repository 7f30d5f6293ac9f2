"""ONNX export of a trained model, checked against torch with onnxruntime before it lands; INT8 quantization
through onnxruntime, written only when it keeps the model's top-1 on the val split."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from slurmvision.configs.data import DataConfig
from slurmvision.errors import DataError, SlurmVisionError

log = logging.getLogger(__name__)

INPUT, OUTPUT = "images", "logits"
# Batches stay small for onnxruntime on a CPU machine: calibrating Swin V2-T at 256 px in batches of 8 peaks at 3.5 GB.
CALIBRATION_SAMPLES, CALIBRATION_BATCH, VAL_BATCH = 128, 8, 32
LATENCY_BATCHES, LATENCY_RUNS = (1, 32), 5
# Only ops that carry weights are quantized: attention's activation-by-activation products, softmax and the norms
# stay in float, which is where transformers lose accuracy in INT8. Dynamic mode quantizes the linear layers, which
# hold nearly all the weights of Swin V2 and SG-Former; their few convolutions stay in float.
INT8_OPS = {"static": ["Conv", "MatMul", "Gemm"], "dynamic": ["MatMul", "Gemm"]}


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
    quantized = _export_int8(model, config.data, num_classes, Path(out), size, opset, int8, calibration, max_drop)
    return {**record, **quantized}


def _export_int8(
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
