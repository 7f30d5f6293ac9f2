"""`slurmvision export` of a run: float32 ONNX that matches torch for Swin V2 and SG-Former, INT8 written with
its report, refused when it loses top-1, and one clear line on user errors."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from slurmvision.cli import main
from slurmvision.evaluate import export, int8

from .conftest import FAMILIES, make_run

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("family,image_size", [("swinv2", None), ("swinv2", 48), ("sgformer", None)])
def test_float32_export_matches_torch_with_a_dynamic_batch(family, image_size, colour_shards, tmp_path, capsys):
    run = make_run(tmp_path / "run", colour_shards, family)
    options = ["--image-size", str(image_size)] if image_size else []
    assert main(["export", str(run), str(tmp_path / "m.onnx"), "--json", *options]) == 0
    record = json.loads(capsys.readouterr().out)
    side = image_size or FAMILIES[family][0]
    assert record["max_abs_diff"] < 1e-4  # onnxruntime against torch, batches of 2 and 3
    assert record["inputs"] == {"images": ["batch", 3, side, side]} and record["outputs"] == {"logits": ["batch", 3]}


def test_a_model_that_sorts_stably_exports(tmp_path):
    """SG-Former sorts its tokens keeping ties in order: an op that neither of torch's exporters has."""

    class Sorts(torch.nn.Module):
        def forward(self, images):
            values = images.flatten(1).round()  # many ties
            ascending = values.argsort(dim=1, stable=True)
            return torch.cat([ascending, values.sort(dim=1, descending=True, stable=True).indices], dim=1).float()

    assert export.export_onnx(Sorts(), tmp_path / "m.onnx", img_size=4)["max_abs_diff"] == 0


def _run_onnx(path, batch: int, side: int) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.zeros((batch, 3, side, side), np.float32)})[0]


@pytest.fixture
def swin_run(trained_run):
    return trained_run("swinv2")


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_is_written_with_top1_size_and_latency_of_both_models(mode, swin_run, colour_shards, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    calibration = ["--calibration", str(colour_shards)] if mode == "static" else []
    assert main(["export", str(swin_run), str(out), "--int8", mode, *calibration, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["int8"]
    fp32, quantized = report["models"]["fp32"], report["models"]["int8"]
    assert report["mode"] == mode and report["val_samples"] == 24
    assert fp32["top1"] >= 0.9 and report["drop"] <= 1.0
    assert report["drop"] == pytest.approx(100 * (fp32["top1"] - quantized["top1"]))
    assert quantized["size_mb"] == pytest.approx(out.stat().st_size / 2**20) and quantized["size_mb"] < fp32["size_mb"]
    assert all(set(m["latency_ms"]) == {"1", "32"} and min(m["latency_ms"].values()) > 0 for m in (fp32, quantized))
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger"} if mode == "dynamic" else "QuantizeLinear" in ops
    assert _run_onnx(out, 5, 32).shape == (5, 3)  # the batch axis stays dynamic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing staged is left

    assert main(["export", str(swin_run), str(tmp_path / "t.onnx"), "--int8"]) == 0  # bare --int8: dynamic
    text = capsys.readouterr().out.splitlines()
    assert "INT8 (dynamic)" in text[0] and "ms/batch 32" in text[1]
    assert text[2].startswith("fp32") and text[3].startswith("int8")


def _constant_quantizer(fp32, out, mode, calibration=None):
    """Stands for a quantization that ruins the model: its logits are all zero, so it predicts class 0."""
    model = onnx.load(str(fp32))
    last = next(node for node in model.graph.node if "logits" in node.output)
    last.output[list(last.output).index("logits")] = "raw"
    model.graph.node.append(onnx.helper.make_node("Sub", ["raw", "raw"], ["logits"]))
    onnx.save(model, str(out))


def test_an_int8_model_that_loses_top1_is_refused(swin_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(int8, "quantize_onnx", _constant_quantizer)
    out = tmp_path / "m.onnx"
    assert main(["export", str(swin_run), str(out), "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "points below the float32 model's" in err and "not written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # a larger --max-drop lets the user take it anyway
    assert main(["export", str(swin_run), str(out), "--int8", "--max-drop", "100"]) == 0 and out.exists()


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--calibration", "shards"], "add --int8 static"),
        (["--int8", "dynamic", "--calibration", "shards"], "add --int8 static"),
    ],
)
def test_user_errors_take_one_line(arguments, message, swin_run, tmp_path, capsys):
    assert main(["export", str(swin_run), str(tmp_path / "m.onnx"), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_an_unknown_run_takes_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "no-run"), str(tmp_path / "m.onnx"), "--int8"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-run" in err
