"""Checkpoints: atomic, verified, retained; a broken newest one is skipped; SIGKILL mid-write is harmless."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest
import torch

from slurmvision.checkpoints import FORMAT_VERSION, VERSION_KEY, manifest_text, open_checkpoint
from slurmvision.errors import CheckpointError
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.trainer.async_checkpoint import AsyncCheckpointManager
from slurmvision.trainer.checkpoint import CheckpointManager, rng_state, set_rng_state
from slurmvision.trainer.distributed import DistEnv

pytestmark = pytest.mark.unit


def save(manager, step, value=0.0):
    manager.save(
        step, {"weights": torch.full((4,), value), "step": step}, {"rng": rng_state()}, {"step": step, "epoch": 0}
    )


def test_save_load_and_retention(tmp_path):
    manager = CheckpointManager(tmp_path, DistEnv(), keep=2)
    for step in (1, 2, 3):
        save(manager, step, float(step))
    assert [p.name for p in manager.candidates()] == ["step-00000003", "step-00000002"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    latest = manager.latest_valid()
    assert latest.step == 3 and torch.equal(latest.load_state()["weights"], torch.full((4,), 3.0))
    assert inspect_checkpoint(tmp_path)["valid"]


def test_pruned_checkpoints_are_deleted_in_the_background_and_a_cut_deletion_is_finished_later(tmp_path, monkeypatch):
    from slurmvision.trainer import checkpoint as module

    manager = CheckpointManager(tmp_path, DistEnv(), keep=1)
    save(manager, 1, 1.0)
    release, real_delete = threading.Event(), module._delete

    def slow_delete(paths):
        release.wait()
        real_delete(paths)

    monkeypatch.setattr(module, "_delete", slow_delete)
    save(manager, 2, 2.0)  # returns while step 1 is still being deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001.deleting", "step-00000002"]
    assert [p.name for p in manager.candidates()] == ["step-00000002"]
    assert CheckpointManager(tmp_path, DistEnv(), keep=1).latest_valid().step == 2
    release.set()
    manager.wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]

    # A process killed while it deleted leaves a part of the directory: never a checkpoint, gone after the next save.
    cut = tmp_path / "step-00000001.deleting"
    cut.mkdir()
    (cut / "state.pt").write_bytes(b"part")
    monkeypatch.setattr(module, "_delete", real_delete)
    save(manager, 3, 3.0)
    manager.wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, DistEnv(), keep=3)
    save(manager, 1, 1.0)
    save(manager, 2, 2.0)
    state = tmp_path / "step-00000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[-10] ^= 0xFF
    state.write_bytes(bytes(data))
    assert manager.latest_valid().step == 1
    assert "skipping checkpoint" in caplog.text and "sha256" in caplog.text
    report = inspect_checkpoint(tmp_path / "step-00000002")
    assert not report["valid"] and "sha256" in report["problem"]
    with pytest.raises(CheckpointError, match="not valid"):
        open_checkpoint(tmp_path / "step-00000002")


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    manager = CheckpointManager(tmp_path, DistEnv(), keep=1)
    save(manager, 1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for _ in range(5):
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(manager.latest_valid().load_rank(0)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_usable(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from slurmvision.trainer.checkpoint import CheckpointManager
        from slurmvision.trainer.distributed import DistEnv
        manager = CheckpointManager({str(tmp_path)!r}, DistEnv(), keep=2)
        step = 0
        while True:
            step += 1
            manager.save(step, {{"weights": torch.full((4_000_000,), float(step))}}, {{}}, {{"step": step, "epoch": 0}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    saved = [proc.stdout.readline() for _ in range(2)]  # two complete checkpoints, then kill during later writes
    time.sleep(0.15)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(saved)
    latest = CheckpointManager(tmp_path, DistEnv(), keep=2).latest_valid()
    assert latest is not None and latest.step >= 2
    assert torch.equal(latest.load_state()["weights"][:3], torch.full((3,), float(latest.step)))
    assert json.loads((latest.path / "meta.json").read_text())["step"] == latest.step


def state_file_on_a_full_disk(real_save):
    """A checkpoint file writer that fails on state.pt as a full disk does, a part written."""
    import errno

    def full_disk(obj, path):
        if path.name == "state.pt":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)

    return full_disk


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):

    from slurmvision.trainer import checkpoint as module

    manager = CheckpointManager(tmp_path, DistEnv(), keep=2)
    save(manager, 1, 1.0)
    full_disk = state_file_on_a_full_disk(module.save_file)
    monkeypatch.setattr(module, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is still the newest"):
        save(manager, 2, 2.0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-00000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert manager.latest_valid().step == 1


def _changes_files(event: str, args: tuple) -> bool:
    """Whether an audit event changes the file system: a point where a SIGKILL leaves a new state on disk."""
    if event == "open":
        return bool(args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate")


def killed_at(change: int, work) -> bool:
    """Runs `work` in a forked child SIGKILLed at its `change`-th file-system change; whether it was."""
    pid = os.fork()
    if pid == 0:
        seen = 0

        def hook(event, args):
            nonlocal seen
            if _changes_files(event, args):
                seen += 1
                if seen == change:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.addaudithook(hook)
            work()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL


WEIGHTS = {1.0: torch.full((1000,), 1.0), 2.0: torch.full((1000,), 2.0)}


def save_value(manager, step: int, value: float) -> None:
    manager.save(step, {"weights": WEIGHTS[value]}, {"rng": rng_state()}, {"step": step, "epoch": 0, "value": value})


def assert_a_sigkill_anywhere_leaves_a_valid_checkpoint(tmp_path, manager_class, save, second_step: int = 2) -> None:
    """`save` of a second checkpoint SIGKILLed at each file-system change in turn, with keep=1: the newest
    valid checkpoint is always a whole one, and the next save clears what the killed one left."""
    for change in itertools.count(1):
        directory = tmp_path / str(change)
        manager = manager_class(directory, DistEnv(), keep=1)
        save_value(manager, 1, 1.0)
        died = killed_at(change, lambda: save(manager, second_step, 2.0))  # noqa: B023  called at once
        latest = manager.latest_valid()
        assert latest is not None, f"no valid checkpoint after a SIGKILL at file-system change {change}"
        assert torch.equal(latest.load_state()["weights"], WEIGHTS[latest.meta["value"]])
        save(manager, 3, 1.0)
        manager.wait_pruned()
        assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-00000003"]
        if not died:
            assert change > 10 and latest.meta["value"] == 2.0
            break


@pytest.mark.parametrize("second_step", [2, 1], ids=["next step", "same step again"])
def test_a_sigkill_at_any_point_of_a_save_leaves_a_valid_checkpoint_even_keeping_one(tmp_path, second_step):
    """Saving a step again (when its first copy does not verify) included."""
    assert_a_sigkill_anywhere_leaves_a_valid_checkpoint(tmp_path, CheckpointManager, save_value, second_step)


@pytest.mark.parametrize("manifest", ["[]", "{}", "not json", '{"files": []}', '{"files": {}}', "only-state"])
def test_a_malformed_manifest_makes_the_checkpoint_invalid_everywhere_without_a_traceback(tmp_path, manifest, caplog):
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", DistEnv(), keep=3)
    save(manager, 1, 1.0)
    save(manager, 2, 2.0)
    broken = run / "checkpoints" / "step-00000002"
    if manifest == "only-state":  # a manifest that does not list meta.json
        listed = json.loads((broken / "MANIFEST.json").read_text())
        manifest = json.dumps({"files": {"state.pt": listed["files"]["state.pt"]}})
    (broken / "MANIFEST.json").write_text(manifest)

    assert manager.latest_valid().step == 1  # training resumes from the older one
    assert "skipping checkpoint" in caplog.text and str(broken) in caplog.text
    report = inspect_checkpoint(broken)
    assert not report["valid"] and report["problem"]
    for target, valid, step in ((broken, False, 2), (run, True, 1)):
        shown = subprocess.run(
            [sys.executable, "-m", "slurmvision", "checkpoint", "inspect", str(target), "--json"],
            capture_output=True,
            text=True,
        )
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert {k: json.loads(shown.stdout)[k] for k in ("valid", "step")} == {"valid": valid, "step": step}


def test_every_file_of_a_checkpoint_is_fsynced_before_it_counts(tmp_path, monkeypatch):
    from slurmvision.trainer import checkpoint as module

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(module.os, "fsync", fsync)
    save(CheckpointManager(tmp_path, DistEnv(), keep=1), 1)
    assert {"state.pt", "rank-00000.pt", "meta.json", "MANIFEST.json.tmp", "step-00000001.tmp"} <= set(synced)


def rewrite_meta(path, **changes):
    """The checkpoint's meta record with `changes` (None: drop the field), its manifest written anew."""
    meta = {**json.loads((path / "meta.json").read_text()), **changes}
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    (path / "MANIFEST.json").unlink()
    (path / "MANIFEST.json").write_text(manifest_text(path))


