"""The streaming reader: same batches for any worker count, exact resume, bad data skipped within budget."""

import json
import tarfile
import time
from itertools import islice

import pytest
import torch

from slurmvision.configs.data import DataConfig
from slurmvision.errors import DataError
from slurmvision.shards.manifest import MANIFEST_NAME, shard_url
from slurmvision.shards.reader import LoaderState, TrainReader, eval_batches
from slurmvision.shards.tario import ShardFile, StreamedShard
from slurmvision.shards.writer import build_shards

pytestmark = pytest.mark.unit


@pytest.fixture
def shards(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "shards", samples_per_shard=5, progress=False)
    return tmp_path / "shards"


def data_config(root, **changes) -> DataConfig:
    settings = dict(
        root=str(root),
        batch_size=4,
        workers=0,
        shuffle_buffer=6,
        img_size=16,
        scales=[12, 16],
        scale_batch_sizes=[5, 4],
        hflip=0.5,
        color_jitter=0.0,
        crop_scale=[0.5, 1.0],
    )
    settings.update(changes)
    return DataConfig(**settings)


def take(reader, n):
    return [(b.keys, b.resolution, b.images.clone()) for b in islice(iter(reader), n)]


def test_worker_count_does_not_change_the_batches(shards):
    one = take(TrainReader(data_config(shards), seed=1, rank=0, world_size=2), 8)
    two = take(TrainReader(data_config(shards, workers=2), seed=1, rank=0, world_size=2), 8)
    assert [(k, r) for k, r, _ in one] == [(k, r) for k, r, _ in two]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(one, two))  # same augmentation too
    assert {r for _, r, _ in one} <= {12, 16}


def test_resume_from_state_continues_exactly(shards):
    reader = TrainReader(data_config(shards), seed=1, rank=1, world_size=2)
    batches = iter(reader)
    for _ in range(5):  # into the second epoch (12 samples per rank per epoch)
        next(batches)
    state = LoaderState.from_dict(reader.state.to_dict())
    expected = [next(batches) for _ in range(4)]
    resumed = TrainReader(data_config(shards), seed=1, rank=1, world_size=2, state=state)
    got = list(islice(iter(resumed), 4))
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, expected))


def test_eval_covers_every_sample_once_across_ranks(shards):
    config = data_config(shards)
    keys = [k for rank in range(3) for b in eval_batches(config, "val", rank=rank, world_size=3) for k in b.keys]
    assert len(keys) == len(set(keys)) == 12


def corrupt_one_image(shard_path):
    with tarfile.open(shard_path) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".webp")))
    data = bytearray(shard_path.read_bytes())
    data[image.offset_data : image.offset_data + image.size] = b"\x00" * image.size
    shard_path.write_bytes(bytes(data))
    return image.name.split(".")[0]


def test_bad_samples_are_skipped_counted_and_budgeted(shards, caplog):
    bad_key = corrupt_one_image(shards / "train-000000.tar")
    (shards / "train-000003.tar").write_bytes((shards / "train-000003.tar").read_bytes()[:2000])  # truncated
    reader = TrainReader(data_config(shards, bad_sample_budget=0.5), seed=1, rank=0, world_size=1)
    batches = list(islice(iter(reader), reader.batches_in_epoch()))  # one epoch of 24 samples
    assert {b.epoch for b in batches} == {0}
    skipped = [b for batch in batches for b in batch.bad]
    assert any(key == bad_key and "does not decode" in problem for _, key, problem in skipped)
    assert any(shard == "train-000003.tar" for shard, _, _ in skipped)
    assert sum(len(b.keys) for b in batches) + len(skipped) == 24
    assert reader.state.bad_in_epoch == len(skipped) and bad_key in caplog.text

    strict = TrainReader(data_config(shards, bad_sample_budget=1), seed=1, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"over the budget.*shards verify"):
        list(islice(iter(strict), strict.batches_in_epoch()))


def test_missing_shard_file_counts_as_bad_data(shards):
    (shards / "train-000001.tar").unlink()
    reader = TrainReader(data_config(shards, bad_sample_budget=0.0), seed=1, rank=0, world_size=1)
    with pytest.raises(DataError, match="unreadable shard"):
        list(islice(iter(reader), reader.batches_in_epoch()))


