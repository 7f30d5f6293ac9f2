"""Slurm host lists (`gpu[001-004,010]`, `a[1-2]-b[1-4]`, `n1,m[3-4]`) expanded to host names.

As `scontrol show hostnames` expands them (the Slurm tests check the two agree), without
asking Slurm: a job's ranks need it at start and the login side in its decisions. Torch-free.
"""

from __future__ import annotations

import itertools
import re

from slurmvision.errors import ClusterError

_PART = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ClusterError(f"invalid Slurm host list {nodelist!r}: unbalanced brackets")
    if depth:
        raise ClusterError(f"invalid Slurm host list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range(text: str, nodelist: str) -> list[str]:
    """'001-004,010' -> ['001', '002', '003', '004', '010']: a range keeps its lower bound's width."""
    out = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or high and not high.isdigit():
            raise ClusterError(f"invalid Slurm host list {nodelist!r}: {part!r} is not a number or a range")
        if not high:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ClusterError(f"invalid Slurm host list {nodelist!r}: range {part!r} runs backwards")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return out


def expand(nodelist: str) -> list[str]:
    """Every host of a Slurm host list, in Slurm's order; several bracket groups in one name
    expand as their product (`a[1-2]-b[1-2]`: a1-b1, a1-b2, a2-b1, a2-b2)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        choices = []
        for bracket, text in (m.groups() for m in _PART.finditer(item)):
            choices.append(_expand_range(bracket, nodelist) if bracket is not None else [text])
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts
