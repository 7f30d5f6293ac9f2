"""model.compile across attempts: the compiled graphs are kept in the run directory, so that a job
requeued on another node loads them instead of compiling again (a real torch.compile, on the CPU)."""

import re

import pytest

from slurmvision.launch.local import train_here

from .conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


def compile_lines(run_dir) -> list[tuple[float, int]]:
    """(seconds, graphs from the cache) of each 'compiled in' line of rank 0's log, in order."""
    log = (run_dir / "logs" / "rank-00000.log").read_text()
    found = re.findall(r"compiled in ([\d.]+)s \((\d+) graph\(s\) from the compile cache\)", log)
    return [(float(seconds), int(graphs)) for seconds, graphs in found]


def test_a_resumed_attempt_takes_its_compiled_graphs_from_the_run_directory(tiny_shards, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the ranks inherit this environment
    run_dir = tmp_path / "run"
    settings = ["model.compile=true", "trainer.checkpoint_every=2", "trainer.eval_every=0"]
    assert train_here(tiny_config(tiny_shards, run_dir, *settings, "trainer.max_steps=2"), nproc=1)["step"] == 2
    first = compile_lines(run_dir)
    assert first and first[0][1] == 0  # compiled from scratch
    assert any((run_dir / "cache" / "compile").rglob("*")), "the compile cache is in the run directory"

    longer = ["trainer.max_steps=4", "trainer.allow_config_change=true"]  # a second attempt that trains
    assert train_here(tiny_config(tiny_shards, run_dir, *settings, *longer), nproc=1)["step"] == 4
    resumed = compile_lines(run_dir)[len(first) :]
    assert resumed and resumed[0][1] >= 1, resumed  # the training graph came from the cache
