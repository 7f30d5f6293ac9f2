"""Load recipes and cluster profiles, apply dotted overrides, validate, save.

Precedence, lowest first: the dataclass defaults, the cluster profile, the recipe (its
`cluster:` keys too), the command-line overrides. OmegaConf does the merging and type checks;
its errors are turned into one-line `ConfigError`s that name the key and suggest the closest
valid one.

YAML text (recipes, profiles, saved configs, override values) is read by the YAML 1.2 core
schema, and a value for a text field is the text as written. Text may use OmegaConf's
`${key}` interpolation, and `\\${` for a literal `${`; once loaded, a config's text is data:
`to_dict` gives it as it is and `from_dict` takes it as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, OmegaConfBaseException

from slurmvision.configs.cluster import ClusterConfig
from slurmvision.configs.compare import flatten
from slurmvision.configs.schema import Config
from slurmvision.errors import ConfigError

CONFIG_FILE = "config.yaml"
# The recipes and cluster profiles shipped with the package (package data: a wheel carries them).
PACKAGED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def search_path() -> list[Path]:
    """Where recipe and profile names are looked up, the user's first: $SLURMVISION_CONFIG_PATH,
    ./configs, then the recipes shipped with the package."""
    extra = [Path(p) for p in os.environ.get("SLURMVISION_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, Path.cwd() / "configs", PACKAGED_RECIPES]


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
        raise ConfigError(
            f"{what} file {name_or_path} does not exist: give an existing path or a name from "
            f"{', '.join(_available(subdir)) or '(none)'}"
        )
    for base in search_path():
        candidate = base / subdir / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    names = _available(subdir)
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown {what} {name_or_path!r}: {hint}available: {', '.join(names) or '(none)'}; "
        "or give a path to a .yaml file"
    )


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `on`/`yes`/`no` are booleans, `012345` is octal and `1:30:00` a
    base-60 number (`partition: on` became 'True'); this loader resolves plain scalars by YAML 1.2's
    core schema: booleans are true/false, integers decimal, 0o octal or 0x hex, no timestamps."""

    yaml_implicit_resolvers: dict = {}


for _tag, _pattern, _first in [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+.0123456789"),
    ),
    ("merge", r"<<", ["<"]),
]:
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), _first)
_Yaml12Loader.add_constructor(  # PyYAML's own reads a leading 0 as octal
    "tag:yaml.org,2002:int",
    lambda loader, node: int(text := loader.construct_scalar(node), {"0o": 8, "0x": 16}.get(text[:2], 10)),
)


class _Dumper(yaml.SafeDumper):
    """Quotes text that YAML 1.1 or 1.2 would read as something else: a saved config reads back the
    same here and in other tools."""


for _first, _resolvers in _Yaml12Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _regexp, [_first])

_hints = functools.cache(typing.get_type_hints)  # resolves the schema's `from __future__` annotations


def _unwrap(kind: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def _schema_type(key: str) -> Any:
    """The schema's type for a dotted key ('cluster.partition' -> Optional[str]); Any where it says none."""
    kind: Any = Config
    for part in key.split("."):
        kind = _unwrap(kind)
        kind = _hints(kind).get(part, Any) if dataclasses.is_dataclass(kind) else Any
    return kind


def _construct(loader: yaml.Loader, node: yaml.Node, kind: Any) -> Any:
    """The value of a YAML node meant for a value of type `kind`: as YAML 1.2 reads it, but for a text
    field the text as written (`account: 012345` stays '012345')."""
    kind = _unwrap(kind)
    if isinstance(node, yaml.ScalarNode) and kind is str and node.tag != "tag:yaml.org,2002:null":
        return node.value
    if isinstance(node, yaml.MappingNode) and dataclasses.is_dataclass(kind):
        loader.flatten_mapping(node)  # `<<: *anchor` merge keys
        pairs = [(loader.construct_object(k), v) for k, v in node.value]
        return {k: _construct(loader, v, _hints(kind).get(k, Any)) for k, v in pairs}
    if isinstance(node, yaml.SequenceNode) and typing.get_origin(kind) is list:
        return [_construct(loader, item, typing.get_args(kind)[0]) for item in node.value]
    return loader.construct_object(node, deep=True)


def _parse_yaml(text: str, kind: Any) -> Any:
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _construct(loader, node, kind)
    finally:
        loader.dispose()


def _read_yaml(path: Path, kind: type) -> dict:
    try:
        data = _parse_yaml(path.read_text(), kind) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, ...), not {type(data).__name__}")
    return data


