"""Describe shards: samples per split and class, image sizes and formats, bytes. Reads no pixels:
only tar headers and each sample's small `cls` and `json` members."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from slurmvision.errors import DataError
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.tario import IMAGE_EXTS, ShardFile


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def shard_stats(directory: str | Path) -> dict:
    """{"classes": N, "splits": {split: {samples, shards, bytes, per_class, width, height, formats}}}."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    result = {"classes": len(manifest.classes), "splits": {}}
    for split, totals in manifest.splits.items():
        per_class, formats, widths, heights = Counter(), Counter(), [], []
        for info in manifest.shards_for(split):
            shard = ShardFile(str(directory / info.name))
            try:
                index = shard.index()
                if index.error:
                    raise DataError(
                        f"shard {directory / info.name}: {index.error}; run `slurmvision shards verify "
                        f"{directory}` and rebuild the damaged shards"
                    )
                for members in index.members:
                    # The label (cls) is what training uses, so classes are counted from it.
                    if "cls" in members:
                        label = int(shard.read(*members["cls"]).decode().strip())
                        per_class[manifest.classes[label] if 0 <= label < len(manifest.classes) else str(label)] += 1
                    if "json" in members:
                        meta = json.loads(shard.read(*members["json"]))
                        if "width" in meta and "height" in meta:
                            widths.append(meta["width"])
                            heights.append(meta["height"])
                    formats.update(ext for ext in members if ext in IMAGE_EXTS)
            except (ValueError, OSError) as err:  # ValueError covers bad cls text and bad json
                raise DataError(
                    f"shard {directory / info.name} has an unreadable sample ({err}); run "
                    f"`slurmvision shards verify {directory}`"
                ) from None
            finally:
                shard.close()
        result["splits"][split] = {
            **totals,
            "per_class": {name: per_class.pop(name, 0) for name in manifest.classes} | dict(per_class),
            "width": _spread(widths),
            "height": _spread(heights),
            "formats": dict(sorted(formats.items())),
        }
    return result
