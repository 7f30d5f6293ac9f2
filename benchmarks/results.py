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


def write_figures(path: Path, key: str, figures: dict) -> None:
    """Put `figures` under `key` of the JSON file at `path`, keeping the other benchmarks' keys; keys
    sorted and one value a line, so that a change in speed shows in a diff. Written as tmp + rename."""
    import json
    import os

    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = figures
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def machine() -> dict:
    """Where and when a benchmark ran: CPU cores, load, torch version, date."""
    import os
    import platform
    import time

    import torch

    return {
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def publish(figures: dict, report, results: Path | None, json_path: Path | None, key: str) -> None:
    """The end of every benchmark: the load at the end and the exact command go into `figures`, the
    text `report(figures, command)` makes goes to `results` (its section) and stdout, `figures` to
    `json_path` under `key`."""
    import os
    import sys

    figures["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    figures["command"] = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    text = report(figures, figures["command"])
    if results:
        write_section(results, text)
    if json_path:
        write_figures(json_path, key, figures)
    print(text)


class WatchedBatches:
    """The trainer's batches (trainer.prefetch.DeviceBatches) passed through, with each wait for the
    next one reported as `on_wait(started, ended)` read from `clock`; other attributes passed on."""

    def __init__(self, batches, on_wait, clock=None):
        import time

        self.batches, self.on_wait, self.clock = batches, on_wait, clock or time.perf_counter

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def __iter__(self):
        return self

    def __next__(self):
        started = self.clock()
        try:
            return next(self.batches)
        finally:
            self.on_wait(started, self.clock())