def _literal(tree: Any) -> Any:
    """`tree` with `${` escaped, so that OmegaConf takes its text as it is (a setup line's `${HOME}`
    is the shell's, and a stored config is data)."""
    if isinstance(tree, dict):
        return {key: _literal(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_literal(value) for value in tree]
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", tree) if isinstance(tree, str) else tree


def _valid_keys(full_key: str) -> list[str]:
    """The valid field names at the level of `full_key` (e.g. 'optim.lrr' -> OptimConfig's fields)."""
    parent = _unwrap(_schema_type(full_key.rsplit(".", 1)[0])) if "." in full_key else Config
    return [f.name for f in dataclasses.fields(parent)] if dataclasses.is_dataclass(parent) else []


def _config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    message = str(err).splitlines()[0]
    if "not in" in message or "Key '" in message and "not" in message:
        valid = _valid_keys(key)
        close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        return ConfigError(f"unknown key {key!r} in {source}: {hint}valid keys here: {', '.join(valid)}")
    if isinstance(err, (InterpolationResolutionError, GrammarParseError)):
        message += (
            "; ${...} names another key of the config (e.g. ${run.name}): let the shell expand an environment "
            "variable ($HOME outside single quotes), and write \\${ for a literal ${"
        )
    return ConfigError(f"bad value for {key or 'config'} in {source}: {message}")


def _merge(base, update: dict | Any, source: str):
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise _config_error(err, source) from None


def _profile(name: str) -> tuple[Path, dict]:
    """A cluster profile's path and keys, named after its file."""
    path = find_yaml(name, "clusters", "cluster profile")
    return path, {"name": path.stem, **_read_yaml(path, ClusterConfig)}


def _override(merged, item: str):
    """`merged` with one `key=value` of the command line, its value read as a recipe's would be."""
    key, is_set, text = item.partition("=")
    if not is_set:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
    if "[" in key:  # OmegaConf would fail to merge a list with the mapping it makes of the index
        raise ConfigError(f"override {item!r}: give the list whole, e.g. {key.split('[')[0]}=[...]")
    try:
        value = _parse_yaml(text, _schema_type(key))
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {item!r} is not valid YAML ({getattr(err, 'problem', None) or err}): close its "
            f"brackets, or put text in YAML quotes inside the shell's: '{key}=\"...\"'"
        ) from None
    try:
        update = OmegaConf.create()
        OmegaConf.update(update, key, value)
        current = OmegaConf.select(merged, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, dict) and OmegaConf.is_dict(current) and OmegaConf.get_type(current) is dict:
            # `key={...}` replaces a free-form mapping (e.g. a recipe's model.kwargs for another model).
            OmegaConf.update(merged, key, {}, merge=False)
    except OmegaConfBaseException as err:
        raise _config_error(err, "the command line") from None
    return _merge(merged, update, "the command line")


def load_config(
    recipe: str | Path,
    overrides: Iterable[str] = (),
    *,
    cluster: Optional[str] = None,
    run_dir: Optional[str | Path] = None,
) -> Config:
    """The validated config for a recipe (name or path), a cluster profile and overrides; every command
    that takes them (config show, launch, train) merges them here."""
    recipe_path = find_yaml(str(recipe), "", "recipe") if not Path(str(recipe)).is_file() else Path(recipe)
    return _resolve(recipe_path, _read_yaml(recipe_path, Config), overrides, cluster, run_dir)


