"""Pretrained weights (`model.pretrained=true`): fetched once on the login node, read from disk by the ranks.

`launch` calls `fetch` before submitting: it finds timm's weights for the model in the cache
(`model.cache_dir`, default the Hugging Face cache, HF_HUB_CACHE) or downloads them there. The
ranks call `timm_kwargs`, which only looks in that cache and hands timm the file
(`pretrained_cfg_overlay=dict(file=...)`): 64 ranks never download the same file at job start,
and clusters whose compute nodes have no network work. The jobs run with HF_HUB_OFFLINE=1
(slurmvision.slurm.executor). `model.pretrained_file` skips all of it: that file is loaded.

The cache must be on a filesystem the compute nodes share (and, in a container, a mounted one).
Torch-free at import; timm (and so torch) is imported only when a model wants pretrained weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from slurmvision.configs.model import ModelConfig
from slurmvision.errors import ConfigError

# timm's own order: a safetensors file when the repository has one, else the pickled state dict.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Source:
    """Where timm would download a model's weights from: a Hugging Face repository or a URL."""

    name: str
    repo: Optional[str] = None  # "timm/resnet18.a1_in1k", optionally "@revision"
    filenames: tuple[str, ...] = HUB_FILES
    url: Optional[str] = None


def source(name: str) -> Source:
    """The source of timm's default weights for `name` (a model name, with or without a pretrained tag)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as err:
        raise ConfigError(f"model.name={name!r}: {err}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(
            f"timm has no pretrained weights for model.name={name!r}: set model.pretrained_file to a "
            "weights file, or model.pretrained=false"
        )
    if cfg.hf_hub_id:
        return Source(name, repo=cfg.hf_hub_id, filenames=(cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES)
    return Source(name, url=cfg.url)


def _url_file(src: Source, cache_dir: Optional[str]) -> Path:
    from timm.models._hub import get_cache_dir

    return Path(cache_dir or get_cache_dir()) / os.path.basename(urlparse(src.url).path)


def cached(src: Source, cache_dir: Optional[str]) -> Optional[Path]:
    """The weights file already in the cache, without asking the network; None if there is none."""
    if src.url:
        path = _url_file(src, cache_dir)
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = src.repo.partition("@")
    for filename in src.filenames:
        try:
            return Path(
                hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir, local_files_only=True)
            )
        except LocalEntryNotFoundError:
            continue
    return None


def download(src: Source, cache_dir: Optional[str]) -> Path:
    """Download the weights into the cache (the login node's one network access for them)."""
    if src.url:
        from timm.models._hub import download_cached_file

        return Path(download_cached_file(src.url, cache_dir=cache_dir))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    repo, _, revision = src.repo.partition("@")
    for filename in src.filenames[:-1]:
        try:
            return Path(
                hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir, library_name="timm")
            )
        except RemoteEntryNotFoundError:
            continue
    return Path(
        hf_hub_download(repo, src.filenames[-1], revision=revision or None, cache_dir=cache_dir, library_name="timm")
    )


def _offline_hint(src: Source, cache_dir: Optional[str]) -> str:
    if src.repo:
        get = f"`hf download {src.repo.partition('@')[0]}" + (f" --cache-dir {cache_dir}`" if cache_dir else "`")
    else:
        get = f"download {src.url} into {cache_dir or 'the torch hub cache'}"
    return (
        f"compute nodes never download them: {get} on a machine with network access, then set "
        "model.cache_dir to that cache, or set model.pretrained_file to the weights file"
    )


def fetch(model: ModelConfig) -> Optional[Path]:
    """Login node, before submission: make sure the ranks will find the weights on disk; the file, or None
    when the model starts from random weights."""
    if not model.pretrained:
        return None
    if model.pretrained_file:
        if not Path(model.pretrained_file).is_file():
            raise ConfigError(
                f"model.pretrained_file={model.pretrained_file} does not exist: give a weights file "
                "(.safetensors, .pth, .bin)"
            )
        return Path(model.pretrained_file)
    src = source(model.name)
    path = cached(src, model.cache_dir)
    if path is not None:
        return path
    try:
        return download(src, model.cache_dir)
    except Exception as err:  # no network, a proxy, a refused repository: the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.pretrained=true: could not download the weights of {model.name} "
            f"({src.repo or src.url}): {reason}; {_offline_hint(src, model.cache_dir)}"
        ) from None


def timm_kwargs(model: ModelConfig) -> dict:
    """Ranks: timm.create_model arguments that load the weights from disk, never from the network."""
    if not model.pretrained:
        return {"pretrained": False}
    path = Path(model.pretrained_file) if model.pretrained_file else None
    if path is None:
        src = source(model.name)
        path = cached(src, model.cache_dir)
        if path is None:
            raise ConfigError(
                f"model.pretrained=true: the weights of {model.name} are not in the cache "
                f"{model.cache_dir or '(the default Hugging Face cache)'} on this node; `slurmvision "
                f"launch` fetches them on the login node into a cache the compute nodes must share; "
                f"{_offline_hint(src, model.cache_dir)}"
            )
    elif not path.is_file():
        raise ConfigError(f"model.pretrained_file={path} does not exist on this node: put it on a shared filesystem")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
