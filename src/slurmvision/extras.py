"""Optional dependencies (pyproject's extras): a clear message where one is needed and missing.

Looked up without importing them (`importlib.util.find_spec`), so the login node stays torch-free.
"""

from __future__ import annotations

import importlib.util

from slurmvision.errors import ConfigError


def require_engine(engine: str) -> None:
    """Raise a ConfigError saying what to install if `trainer.engine` needs a package this interpreter lacks.
    Called where the engine is chosen, and on the login node before a job that runs this interpreter is submitted."""
    if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "trainer.engine=deepspeed needs DeepSpeed, which is not installed here: "
            "pip install 'slurmvision[deepspeed]' (after torch: its build imports torch), "
            "or use trainer.engine=ddp"
        )


def require_engine_for_jobs(config) -> None:
    """`require_engine` on the login node, unless the jobs run another interpreter (a container or
    `cluster.python`), whose packages this one cannot see: the job then checks for itself."""
    if not (config.cluster.container.runtime or config.cluster.python):
        require_engine(config.trainer.engine)
