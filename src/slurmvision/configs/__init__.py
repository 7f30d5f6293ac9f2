"""Typed configs: dataclass sections, YAML recipes, cluster profiles, dotted overrides."""

from slurmvision.configs.cluster import ClusterConfig
from slurmvision.configs.data import DataConfig
from slurmvision.configs.loader import (
    config_hash,
    from_dict,
    from_stored,
    load_cluster,
    load_config,
    load_run_config,
    load_saved_config,
    save_config,
    to_dict,
    to_yaml,
)
from slurmvision.configs.model import DistillConfig, ModelConfig
from slurmvision.configs.schema import Config, RunConfig
from slurmvision.configs.training import OptimConfig, TrainerConfig

__all__ = [
    "ClusterConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainerConfig",
    "config_hash",
    "from_dict",
    "from_stored",
    "load_cluster",
    "load_config",
    "load_run_config",
    "load_saved_config",
    "save_config",
    "to_dict",
    "to_yaml",
]
