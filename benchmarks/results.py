"""RESULTS.md, shared by the benchmarks: each owns one `## ` section and replaces only it."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str) -> None:
    """Put `text` (starting with its `## ` heading) in place of that section, or append it."""
    heading = text.splitlines()[0]
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    head, _, rest = old.partition(heading)
    tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
    path.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail)
