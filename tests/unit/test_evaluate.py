"""Metrics against hand-computed values and scikit-learn, the confusion image, TTA, `slurmvision eval` on
the run's data and on a user's ImageFolder tree, ONNX export."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slurmvision.configs import DataConfig
from slurmvision.errors import ConfigError, DataError, SlurmVisionError
from slurmvision.evaluate.metrics import ClassificationMetrics, confusion_image
from slurmvision.evaluate.tta import check_scales, predict, tta_scales

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


def test_metrics_match_scikit_learn_with_classes_absent_from_the_targets():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    targets = rng.choice([0, 1, 2, 3, 6], size=40)  # classes 4, 5, 7 never occur
    scores = rng.normal(size=(40, 8))
    scores[:8, 4] += 10  # class 4 is predicted without being in the targets; 5 and 7 are absent from both
    scores[np.arange(8, 30), targets[8:30]] += 1.5  # right more often than chance
    scores[:, [5, 7]] -= 10
    metrics = ClassificationMetrics(8)
    for part in np.array_split(np.arange(40), 3):
        metrics.update(torch.from_numpy(scores[part]), torch.from_numpy(targets[part]))
    result = metrics.compute()
    predicted, labels = scores.argmax(1), list(range(8))
    per_class = {key: [c[key] for c in result["per_class"]] for key in ("precision", "recall", "f1", "support")}

    assert result["top1"] == pytest.approx(sk.accuracy_score(targets, predicted))
    assert result["top5"] == pytest.approx(sk.top_k_accuracy_score(targets, scores, k=5, labels=labels))
    assert result["confusion"] == sk.confusion_matrix(targets, predicted, labels=labels).tolist()
    for name, score in (("f1", sk.f1_score), ("precision", sk.precision_score), ("recall", sk.recall_score)):
        # Macro: over the classes in the targets or the predictions, scikit-learn's default labels.
        assert result[f"{name}_macro"] == pytest.approx(score(targets, predicted, average="macro", zero_division=0))
        assert per_class[name] == pytest.approx(score(targets, predicted, average=None, labels=labels, zero_division=0))
    assert per_class["support"] == np.bincount(targets, minlength=8).tolist()
    assert 0 < result["f1_macro"] < 1 and per_class["precision"][4] == 0.0


def test_multiscale_tta_averages_the_probabilities_of_every_scale_and_its_flip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    ).eval()  # not flip-invariant, takes any size
    batches = [torch.randn(6, 3, size, size) for size in (8, 12, 16)]
    views = {"multiscale": batches, "multiscale-hflip": [*batches, *(b.flip(-1) for b in batches)]}
    for tta, images in views.items():
        expected = torch.stack([model(b).softmax(1) for b in images]).mean(0).log()
        assert torch.allclose(predict(model, batches, tta), expected, atol=1e-5)
    assert torch.allclose(predict(model, batches[:1], "hflip"), predict(model, batches[0], "hflip"))
    assert torch.equal(predict(model, batches[:1], "multiscale"), model(batches[0]))  # one view: its logits


def test_tta_scales_default_to_the_eval_size_and_32_either_side_or_the_trained_scales():
    data = DataConfig(img_size=224)
    assert tta_scales("hflip", None, data) == [224]
    assert tta_scales("multiscale", None, data) == [192, 224, 256]
    assert tta_scales("multiscale-hflip", [224, 288], data) == [224, 288]
    assert tta_scales("multiscale", None, DataConfig(img_size=224, scales=[224, 256])) == [224, 256]
    assert tta_scales("multiscale", None, DataConfig(img_size=16)) == [16, 48]
    with pytest.raises(ConfigError, match="--scales applies to --tta multiscale"):
        tta_scales("none", [224, 256], data)
    with pytest.raises(ConfigError, match="distinct image sizes"):
        tta_scales("multiscale", [224, 224], data)


def test_a_model_fixed_to_one_size_is_refused_at_other_scales_before_any_data_is_read():
    import timm

    tiny = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3)
    fixed = timm.create_model("swinv2_tiny_window8_256", **tiny).eval()
    check_scales(fixed, [16], torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot run on 32x32 images .*choose --scales it takes"):
        check_scales(fixed, [16, 32], torch.device("cpu"))
    check_scales(
        timm.create_model("swinv2_tiny_window8_256", strict_img_size=False, **tiny).eval(),
        [16, 32, 48],
        torch.device("cpu"),
    )


CLASSES = ("class a", "Ünï", "02_x")  # tests/conftest.py's ImageFolder tree
TINY = {"img_size": 16, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a real checkpoint of a tiny model (untrained, fixed weights) over shards of
    tests/conftest.py's ImageFolder tree; (run, the tree)."""
    from slurmvision.configs import load_config, to_dict
    from slurmvision.models import build_model
    from slurmvision.shards.writer import build_shards
    from slurmvision.trainer.checkpoint import CheckpointManager, rng_state
    from slurmvision.trainer.distributed import DistEnv
    from tests.conftest import make_imagefolder

    base = tmp_path_factory.mktemp("eval")
    images = make_imagefolder(base / "images", splits=("train", "val", "test"))
    build_shards(images, base / "shards", samples_per_shard=5, progress=False)
    config = load_config(
        "digits-demo",
        [
            f"data.root={base / 'shards'}",
            "data.img_size=16",
            "data.batch_size=5",
            "data.workers=0",
            "model.name=swinv2_tiny_window8_256",
            f"model.kwargs={json.dumps(TINY)}",
        ],  # fixed to 16 px, as timm builds it
        run_dir=base / "run",
    )
    torch.manual_seed(0)
    model = build_model(config.model, len(CLASSES))
    manager = CheckpointManager(base / "run" / "checkpoints", DistEnv(), keep=1)
    manager.save(
        7,
        {"config": json.dumps(to_dict(config)), "engine": {"model": model.state_dict()}, "step": 7},
        {"rng": rng_state()},
        {"step": 7, "epoch": 0, "classes": sorted(CLASSES)},
    )
    return base / "run", images


