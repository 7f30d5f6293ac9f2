"""data.synthetic: the loop's own speed on random batches in memory, with a position that resumes;
and the data-wait share's advice."""

import logging
from itertools import islice

import pytest
import torch

from slurmvision.configs import load_config
from slurmvision.configs.data import DataConfig
from slurmvision.errors import ConfigError
from slurmvision.shards.plan import BatchSchedule
from slurmvision.shards.reader import LoaderState
from slurmvision.shards.synthetic import SyntheticReader, class_names
from slurmvision.trainer.monitor import DataWait

pytestmark = pytest.mark.unit


def test_synthetic_data_needs_no_shards_and_takes_its_classes_from_the_config():
    config = load_config("digits-demo", ["data.synthetic=true", "data.synthetic_classes=7"], cluster="local")
    assert config.data.root == "" and class_names(config.data) == [str(i) for i in range(7)]
    with pytest.raises(ConfigError, match="data.root is not set"):
        load_config("digits-demo", [], cluster="local")
    with pytest.raises(ConfigError, match="data.synthetic_classes=1 is not allowed"):
        load_config("digits-demo", ["data.synthetic=true", "data.synthetic_classes=1"], cluster="local")
    with pytest.raises(ConfigError, match="optim.warmup_epochs.*warmup_steps"):
        load_config("digits-demo", ["data.synthetic=true", "optim.warmup_epochs=1"], cluster="local")


def test_synthetic_batches_have_the_configured_shapes_and_labels_and_resume_where_they_stopped():
    data = DataConfig(root="", synthetic=True, batch_size=4, scales=[16, 24], scale_batch_sizes=[6, 4])
    reader = SyntheticReader(data, 3, seed=5, rank=1, world_size=2)
    batches = list(islice(iter(reader), 6))
    schedule = BatchSchedule((16, 24), (6, 4), 5)
    for index, batch in enumerate(batches):
        resolution = schedule.resolutions[schedule.choice(0, index)]
        size = 6 if resolution == 16 else 4
        assert batch.index == index and batch.resolution == resolution
        assert batch.images.shape == (size, 3, resolution, resolution) and batch.images.dtype == torch.uint8
        assert batch.targets.shape == (size,) and 0 <= int(batch.targets.min()) <= int(batch.targets.max()) < 3
        assert len(batch.keys) == size and batch.bad == []
    assert reader.state.to_dict() == {"epoch": 0, "segments": [[2, 6]], "bad_in_epoch": 0}

    resumed = SyntheticReader(
        data, 3, seed=5, rank=1, world_size=2, state=LoaderState.from_dict(LoaderState(0, [[2, 4]]).to_dict())
    )
    for expected, batch in zip(batches[4:], iter(resumed)):
        assert batch.index == expected.index and torch.equal(batch.images, expected.images)
        assert torch.equal(batch.targets, expected.targets)
    other_rank = next(iter(SyntheticReader(data, 3, seed=5, rank=0, world_size=2)))
    assert not torch.equal(other_rank.images, batches[0].images)


def test_a_large_data_wait_share_is_logged_once_with_advice(caplog, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    wait = DataWait(workers=1, device=torch.device("cpu"), world_size=1)
    with caplog.at_level(logging.WARNING):
        wait.add(0.9, 1.0)  # the first interval: the loader starting, not judged
        assert wait.share() == pytest.approx(0.9)
        wait.add(0.05, 1.0)
        assert wait.share() == pytest.approx(0.05)
        assert not caplog.records
        for _ in range(2):
            wait.add(0.3, 0.5)
            wait.add(0.1, 0.5)
            assert wait.share() == pytest.approx(0.4)
    [record] = caplog.records
    message = record.getMessage()
    assert (
        "waiting for data 40%" in message and "1 loader worker(s) and 2 compute threads share the 2 core(s)" in message
    )
    assert "data.workers=0" in message

    enough = DataWait(workers=1, device=torch.device("cuda"), world_size=1)
    assert "raise data.workers (now 1)" in enough.advice()
