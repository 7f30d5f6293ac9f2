"""`eval --nproc 2` on real gloo ranks gives the totals of one process; a finished run names its classes in
its checkpoints and shows per-class F1, Grad-CAM pictures and its hparams in TensorBoard."""

import json
import shutil

import pytest

from slurmvision.launch.evaluation import evaluate_checkpoint
from slurmvision.launch.local import train_here
from slurmvision.shards.manifest import Manifest

from .conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train_here(tiny_config(tiny_shards, run, "trainer.max_steps=2"), nproc=1)
    return run


def test_two_ranks_count_every_sample_once(trained, tiny_shards, tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(tiny_shards.parent / "images" / "val", mine)
    next((mine / "cat").iterdir()).unlink()  # 23 images: the ranks get 12 and 11
    one = evaluate_checkpoint(trained, data=str(mine), tta="hflip")
    two = evaluate_checkpoint(trained, data=str(mine), tta="hflip", nproc=2)
    assert one["samples"] == 23 and two == one  # the same totals, saved to the same record
    assert json.loads(open(two["files"]["json"]).read()) == two


def test_a_finished_run_names_its_classes_and_logs_per_class_f1_gradcam_and_hparams(trained, tiny_shards):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    classes = Manifest.load(tiny_shards).classes
    meta = json.loads(next((trained / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["classes"] == classes
    logged = {
        (event.step, value.tag)
        for events in (trained / "tb").glob("events.*")
        for event in EventFileLoader(str(events)).Load()
        for value in event.summary.value
    }
    assert {(2, f"eval/f1/{name}") for name in classes} <= logged
    assert {(2, "_hparams_/experiment"), (2, "_hparams_/session_start_info")} <= logged
    assert {(2, f"gradcam/{i}") for i in range(4)} <= logged  # trainer.gradcam_images val images