def test_loader_workers_outlive_the_job_signals_slurm_sends_to_every_process(shards):
    """Preemption's SIGTERM reaches the workers too: the trainer, not a dead worker, decides."""
    import os
    import signal

    from slurmvision.shards.reader import start_loader

    reader = TrainReader(data_config(shards, workers=2), seed=1, rank=0, world_size=1)
    loader = start_loader(reader._stream(), workers=2)
    next(loader)
    for worker in loader._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR2)
    assert len(list(loader)) == len(reader._stream()) - 1


def test_shards_stream_through_a_pipe_command_as_from_a_directory(shards):
    """Remote storage: data.root may be any URL webdataset opens, here a `pipe:` command."""
    local = take(TrainReader(data_config(shards), seed=1, rank=0, world_size=2), 8)
    piped = take(TrainReader(data_config(f"pipe:cat {shards}/{{}}", workers=2), seed=1, rank=0, world_size=2), 8)
    assert [(k, r) for k, r, _ in piped] == [(k, r) for k, r, _ in local]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(piped, local))
    with pytest.raises(DataError, match="without"):
        TrainReader(data_config(f"pipe:cat {shards}"), seed=1, rank=0, world_size=2)
    with pytest.raises(DataError, match="cannot read"):
        TrainReader(data_config(f"pipe:cat {shards}/missing-{{}}"), seed=1, rank=0, world_size=2)


def test_a_shard_name_stays_one_file_name_in_a_pipe_command(shards, tmp_path, monkeypatch):
    """Names go into a `pipe:` command shell-quoted (into a URL, URL-quoted): spaces, quotes or
    `;` in a name run nothing."""
    name = 'a "shard"; touch injected'
    (shards / "val-000000.tar").rename(shards / name)
    manifest = json.loads((shards / MANIFEST_NAME).read_text(encoding="utf-8"))
    next(s for s in manifest["shards"] if s["name"] == "val-000000.tar")["name"] = name
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    batches = list(eval_batches(data_config(f"pipe:cat {shards}/{{}}"), "val", rank=0, world_size=1))
    assert sum(len(b.keys) for b in batches) == 12 and not any(b.bad for b in batches)
    assert not (tmp_path / "injected").exists()
    assert shard_url("https://host/shards", "a b#1.tar") == "https://host/shards/a%20b%231.tar"


def test_a_hung_remote_shard_times_out_with_an_error_naming_it(shards, monkeypatch):
    """A stalled transfer ends after data.remote_timeout_s: the loader never hangs, so the trainer
    always gets to act on a stop signal."""
    root = f"pipe:if [ {{}} = {MANIFEST_NAME} ]; then exec cat {shards}/{{}}; else exec sleep 1000; fi"
    reader = TrainReader(data_config(root, bad_sample_budget=0.0, remote_timeout_s=1.0), seed=1, rank=0, world_size=1)
    started = time.monotonic()
    with pytest.raises(
        DataError,
        match=r"over the budget.* in train-\d{6}\.tar: unreadable shard "
        r"\(no data from pipe:.*sleep 1000; fi for 1 s\)",
    ):
        next(iter(reader))
    assert time.monotonic() - started < 10


def test_a_remote_shard_is_streamed_not_fetched_whole(shards, monkeypatch):
    """Samples come as their bytes arrive: a transfer that stalls after the first ones still
    yields them, those asked for later included, then times out once for the rest."""
    path = shards / "train-000000.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[6].offset_data  # three members a sample: samples 0 and 1, and the header after
    local = ShardFile(str(path))
    streamed = StreamedShard(f"pipe:head -c {cut} {path}; exec sleep 1000", wanted=[0, 1, 3, 4], timeout_s=1.0)
    started = time.monotonic()
    assert streamed.sample(1) == local.sample(1)
    assert streamed.sample(0) == local.sample(0)
    for i in (4, 3):
        with pytest.raises(LookupError, match=r"unreadable shard \(no data from pipe:head .* for 1 s\)"):
            streamed.sample(i)
    assert time.monotonic() - started < 5
    streamed.close()
    local.close()