def test_a_checkpoint_of_a_newer_format_is_refused_with_a_clear_error_and_an_old_one_loads(tmp_path):
    manager = CheckpointManager(tmp_path, DistEnv(), keep=2)
    save(manager, 1, 1.0)
    path = tmp_path / "step-00000001"
    assert json.loads((path / "meta.json").read_text())[VERSION_KEY] == FORMAT_VERSION
    rewrite_meta(path, **{VERSION_KEY: FORMAT_VERSION + 1})
    for load in (lambda: open_checkpoint(tmp_path), manager.resume):
        with pytest.raises(CheckpointError, match="newer than .* upgrade slurmvision"):
            load()
    report = inspect_checkpoint(path)
    assert not report["valid"] and "upgrade slurmvision" in report["problem"]

    rewrite_meta(path, **{VERSION_KEY: None}, world_size=1)  # saved before the meta record had a version
    assert open_checkpoint(tmp_path).step == 1 and manager.resume().checkpoint.step == 1
    assert inspect_checkpoint(path)["valid"]


def _held(monkeypatch, release: threading.Event) -> None:
    """Background writes wait for `release`."""
    from slurmvision.trainer import checkpoint as module

    real_save = module.save_file

    def held(obj, path):
        assert release.wait(timeout=60)
        return real_save(obj, path)

    monkeypatch.setattr(module, "save_file", held)


