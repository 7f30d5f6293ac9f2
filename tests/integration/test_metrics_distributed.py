"""Metrics summed across 2 real gloo ranks equal the metrics of all the data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slurmvision.evaluate.metrics import ClassificationMetrics
from slurmvision.trainer.distributed import free_port

pytestmark = pytest.mark.integration


def _rank(rank, port, logits, targets, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = ClassificationMetrics(4)
        metrics.update(logits[rank::2], targets[rank::2])  # 11 and 10 samples: the halves differ in size
        metrics.all_reduce()
        out[rank] = metrics.compute()
    finally:
        dist.destroy_process_group()


def test_all_reduce_gives_global_metrics():
    torch.manual_seed(0)
    logits, targets = torch.randn(21, 4), torch.randint(0, 4, (21,))
    expected = ClassificationMetrics(4)
    expected.update(logits, targets)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), logits, targets, out), nprocs=2)
        results = dict(out)
    assert results[0] == results[1] == expected.compute()
    assert results[0]["samples"] == 21
