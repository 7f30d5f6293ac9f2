"""Metrics against hand-computed values, the confusion image, TTA, ONNX export."""

import pytest
import torch

from slurmvision.evaluate.metrics import ClassificationMetrics, confusion_image
from slurmvision.evaluate.tta import predict

pytestmark = pytest.mark.unit


def one_hot_logits(predicted, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float()


def test_metrics_by_hand():
    metrics = ClassificationMetrics(3)
    # true: 0 0 1 1 2 2 ; predicted: 0 1 1 1 2 0
    metrics.update(one_hot_logits([0, 1, 1, 1, 2, 0], 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    result = metrics.compute()
    assert result["top1"] == pytest.approx(4 / 6)
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per class F1: c0 p=1/2 r=1/2 -> .5 ; c1 p=2/3 r=1 -> .8 ; c2 p=1 r=1/2 -> 2/3
    assert result["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert result["top5"] == 1.0 and result["samples"] == 6


def test_top5_and_absent_classes():
    metrics = ClassificationMetrics(10)
    logits = torch.arange(10).float().repeat(2, 1)  # ranks 9,8,7,6,5 on top
    metrics.update(logits, torch.tensor([5, 0]))
    result = metrics.compute()
    assert result["top1"] == 0.0 and result["top5"] == 0.5
    assert result["f1_macro"] == 0.0  # only classes 0, 5 and 9 appear; none right


def test_confusion_image():
    image = confusion_image([[3, 1], [0, 4]], ["a", "a very long class name"])
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3


def test_hflip_tta_on_a_flip_invariant_model():
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    images = torch.randn(5, 3, 8, 8)
    assert torch.equal(predict(model, images, "hflip").argmax(1), predict(model, images).argmax(1))
    with pytest.raises(ValueError, match="hflip"):
        predict(model, images, "vflip")


def test_onnx_export_matches_torch(tmp_path):
    import timm

    from slurmvision.evaluate.export import export_onnx

    model = timm.create_model("swinv2_tiny_window8_256", num_classes=4, img_size=16, patch_size=2, window_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2))
    result = export_onnx(model, tmp_path / "m.onnx", img_size=16)
    assert (tmp_path / "m.onnx").is_file() and result["max_abs_diff"] < 1e-3
