"""slurmvision: train vision models on Slurm with streaming shards and preemption-safe resume."""

__version__ = "0.1.0"