def eval_cli(capsys, *args) -> dict:
    from slurmvision.cli import main

    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def rows(record) -> dict:
    """The confusion matrix from the saved CSV, by true class name."""
    with open(record["files"]["csv"], newline="") as f:
        header, *body = csv.reader(f)
    assert header[1:] == [c["class"] for c in record["per_class"]]
    return {row[0]: [int(n) for n in row[1:]] for row in body}


def test_eval_saves_its_record_and_confusion_matrix_in_the_run(run, capsys):
    run_dir, _ = run
    record = eval_cli(capsys, run_dir, "--split", "test")
    files = record["files"]
    assert files["json"] == str(run_dir / "eval" / "test-none-step7.json")
    assert json.loads((run_dir / "eval" / "test-none-step7.json").read_text()) == record  # --json prints the file
    assert record["step"] == 7 and record["split"] == "test" and record["tta"] == "none" and record["scales"] == [16]
    assert record["data"].endswith("shards") and record["samples"] == 12
    assert {"top1", "top5", "f1_macro", "precision_macro", "recall_macro"} <= set(record)
    assert [c["class"] for c in record["per_class"]] == sorted(CLASSES)
    assert sum(map(sum, rows(record).values())) == 12
    from PIL import Image

    assert Image.open(files["png"]).size[0] > 3 * 20  # three classes and their names
    checkpoint = run_dir / "checkpoints" / "step-00000007"
    assert eval_cli(capsys, checkpoint, "--split", "test")["files"] == files  # a checkpoint: saved in its run


def test_eval_on_a_folder_of_some_of_the_classes_matches_them_by_name(run, tmp_path, capsys):
    run_dir, images = run
    mine = tmp_path / "my test set"
    for name in ("02_x", "class a"):  # two of the three classes; the data's class order differs from the model's
        shutil.copytree(images / "test" / name, mine / name)
    record = eval_cli(capsys, run_dir, "--data", mine)  # class folders directly: all of them, no split
    whole = eval_cli(capsys, run_dir, "--split", "test")  # the same images, in the run's shards
    assert record["data"] == str(mine) and record["split"] is None and record["samples"] == 8
    assert rows(record) == {
        name: rows(whole)[name] if name in ("02_x", "class a") else [0, 0, 0] for name in sorted(CLASSES)
    }
    assert Path(record["files"]["json"]).name.startswith("my_test_set-") and record["files"]["json"].endswith(
        "-none-step7.json"
    )
    # The tree with split folders gives the same numbers, saved apart from the run's own evaluation.
    tree = eval_cli(capsys, run_dir, "--data", images, "--split", "test")
    assert rows(tree) == rows(whole) and tree["files"]["json"] != whole["files"]["json"]


def test_eval_refuses_data_with_classes_the_model_was_not_trained_on(run, tmp_path, capsys):
    from slurmvision.cli import main

    run_dir, images = run
    shutil.copytree(images / "test" / "02_x", tmp_path / "mine" / "02_x")
    shutil.copytree(images / "test" / "Ünï", tmp_path / "mine" / "zebra")
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not trained on: 'zebra'" in err
    assert main(["eval", str(run_dir), "--data", str(images), "--split", "holdout"]) == 2
    assert "has the split folders test, train, val but no holdout/: choose one with --split" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "mine"), "--split", "test"]) == 2
    assert "no test/ folder: leave out --split" in capsys.readouterr().err


def test_eval_with_multiscale_tta_of_a_model_trained_at_one_size(run, capsys):
    run_dir, _ = run
    record = eval_cli(capsys, run_dir, "--split", "test", "--tta", "multiscale-hflip", "--scales", "16,24,32")
    assert record["scales"] == [16, 24, 32] and record["tta"] == "multiscale-hflip" and record["samples"] == 12
    assert record["files"]["json"].endswith("test-multiscale-hflip-16-24-32-step7.json")
    # Built to take any size, the model computes what it did at the size it trained at.
    trained_size = eval_cli(capsys, run_dir, "--split", "test", "--tta", "multiscale", "--scales", "16")
    assert rows(trained_size) == rows(eval_cli(capsys, run_dir, "--split", "test"))


def test_onnx_export_matches_torch(tmp_path):
    import timm

    from slurmvision.evaluate.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model(
        "swinv2_tiny_window8_256",
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=10,
    )
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