def test_a_background_save_holds_the_state_at_its_call_and_counts_once_committed(tmp_path, monkeypatch):
    manager = AsyncCheckpointManager(tmp_path, DistEnv(), keep=2)
    save(manager, 1, 1.0)
    release = threading.Event()
    _held(monkeypatch, release)
    weights = torch.full((4,), 2.0)
    manager.save_async(2, {"weights": weights, "step": 2}, {"rng": rng_state()}, {"step": 2, "epoch": 0})
    weights.add_(1.0)  # training goes on at once
    assert manager.settle() is None and manager.pending == 2  # still writing: nothing committed
    assert manager.latest_valid().step == 1 and (tmp_path / "latest").read_text().strip() == "step-00000001"
    with pytest.raises(RuntimeError, match="pending"):
        save(manager, 3)
    release.set()
    settled = manager.settle(wait=True)
    assert settled.path == tmp_path / "step-00000002" and settled.error is None and manager.pending is None
    latest = manager.latest_valid()  # verifies every file's sha256, hashed while it was written
    assert latest.step == 2 and torch.equal(latest.load_state()["weights"], torch.full((4,), 2.0))
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    assert sorted(json.loads((latest.path / "MANIFEST.json").read_text())["files"]) == [
        "meta.json",
        "rank-00000.pt",
        "state.pt",
    ]
    assert manager.settle() is None  # nothing pending: no collective either


