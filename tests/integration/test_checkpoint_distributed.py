"""A checkpoint that fails on one rank (a full disk there) fails on all, at once, and replaces nothing; ranks
that see the checkpoints differently resume from the one rank 0 chose, or all stop with one message."""

import errno

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slurmvision.trainer.distributed import free_port

pytestmark = pytest.mark.integration


def on_two_ranks(target, *args, outcomes_per_rank: int = 1) -> dict[int, list]:
    """`target(rank, port, *args, outcomes)` in two spawned processes; what each rank put in `outcomes`."""
    context = mp.get_context("spawn")
    outcomes = context.Queue()
    port = free_port()
    procs = [context.Process(target=target, args=(r, port, *args, outcomes)) for r in range(2)]
    for p in procs:
        p.start()
    results = {0: [], 1: []}
    for _ in range(2 * outcomes_per_rank):
        rank, outcome = outcomes.get(timeout=120)
        results[rank].append(outcome)
    for p in procs:
        p.join(timeout=30)
    return results


def _rank(rank: int, port: int, directory: str, outcomes) -> None:
    from slurmvision.errors import CheckpointError
    from slurmvision.trainer import checkpoint as module
    from slurmvision.trainer.checkpoint import CheckpointManager
    from slurmvision.trainer.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    manager = CheckpointManager(directory, DistEnv(rank=rank, world_size=2), keep=2)
    manager.save(1, {"w": torch.ones(3)}, {"rank": rank}, {"step": 1, "epoch": 0})
    if rank == 1:

        def full_disk(obj, path):
            raise OSError(errno.ENOSPC, "No space left on device")

        module.save_file = full_disk
    try:
        manager.save(2, {"w": torch.zeros(3)}, {"rank": rank}, {"step": 2, "epoch": 0})
        outcomes.put((rank, "saved"))
    except CheckpointError as err:
        outcomes.put((rank, str(err)))
    dist.destroy_process_group()


def test_one_ranks_full_disk_fails_every_rank_without_a_hang(tmp_path):
    results = {rank: outcome for rank, (outcome,) in on_two_ranks(_rank, str(tmp_path)).items()}
    assert "No space left on device on this rank" in results[1]
    assert "failed on 1 other rank" in results[0] and "step-00000001 is still the newest" in results[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def _resume_rank(rank: int, port: int, views: list, outcomes) -> None:
    from slurmvision.errors import CheckpointError
    from slurmvision.trainer.checkpoint import CheckpointManager
    from slurmvision.trainer.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for view in views:
        try:
            resumed = CheckpointManager(view[rank], DistEnv(rank=rank, world_size=2), keep=3).resume()
            outcomes.put((rank, (resumed.checkpoint.step, float(resumed.shared["w"][0]))))
        except CheckpointError as err:
            outcomes.put((rank, str(err)))
    dist.destroy_process_group()


def test_every_rank_resumes_from_what_rank_0_chose_whatever_it_sees_itself(tmp_path):
    """Each rank reads its own copy of the checkpoints, as on node-local disks, or through an NFS
    client whose cached listing lags."""
    from slurmvision.trainer.checkpoint import CheckpointManager
    from slurmvision.trainer.distributed import DistEnv

    def checkpoints(name: str, *steps: int) -> str:
        manager = CheckpointManager(tmp_path / name, DistEnv(), keep=3)
        for step in steps:
            manager.save(step, {"w": torch.full((3,), float(step))}, {}, {"step": step, "epoch": 0, "world_size": 1})
        return str(tmp_path / name)

    newer_on_rank_1 = (checkpoints("a0", 1, 2), checkpoints("a1", 1, 2, 3))
    missing_on_rank_1 = (checkpoints("b0", 1, 2), checkpoints("b1", 1))
    results = on_two_ranks(_resume_rank, [newer_on_rank_1, missing_on_rank_1], outcomes_per_rank=2)
    assert results[0][0] == results[1][0] == (2, 2.0)
    assert "step-00000002, the newest valid checkpoint rank 0 sees: it failed on 1 other rank(s)" in results[0][1]
    assert "No such file or directory" in results[1][1] and "on this rank" in results[1][1]
    assert all("put it on a file system they share" in message for message in (results[0][1], results[1][1]))


def _background_rank(rank: int, port: int, directory: str, outcomes) -> None:
    """Background saves on 2 ranks: rank 1 writes slowly, then its disk fills up."""
    import time

    from slurmvision.errors import CheckpointError
    from slurmvision.trainer import checkpoint as module
    from slurmvision.trainer.async_checkpoint import AsyncCheckpointManager
    from slurmvision.trainer.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    manager = AsyncCheckpointManager(directory, DistEnv(rank=rank, world_size=2), keep=2)
    real_save = module.save_file

    def slow(obj, path):
        time.sleep(1.0)
        return real_save(obj, path)

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(step: int) -> None:
        manager.save_async(step, {"w": torch.full((3,), float(step))}, {"rank": rank}, {"step": step, "epoch": 0})

    module.save_file = slow if rank == 1 else real_save
    save(1)
    boundaries, settled = 1, manager.settle()
    while settled is None:  # the loop's step boundaries, while rank 1 still writes
        boundaries, settled = boundaries + 1, manager.settle()
    files = sorted(p.name for p in settled.path.iterdir())
    module.save_file = full_disk if rank == 1 else real_save
    save(2)
    failed = manager.settle(wait=True).error
    save(3)
    try:
        manager.settle(wait=True)
        stopped = None
    except CheckpointError as err:
        stopped = str(err)
    outcomes.put((rank, {"boundaries": boundaries, "files": files, "failed": failed, "stopped": stopped}))
    dist.destroy_process_group()


def test_a_background_save_commits_once_every_rank_wrote_and_a_failure_is_reported_on_every_rank(tmp_path):
    results = {rank: outcome for rank, (outcome,) in on_two_ranks(_background_rank, str(tmp_path)).items()}
    assert results[0]["boundaries"] == results[1]["boundaries"] > 1  # the ranks agreed, step by step
    assert results[0]["files"] == ["MANIFEST.json", "meta.json", "rank-00000.pt", "rank-00001.pt", "state.pt"]
    assert "No space left on device on this rank" in results[1]["failed"]
    assert "failed on 1 other rank" in results[0]["failed"]
    for outcome in results.values():
        assert "step-00000001 is still the newest" in outcome["failed"] and "training goes on" in outcome["failed"]
        assert "2 background checkpoints failed in a row" in outcome["stopped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
