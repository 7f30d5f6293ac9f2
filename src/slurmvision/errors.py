"""The one error family for failures a user can cause and fix.

The CLI prints their message (one line: what went wrong and how to fix it) and exits non-zero
without a traceback. Programming errors are not wrapped: they raise normally.
"""


class SlurmVisionError(Exception):
    exit_code = 2


class ConfigError(SlurmVisionError):
    """A recipe, profile or override that does not validate."""


class DataError(SlurmVisionError):
    """Missing, malformed or corrupt data (image folders, shards, manifests)."""


class ClusterError(SlurmVisionError):
    """Slurm is unreachable or refuses the job."""


class CheckpointError(SlurmVisionError):
    """No usable checkpoint, or a checkpoint that does not match the config."""


class RunError(SlurmVisionError):
    """A run directory that is missing or not a slurmvision run."""
