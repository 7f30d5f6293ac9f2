"""Metrics against hand-computed values, the confusion image, TTA, ONNX export."""

import sys

import numpy as np
import pytest
import torch

from slurmvision.errors import DataError, SlurmVisionError
from slurmvision.evaluate.metrics import ClassificationMetrics, confusion_image
from slurmvision.evaluate.tta import predict

pytestmark = pytest.mark.unit


def one_hot_logits(predicted, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float()


def metrics_of(predicted, targets, num_classes):
    metrics = ClassificationMetrics(num_classes)
    metrics.update(one_hot_logits(predicted, num_classes), torch.tensor(targets))
    return metrics.compute()


def test_perfect_predictions():
    result = metrics_of([0, 1, 2, 2], [0, 1, 2, 2], 3)
    assert result["top1"] == result["top5"] == result["f1_macro"] == 1.0
    assert result["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    assert [c["support"] for c in result["per_class"]] == [1, 1, 2]


def test_all_wrong_predictions():
    result = metrics_of([1, 2, 0, 0], [0, 1, 2, 2], 3)
    assert result["top1"] == 0.0 and result["f1_macro"] == 0.0 and result["samples"] == 4
    assert all(c["precision"] == c["recall"] == c["f1"] == 0.0 for c in result["per_class"])
    assert result["top5"] == 1.0  # with 3 classes, top-5 means top-3: always a hit


def test_mixed_predictions_by_hand():
    # true: 0 0 1 1 2 2 ; predicted: 0 1 1 1 2 0
    result = metrics_of([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2], 3)
    assert result["top1"] == pytest.approx(4 / 6)
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per class: c0 p=1/2 r=1/2 f1=1/2 ; c1 p=2/3 r=1 f1=4/5 ; c2 p=1 r=1/2 f1=2/3
    assert [c["precision"] for c in result["per_class"]] == pytest.approx([1 / 2, 2 / 3, 1])
    assert [c["recall"] for c in result["per_class"]] == pytest.approx([1 / 2, 1, 1 / 2])
    assert result["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_batches_add_up_to_the_whole():
    logits, targets = torch.randn(13, 6), torch.randint(0, 6, (13,))
    whole, parts = ClassificationMetrics(6), ClassificationMetrics(6)
    whole.update(logits, targets)
    for chunk in (slice(0, 5), slice(5, 5), slice(5, 13)):  # an empty batch included
        parts.update(logits[chunk], targets[chunk])
    assert parts.compute() == whole.compute()


def test_top5_and_absent_classes():
    metrics = ClassificationMetrics(10)
    metrics.update(torch.arange(10).float().repeat(2, 1), torch.tensor([5, 0]))  # top 5: 9 8 7 6 5
    result = metrics.compute()
    assert result["top1"] == 0.0 and result["top5"] == 0.5
    assert result["f1_macro"] == 0.0  # only classes 0, 5 and 9 count, and none is right


def test_top5_with_fewer_than_5_classes():
    metrics = ClassificationMetrics(2)
    metrics.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([1, 1, 0]))
    result = metrics.compute()
    assert result["top1"] == pytest.approx(2 / 3) and result["top5"] == 1.0


def test_no_samples_and_bad_labels():
    metrics = ClassificationMetrics(3)
    assert metrics.compute()["top1"] == 0.0 and metrics.compute()["f1_macro"] == 0.0
    with pytest.raises(DataError, match="label 7 is outside the model's 3 classes"):
        metrics.update(torch.zeros(2, 3), torch.tensor([1, 7]))


def test_confusion_image():
    image = confusion_image([[3, 1], [0, 4]], ["a", "a very long class name"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] == image.shape[1] > 2 * 40  # cells plus room for the names


def test_confusion_image_colours_rows_by_share():
    image = confusion_image([[5, 0], [0, 0]], ["a", "b"], cell=4)  # too small for names: cells only
    assert image.shape == (8, 8, 3)
    assert tuple(image[1, 1]) == (0, 0, 255)  # row 0 all on the diagonal: full colour
    assert tuple(image[1, 5]) == tuple(image[5, 5]) == (255, 255, 255)  # no share, and an empty row


def test_hflip_tta_on_a_flip_invariant_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    images = torch.randn(5, 3, 8, 8)
    plain, flipped = predict(model, images), predict(model, images, "hflip")
    assert torch.equal(flipped.argmax(1), plain.argmax(1))
    assert torch.allclose(flipped, plain.log_softmax(1), atol=1e-5)  # both views agree: same probabilities
    with pytest.raises(ValueError, match="none, hflip"):
        predict(model, images, "vflip")


def test_onnx_export_matches_torch(tmp_path):
    import timm

    from slurmvision.evaluate.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("swinv2_tiny_window8_256", img_size=32, patch_size=2, window_size=4, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), num_classes=10)
    result = export_onnx(model, tmp_path / "out" / "m.onnx", img_size=32)
    assert result["max_abs_diff"] < 1e-4 and result["exporter"] == "torchscript"
    assert result["inputs"] == {"images": ["batch", 3, 32, 32]} and result["outputs"] == {"logits": ["batch", 10]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx"]  # nothing staged is left
    assert model.training  # the caller's model is not switched to eval


def test_onnx_export_without_onnxruntime(tmp_path, monkeypatch):
    from slurmvision.evaluate.export import export_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SlurmVisionError, match="pip install onnx"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", img_size=8)
    assert not (tmp_path / "m.onnx").exists()
