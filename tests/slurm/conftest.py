import os
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    """The local cluster from `make slurm-up`. In CI its absence is a failure, elsewhere a skip."""
    try:
        ok = bool(os.environ.get("SLURM_CONF")) and subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        message = "no Slurm cluster: run `make slurm-up` and export the SLURM_CONF it prints"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
