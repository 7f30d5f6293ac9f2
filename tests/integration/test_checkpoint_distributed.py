"""A checkpoint that fails on one rank (a full disk there) fails on all, at once, and replaces nothing."""

import errno

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slurmvision.trainer.distributed import free_port

pytestmark = pytest.mark.integration


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

        module._save = full_disk
    try:
        manager.save(2, {"w": torch.zeros(3)}, {"rank": rank}, {"step": 2, "epoch": 0})
        outcomes.put((rank, "saved"))
    except CheckpointError as err:
        outcomes.put((rank, str(err)))
    dist.destroy_process_group()


def test_one_ranks_full_disk_fails_every_rank_without_a_hang(tmp_path):
    context = mp.get_context("spawn")
    outcomes = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, port, str(tmp_path), outcomes)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(outcomes.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert "No space left on device on this rank" in results[1]
    assert "failed on 1 other rank" in results[0] and "step-00000001 is still the newest" in results[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
