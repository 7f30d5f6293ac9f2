import os
import subprocess

import pytest

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    """The local cluster from `make slurm-up`. In CI its absence is a failure, elsewhere a skip."""
    try:
        ok = (
            bool(os.environ.get("SLURM_CONF"))
            and subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        message = "no Slurm cluster: run `make slurm-up` and export the SLURM_CONF it prints"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def in_its_group(request, worker_id):
    """Tests that share Slurm nodes must run one after another (`make test`: --dist loadgroup). pytest-xdist
    groups them by renaming node ids, which some pytest versions ignore: then say so instead of racing."""
    if worker_id != "master" and request.config.getvalue("dist") == "loadgroup" and "@" not in request.node.nodeid:
        pytest.fail("pytest-xdist did not group this Slurm test (xdist_group); use the pinned pytest (<9)")


@pytest.fixture(scope="session")
def straight_sha(tiny_shards, tmp_path_factory, worker_id):  # noqa: F811
    """params_sha256 of an uninterrupted 2-rank run with the LONGER settings, trained once for the
    whole session: the pytest-xdist workers (make test) share it through their common folder."""
    from filelock import FileLock

    from slurmvision.evaluate.inspect import inspect_checkpoint
    from slurmvision.launch.local import train_here

    from .test_train_on_slurm import LONGER, SETTINGS

    def train() -> str:
        run_dir = tmp_path_factory.mktemp("straight")
        train_here(tiny_config(tiny_shards, run_dir, *SETTINGS, *LONGER), nproc=2)
        return inspect_checkpoint(run_dir)["params_sha256"]

    if worker_id == "master":  # no workers
        return train()
    shared = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    with FileLock(str(shared / "straight.lock")):
        cached = shared / "straight.sha256"
        if not cached.is_file():
            cached.write_text(train())  # tiny_shards are built alike in every worker: same samples
        return cached.read_text()
