"""Slurm: executors from cluster profiles, the job callable, cluster queries. No torch at import."""