def test_a_failed_background_save_is_reported_keeps_the_previous_checkpoint_and_a_second_stops(
    tmp_path, monkeypatch, caplog
):

    from slurmvision.trainer import checkpoint as module

    manager = AsyncCheckpointManager(tmp_path, DistEnv(), keep=2)
    save(manager, 1, 1.0)
    real_save = module.save_file
    full_disk = state_file_on_a_full_disk(real_save)

    def save_async(step):
        manager.save_async(step, {"weights": torch.full((4,), float(step))}, {"rng": rng_state()}, {"step": step})

    monkeypatch.setattr(module, "save_file", full_disk)
    save_async(2)
    settled = manager.settle(wait=True)
    assert settled.path is None and manager.pending is None
    assert "No space left on device on this rank" in settled.error
    assert "step-00000001 is still the newest" in settled.error and "training goes on" in settled.error
    assert "could not write checkpoint step-00000002" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-00000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000001" and manager.latest_valid().step == 1

    def broken(obj, path):
        raise RuntimeError("cannot pickle this")

    monkeypatch.setattr(module, "save_file", broken)  # a bug in the background, too, fails the save
    save_async(3)
    with pytest.raises(CheckpointError, match="RuntimeError: cannot pickle this.*2 background checkpoints failed"):
        manager.settle(wait=True)
    assert manager.latest_valid().step == 1

    monkeypatch.setattr(module, "save_file", real_save)
    save_async(4)
    assert manager.settle(wait=True).path.name == "step-00000004" and manager.failures == 0


def test_a_sigkill_at_any_point_of_a_background_save_leaves_a_valid_checkpoint(tmp_path):
    def background_save(manager, step, value):
        meta = {"step": step, "epoch": 0, "value": value}
        manager.save_async(step, {"weights": WEIGHTS[value]}, {"rng": rng_state()}, meta)
        while manager.settle() is None:  # the loop's step boundaries
            time.sleep(0.001)

    assert_a_sigkill_anywhere_leaves_a_valid_checkpoint(tmp_path, AsyncCheckpointManager, background_save)


def test_the_copy_to_host_memory_keeps_tied_tensors_tied_and_rebuilds_containers():
    from slurmvision.trainer.async_checkpoint import host_copy

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"a": weight, "b": weight}, "groups": [{"lr": 0.1, "params": [0, 1]}], "step": 3}
    copied = host_copy(state)
    weight.zero_()
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copied["model"]["a"], torch.arange(6.0).reshape(2, 3))
    assert copied["model"]["a"] is copied["model"]["b"] and copied["groups"][0]["lr"] == 0.1
    model_state = torch.nn.BatchNorm1d(3).state_dict()
    assert host_copy(model_state)._metadata == model_state._metadata  # the versions loading reads


def test_a_checkpoint_handed_to_the_disk_while_it_is_written_verifies_and_loads(tmp_path, monkeypatch):
    from slurmvision.trainer import checkpoint_files as module

    # Many hand-overs to the disk and to the hasher, each of a few pages.
    monkeypatch.setattr(module, "WRITEBACK_BYTES", 8192)
    monkeypatch.setattr(module, "HASH_BLOCK_BYTES", 4096)
    manager = CheckpointManager(tmp_path, DistEnv(), keep=1)
    weights = torch.randn(100_000)
    manager.save(1, {"weights": weights}, {"rng": rng_state()}, {"step": 1, "epoch": 0})
    latest = manager.latest_valid()  # the sha256 of every file checked against the one hashed on the way
    assert latest.step == 1 and torch.equal(latest.load_state()["weights"], weights)
    if hasattr(torch.serialization, "get_crc32_options"):  # written without the zip's CRC32, and only it
        assert torch.serialization.get_crc32_options()


def test_a_save_that_fails_midway_leaves_no_hasher_thread_behind(tmp_path):
    from slurmvision.trainer.checkpoint_files import save_file

    with pytest.raises(Exception, match="pickle"):
        save_file({"weights": torch.randn(1000), "unpicklable": lambda: 0}, tmp_path / "state.pt")
    assert not [thread for thread in threading.enumerate() if thread.name == "checkpoint-hash"]