def load_run_config(run_dir: str | Path, overrides: Iterable[str] = (), *, cluster: Optional[str] = None) -> Config:
    """A run's saved config (RUN/config.yaml) with overrides, for `slurmvision resume`. A cluster profile
    given here replaces the saved `cluster:` section (a recipe's would win over it)."""
    path = _saved_config_path(run_dir)
    saved = _read_yaml(path, Config)
    if cluster is not None:
        saved.pop("cluster", None)
    return _resolve(path, saved, overrides, cluster, run_dir)


def _resolve(
    source: Path, recipe: dict, overrides: Iterable[str], cluster: Optional[str], run_dir: Optional[str | Path]
) -> Config:
    """Merge, lowest first: the defaults, the cluster profile, the recipe, the overrides; then validate."""
    # The run is named after the recipe unless the recipe names it.
    merged = _merge(OmegaConf.structured(Config), {"run": {"name": source.stem}}, str(source))
    if cluster is not None:
        profile_path, profile = _profile(cluster)
        merged = _merge(merged, {"cluster": profile}, str(profile_path))
    # After the profile: a recipe's (or a saved run config's) `cluster:` keys win over the profile's.
    merged = _merge(merged, recipe, str(source))
    for item in overrides:
        merged = _override(merged, item)
    if run_dir is not None:
        merged.run.dir = str(run_dir)
    return to_config(merged)


def to_config(node) -> Config:
    """Run the value checks (`__post_init__`) on a merged config."""
    if OmegaConf.is_missing(node.data, "root"):
        if not node.data.synthetic:
            raise ConfigError("data.root is not set: point it at a shards directory, e.g. data.root=/path/to/shards")
        node.data.root = ""  # synthetic batches, no shards: labels from data.synthetic_classes
    try:
        if OmegaConf.is_missing(node.run, "dir"):
            node.run.dir = str(Path("runs") / node.run.name)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise _config_error(err, "the config") from None


def to_dict(config: Config) -> dict:
    """The config as plain data, its text as it is (OmegaConf would read a `${` in it again)."""
    return dataclasses.asdict(config)


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def to_yaml(config: Config) -> str:
    """The config as YAML that reads back, as a recipe or a saved config, to the same config."""
    return yaml.dump(_literal(to_dict(config)), Dumper=_Dumper, sort_keys=False)


def save_config(config: Config, directory: str | Path) -> Path:
    """Write the resolved config as `config.yaml` atomically."""
    path = Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)
    return path


def from_dict(data: dict, source: str = "saved config") -> Config:
    """The config of `to_dict`'s data, its text taken as it is."""
    return to_config(_merge(OmegaConf.structured(Config), _literal(data), source))


def from_stored(data: dict, source: str, data_root: Optional[str] = None) -> Config:
    """The config stored in a checkpoint, maybe of someone else's run: data, which runs no command. A
    `pipe:` URL in it (data.root) would run one when the shards are opened, so it is refused; a data root
    given by the user (`eval --data`, `export --data-root`; a pipe: command too) replaces the stored one."""
    stored = {key: value for key, value in flatten(data).items() if data_root is None or key != "data.root"}
    pipes = [f"{key}={value!r}" for key, value in stored.items() if str(value).startswith("pipe:")]
    if pipes:
        raise ConfigError(
            f"{source} stores {', '.join(pipes)}, a shell command, and a checkpoint's config runs none: "
            "give the shards to read yourself (eval --data, export --data-root)"
        )
    if data_root is not None:
        data = {**data, "data": {**data.get("data", {}), "root": data_root}}
    return from_dict(data, source)


def _saved_config_path(run_dir: str | Path) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a slurmvision run directory (no {CONFIG_FILE}); start one with "
            "`slurmvision launch` or `train`"
        )
    return path


def load_saved_config(run_dir: str | Path) -> Config:
    path = _saved_config_path(run_dir)
    return to_config(_merge(OmegaConf.structured(Config), _read_yaml(path, Config), str(path)))


def load_cluster(name: str) -> ClusterConfig:
    path, profile = _profile(name)
    merged = _merge(OmegaConf.structured(ClusterConfig), profile, str(path))
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, str(path)) from None
