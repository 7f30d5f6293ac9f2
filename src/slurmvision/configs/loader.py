"""Load recipes and cluster profiles, apply dotted overrides, validate, save.

Precedence, lowest first: the dataclass defaults, the cluster profile, the recipe, the
command-line overrides. OmegaConf does the merging and type checks; its errors are turned
into one-line `ConfigError`s that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slurmvision.configs.schema import ClusterConfig, Config
from slurmvision.errors import ConfigError

CONFIG_FILE = "config.yaml"
# The recipes shipped in the repository, found relative to this source tree.
_REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def search_path() -> list[Path]:
    """Where recipe and profile names are looked up: $SLURMVISION_CONFIG_PATH, ./configs, the repo's."""
    extra = [Path(p) for p in os.environ.get("SLURMVISION_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "configs", _REPO_CONFIGS]


def _available(subdir: str) -> list[str]:
    names = set()
    for base in search_path():
        if (base / subdir).is_dir():
            names.update(p.stem for p in (base / subdir).glob("*.yaml"))
    return sorted(names)


def find_yaml(name_or_path: str, subdir: str, what: str) -> Path:
    """A path to an existing YAML file, or a name looked up in the search path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if path.is_file():
            return path
        raise ConfigError(f"{what} file {name_or_path} does not exist: give an existing path or a name from {', '.join(_available(subdir)) or '(none)'}")
    for base in search_path():
        candidate = base / subdir / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    names = _available(subdir)
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown {what} {name_or_path!r}: {hint}available: {', '.join(names) or '(none)'}; or give a path to a .yaml file")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, ...), not {type(data).__name__}")
    return data


def _valid_keys(full_key: str) -> list[str]:
    """The valid field names at the level of `full_key` (e.g. 'optim.lrr' -> OptimConfig's fields)."""
    node: Any = Config
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    message = str(err).splitlines()[0]
    if "not in" in message or "Key '" in message and "not" in message:
        valid = _valid_keys(key)
        close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        return ConfigError(f"unknown key {key!r} in {source}: {hint}valid keys here: {', '.join(valid)}")
    return ConfigError(f"bad value for {key or 'config'} in {source}: {message}")


def _merge(base, update: dict | Any, source: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _config_error(err, source) from None


def load_config(
    recipe: str | Path,
    overrides: Iterable[str] = (),
    *,
    cluster: Optional[str] = None,
    run_dir: Optional[str | Path] = None,
) -> Config:
    """The validated config for a recipe (name or path), a cluster profile and overrides."""
    recipe_path = find_yaml(str(recipe), "", "recipe") if not Path(str(recipe)).is_file() else Path(recipe)
    merged = OmegaConf.structured(Config)
    recipe_data = _read_yaml(recipe_path)
    # A saved run config carries its cluster; a --cluster profile given now replaces it.
    merged = _merge(merged, {"cluster": recipe_data.pop("cluster", {})}, str(recipe_path))
    if cluster is not None:
        profile_path = find_yaml(cluster, "clusters", "cluster profile")
        profile = _read_yaml(profile_path)
        merged.cluster = OmegaConf.structured(ClusterConfig)
        merged = _merge(merged, {"cluster": {"name": profile_path.stem, **profile}}, str(profile_path))
    merged = _merge(merged, recipe_data, str(recipe_path))
    merged.run.name = recipe_path.stem if merged.run.name == "run" else merged.run.name
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise _config_error(err, "the command line") from None
        key = item.split("=", 1)[0]
        current = OmegaConf.select(merged, key, default=None)
        if OmegaConf.is_dict(OmegaConf.select(dotlist, key)) and OmegaConf.is_dict(current) \
                and OmegaConf.get_type(current) is dict:
            # `key={...}` replaces a free-form mapping (e.g. a recipe's model.kwargs for another model).
            OmegaConf.update(merged, key, {}, merge=False)
        merged = _merge(merged, dotlist, "the command line")
    if run_dir is not None:
        merged.run.dir = str(run_dir)
    return to_config(merged)


def to_config(node) -> Config:
    """Run the value checks (`__post_init__`) on a merged config."""
    if OmegaConf.is_missing(node.data, "root"):
        raise ConfigError("data.root is not set: point it at a shards directory, e.g. data.root=/path/to/shards")
    if OmegaConf.is_missing(node.run, "dir"):
        node.run.dir = str(Path("runs") / node.run.name)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise _config_error(err, "the config") from None


def to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Config, directory: str | Path) -> Path:
    """Write the resolved config as `config.yaml` atomically."""
    path = Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)
    return path


def from_dict(data: dict, source: str = "saved config") -> Config:
    return to_config(_merge(OmegaConf.structured(Config), data, source))


def load_saved_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a slurmvision run directory (no {CONFIG_FILE}); start one with `slurmvision launch` or `train`")
    return from_dict(_read_yaml(path), str(path))


def load_cluster(name: str) -> ClusterConfig:
    path = find_yaml(name, "clusters", "cluster profile")
    merged = _merge(OmegaConf.structured(ClusterConfig), {"name": path.stem, **_read_yaml(path)}, str(path))
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, str(path)) from None
