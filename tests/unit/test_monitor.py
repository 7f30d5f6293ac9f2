"""TensorBoard across a resume: one continuous run, no step twice, none missing."""

import pytest

from slurmvision.trainer.distributed import DistEnv
from slurmvision.trainer.monitor import Monitor

pytestmark = pytest.mark.unit


def log_steps(run_dir, start_step: int, steps) -> None:
    monitor = Monitor(run_dir, DistEnv(), start_step=start_step, max_steps=10, hparams={"model": {"name": "tiny"}})
    for step in steps:
        monitor.scalars(step, {"train/loss": float(step), "train/grad_norm": None})
    monitor.close()


def test_a_resume_hides_the_steps_logged_after_the_checkpoint_and_keeps_the_checkpoints_own(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    log_steps(tmp_path, 0, range(1, 7))  # crashed after logging step 6; the last checkpoint is step 4
    log_steps(tmp_path, 4, range(5, 9))

    first, resumed = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    purges = [e.step for e in EventFileLoader(str(resumed)).Load() if e.session_log.status == SessionLog.START]
    assert purges == [5]
    assert not [e for e in EventFileLoader(str(first)).Load() if e.session_log.status == SessionLog.START]
    view = EventAccumulator(str(tmp_path / "tb"))  # what TensorBoard shows: the files read in order
    view.Reload()
    assert [(e.step, e.value) for e in view.Scalars("train/loss")] == [(s, float(s)) for s in range(1, 9)]
    assert "train/grad_norm" not in view.Tags()["scalars"]  # a value a device does not have is left out
    assert "config/text_summary" in view.Tags()["tensors"]


@pytest.mark.parametrize("share", [False, True])
def test_tensorboard_events_are_private_unless_shared_with_the_group_and_never_group_writable(tmp_path, share):
    import os

    old = os.umask(0o002)  # a project directory's usual umask
    try:
        from slurmvision.slurm.rundir import make_private

        make_private()
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        monitor = Monitor(run_dir, DistEnv(), start_step=0, max_steps=10, hparams={}, share_with_group=share)
        monitor.scalars(1, {"train/loss": 1.0})
        monitor.close()
    finally:
        os.umask(old)
    event = next((run_dir / "tb").glob("events.out.tfevents.*"))
    modes = [p.stat().st_mode & 0o777 for p in (run_dir, run_dir / "tb", event)]
    assert modes == ([0o710, 0o750, 0o640] if share else [0o700, 0o700, 0o600])


def test_per_class_f1_at_each_evaluation_and_the_config_as_hparams_with_the_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    config = {"optim": {"lr": 0.001, "betas": [0.9, 0.999], "clip_grad": None}, "model": {"name": "tiny", "ema": True}}
    monitor = Monitor(tmp_path, DistEnv(), start_step=0, max_steps=20, hparams=config)
    for step, f1 in ((10, 0.25), (20, 0.75)):
        results = {
            "top1": f1,
            "top5": 1.0,
            "f1_macro": f1 / 2,
            "per_class": [{"class": "cat", "f1": f1}, {"class": "ünï x", "f1": 0.0}],
        }
        monitor.eval(step, results)
    monitor.final(20, results)
    monitor.close()

    view = EventAccumulator(str(tmp_path / "tb"))
    view.Reload()
    assert [(e.step, e.value) for e in view.Scalars("eval/f1/cat")] == [(10, 0.25), (20, 0.75)]
    assert [e.value for e in view.Scalars("eval/f1/ünï x")] == [0.0, 0.0]
    plugin = {
        value.tag: HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for event in EventFileLoader(str(next((tmp_path / "tb").glob("events.*")))).Load()
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "hparams"
    }
    started = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert {key: value.WhichOneof("kind") for key, value in started.items()} == {
        "optim.lr": "number_value",
        "optim.betas": "string_value",
        "model.name": "string_value",
        "model.ema": "number_value",
    }  # lists as JSON text, booleans as 1 or 0; None left out
    assert started["optim.lr"].number_value == 0.001 and started["optim.betas"].string_value == "[0.9, 0.999]"
    metrics = plugin["_hparams_/experiment"].experiment.metric_infos
    assert [m.name.tag for m in metrics] == ["eval/top1", "eval/top5", "eval/f1_macro"]  # the tab reads these scalars
    assert view.Scalars("eval/top1")[-1].value == 0.75


def test_the_eta_is_paced_from_the_first_progress_line_not_from_the_start_up(tmp_path, monkeypatch, caplog):
    import logging
    import time

    monitor = Monitor(tmp_path, DistEnv(), start_step=0, max_steps=10, hparams={})
    now = time.monotonic() + 100.0  # a first step that took 100 s (start-up, compile), then 2 s a step
    with caplog.at_level(logging.INFO, logger="slurmvision.progress"):
        for step in (1, 2, 3):
            monkeypatch.setattr(time, "monotonic", lambda at=now: at)
            monitor.progress(step, 1.0, 10.0)
            now += 2.0
    monkeypatch.undo()
    monitor.close()
    etas = [record.getMessage().split("ETA ")[1] for record in caplog.records]
    assert etas == ["from the next line on", "0m16s", "0m14s"]
