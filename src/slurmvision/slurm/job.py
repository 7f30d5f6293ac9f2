"""The callable submitit runs in every task: load the run's config, train.

It is pickled by reference on the login node, so this module must stay free of torch
imports; the trainer is imported when the job starts on the compute node.
"""

from __future__ import annotations

from pathlib import Path


class TrainJob:
    def __init__(self, run_dir: str):
        self.run_dir = str(Path(run_dir).resolve())

    def __call__(self) -> dict:
        from slurmvision.configs import load_saved_config
        from slurmvision.trainer.loop import train

        return train(load_saved_config(self.run_dir))
