"""Describe shards: samples per split and class, image sizes and formats, bytes. Reads no pixels."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from slurmvision.shards.manifest import Manifest
from slurmvision.shards.tario import IMAGE_EXTS, ShardFile


def shard_stats(directory: str | Path) -> dict:
    directory = Path(directory)
    manifest = Manifest.load(directory)
    result = {"classes": len(manifest.classes), "splits": {}}
    for split, totals in manifest.splits.items():
        per_class, formats, widths, heights = Counter(), Counter(), [], []
        for info in manifest.shards_for(split):
            shard = ShardFile(str(directory / info.name))
            index = shard.index()
            for members in index.members:
                if "json" in members:
                    meta = json.loads(shard.read(*members["json"]))
                    per_class[meta["class"]] += 1
                    widths.append(meta["width"])
                    heights.append(meta["height"])
                formats.update(ext for ext in members if ext in IMAGE_EXTS)
            shard.close()

        def spread(values: list[int]) -> dict:
            return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}

        result["splits"][split] = {
            **totals, "per_class": {name: per_class[name] for name in manifest.classes},
            "width": spread(widths), "height": spread(heights), "formats": dict(sorted(formats.items())),
        }
    return result
