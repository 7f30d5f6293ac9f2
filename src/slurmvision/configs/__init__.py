"""Typed configs: dataclass sections, YAML recipes, cluster profiles, dotted overrides."""

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
from slurmvision.configs.schema import (
    ClusterConfig,
    Config,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
)

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
