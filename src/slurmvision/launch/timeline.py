"""`slurmvision status RUN --plot OUT.png`: a run's attempts as a timeline picture, from its ledger.

One horizontal bar per attempt over wall time, coloured by why it ended (the coordinator's cause,
else rank 0's outcome, else running), with the steps it trained written on or next to it. The
first attempt of each job is led by its wait in the queue (the job's submission to the attempt's
start), drawn light grey. An attempt still running reaches to now; one whose end the ledger lacks
(rank 0 died with its node, say) ends at rank 0's last record of it. For a sweep directory, one
group of rows per run on one time axis. Pillow only (a base dependency; no matplotlib, no torch):
it runs on the login node.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from slurmvision.errors import RunError
from slurmvision.launch.sweep import SWEEP_FILE
from slurmvision.slurm.causes import Cause, Outcome
from slurmvision.slurm.ledger import LEDGER_DIR, Ledger

RUNNING = "running"
# Kept apart for colour-blind readers (Okabe-Ito first); keyed by the values the ledger holds.
COLOURS: dict[str, tuple[int, int, int]] = {
    Cause.FINISHED: (0, 158, 115),
    Cause.TIME_LIMIT: (0, 114, 178),
    Cause.PREEMPTION: (230, 159, 0),
    Cause.REQUEUE: (86, 180, 233),
    Cause.USER_CANCEL: (150, 150, 150),
    Cause.NODE_FAILURE: (213, 94, 0),
    Cause.OOM: (204, 121, 167),
    Cause.CRASH: (170, 25, 45),
    Cause.UNKNOWN: (70, 70, 70),
    Outcome.STOPPED: (140, 110, 60),  # rank 0's word, where no coordinator gave a cause (local runs)
    Outcome.FAILED: (200, 40, 140),
    RUNNING: (117, 112, 179),
}
QUEUED = (222, 222, 222)
QUEUED_NAME = "queued (submitted to started)"
WIDTH = 1000
ROW_HEIGHT = 24  # rows shrink when there are more than MAX_ROWS_HIGH of them
MAX_ROWS_HIGH = 80
NICE_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


@dataclass
class Bar:
    """One attempt's row: its label, what it is coloured by, its span and what it trained."""

    label: str  # "#2 job 1234.1": the attempt's number and its JOB.RESTART, as status lists them
    kind: str  # a key of COLOURS
    start: Optional[float]  # None: the ledger has no start of it (the job died before training)
    end: Optional[float]
    queued: Optional[float] = None  # its job's submission, for the first attempt of a job
    text: str = ""
    lost: int = 0  # steps trained past the checkpoint the next attempt resumed from


@dataclass
class Group:
    """The rows of one run: a sweep has one group per run, with its name above its rows."""

    name: Optional[str]
    bars: list[Bar] = field(default_factory=list)
    note: str = ""  # said instead of bars: no attempts yet, a ledger that cannot be read


def attempt_bars(ledger: Ledger, now: float) -> list[Bar]:
    """The ledger's attempts, oldest first, as bars."""
    attempts, jobs = ledger.attempts(), ledger.jobs()
    newest = max((a["started"] for a in attempts if a["started"] is not None), default=None)
    queued = _queue_waits(attempts, jobs)
    bars = []
    for number, a in enumerate(attempts, 1):
        kind = a["cause"] or a["outcome"] or (RUNNING if a["started"] is not None and a["started"] == newest else "")
        kind = kind if kind in COLOURS else Cause.UNKNOWN
        end = a["ended"] or (now if kind == RUNNING else a["last_seen"])
        text = "no start recorded" if a["step_start"] is None else f"steps {a['step_start']}-{a['step_reached']}"
        if a["lost_steps"]:
            text += f", {a['lost_steps']} lost"
        if a["started"] is not None and a["ended"] is None and kind != RUNNING:
            text += " (ends at its last record)"
        label = f"#{number} job {a['job_id']}.{a['restart']}"
        bars.append(Bar(label, kind, a["started"], end, queued.get(number - 1), text, a["lost_steps"] or 0))
    return bars


def _queue_waits(attempts: list[dict], jobs: list[dict]) -> dict[int, float]:
    """{index of the first attempt of a job: when the job was submitted}. An attempt belongs to the
    newest submission of its job id before its start (the ledger's rule for job ids Slurm reuses)."""
    submissions: dict[str, list[float]] = {}
    for job in jobs:
        submissions.setdefault(job["job_id"], []).append(job["submitted"])
    first: dict[tuple[str, float], tuple[float, int]] = {}
    for index, a in enumerate(attempts):
        earlier = [t for t in submissions.get(a["job_id"], []) if a["started"] is not None and t <= a["started"]]
        if earlier:
            key = (a["job_id"], max(earlier))
            first[key] = min(first.get(key, (math.inf, -1)), (a["started"], index))
    return {index: submitted for (_, submitted), (_, index) in first.items()}


def _run_bars(run_dir: Path, now: float) -> list[Bar]:
    ledger = Ledger(run_dir)
    try:
        if ledger.dir.is_dir():
            os.listdir(ledger.dir)  # an unreadable directory says so here; a glob would find nothing
        return attempt_bars(ledger, now) if ledger.exists() else []
    except OSError as err:
        raise RunError(f"cannot read the ledger in {ledger.dir}: {err}") from None


def run_groups(run: Path, now: float) -> tuple[str, list[Group]]:
    """The picture's title and groups: one group for a run, one per run for a sweep directory."""
    if not (run / SWEEP_FILE).is_file():
        if not run.is_dir():
            raise RunError(f"{run} is not a run directory: nothing to plot")
        bars = _run_bars(run, now)
        if not Ledger(run).exists():
            raise RunError(
                f"no ledger records in {run / LEDGER_DIR}: nothing to plot, no picture written (the run was not "
                "submitted yet, or its ledger was lost; `slurmvision status` says what its checkpoints say)"
            )
        if not bars:
            raise RunError(
                f"no attempts in the ledger of {run} yet (nothing has started training): nothing to plot, no picture "
                "written; `slurmvision status` says whether its job is queued"
            )
        lost = sum(bar.lost for bar in bars)
        return f"run {run}: {len(bars)} attempt{'s' * (len(bars) != 1)}, {lost} steps lost", [Group(None, bars)]
    try:
        names = [entry["name"] for entry in json.loads((run / SWEEP_FILE).read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"cannot read the sweep's plan {run / SWEEP_FILE}: {err}") from None
    groups = []
    for name in names:
        try:
            bars = _run_bars(run / name, now)
            groups.append(Group(name, bars, "" if bars else "no attempts yet"))
        except RunError as err:
            groups.append(Group(name, note=str(err)))
    attempts = sum(len(group.bars) for group in groups)
    if not attempts:
        raise RunError(f"no attempts in the ledgers of the sweep {run}'s {len(names)} runs yet: nothing to plot")
    return f"sweep {run}: {len(names)} runs, {attempts} attempts", groups


def plot_status(run: Optional[str], out: str | Path, now: Optional[float] = None, width: int = WIDTH) -> dict:
    """Draw the timeline of a run (or a sweep) into the PNG file `out`; what was drawn."""
    if not run:
        raise RunError("give a run directory: slurmvision status RUN_DIR --plot OUT.png")
    now = time.time() if now is None else now
    title, groups = run_groups(Path(run), now)
    image, _ = render(title, groups, now, width)
    try:
        image.save(out, format="PNG")
    except OSError as err:
        raise RunError(f"cannot write the picture {out}: {err}") from None
    return {"plot": str(out), "runs": len(groups), "attempts": sum(len(group.bars) for group in groups)}


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: its bitmap font only, in one size
        return ImageFont.load_default()


class _Canvas:
    """The picture's geometry: where a time and a row go."""

    def __init__(self, groups: list[Group], now: float, width: int, font):
        from PIL import ImageFont

        self.font, self.width = font, width
        self.latin1_only = not isinstance(font, ImageFont.FreeTypeFont)  # Pillow's fallback bitmap font
        self.text_h = font.getbbox("Ag")[3]
        self.rows: list[tuple[str, object]] = []  # ("name", group), ("bar", bar) or ("note", group)
        for group in groups:
            if group.name is not None:
                self.rows.append(("name", group))
            if group.bars:
                self.rows.extend(("bar", bar) for bar in group.bars)
            else:
                self.rows.append(("note", group))
        n = len(self.rows)
        self.row_h = ROW_HEIGHT if n <= MAX_ROWS_HIGH else max(3, ROW_HEIGHT * MAX_ROWS_HIGH // n)
        self.label_every = max(1, math.ceil((self.text_h + 2) / self.row_h))
        labels = [bar.label for kind, bar in self.rows if kind == "bar"]
        widest = max((font.getlength(label) for label in labels), default=0)
        self.left = int(min(widest, width * 0.4)) + 16
        self.right = width - 24
        self.top = 2 * self.text_h + 24
        bars = [bar for group in groups for bar in group.bars if bar.start is not None]
        self.t0 = min((bar.start for bar in bars), default=now)
        self.lo = min([self.t0, *(bar.queued for bar in bars if bar.queued is not None)])
        self.hi = max([self.t0 + 1, *(bar.end for bar in bars if bar.end is not None)])

    def x(self, t: float) -> float:
        return self.left + (t - self.lo) / (self.hi - self.lo) * (self.right - self.left)

    def y(self, row: int) -> int:
        """The middle of row `row`."""
        return self.top + row * self.row_h + self.row_h // 2

    @property
    def bottom(self) -> int:
        return self.top + len(self.rows) * self.row_h

    def text(self, draw, xy: tuple[float, float], text: str, anchor: str = "lt", fill="black") -> None:
        """Write `text` with its left, middle or right (l, m, r) and top or middle (t, m) at `xy`. Placed
        here rather than by Pillow's anchors, which its bitmap font (Pillow without FreeType) ignores."""
        # The bitmap font raises on characters outside Latin-1; a "?" is better than no picture.
        text = text.encode("latin-1", errors="replace").decode("latin-1") if self.latin1_only else text
        top, bottom = self.font.getbbox("Ag")[1::2]
        x = xy[0] - {"l": 0, "m": 0.5, "r": 1}[anchor[0]] * self.font.getlength(text)
        y = xy[1] - (top if anchor[1] == "t" else (top + bottom) / 2)
        draw.text((x, y), text, font=self.font, fill=fill)


def render(title: str, groups: list[Group], now: float, width: int = WIDTH):
    """The picture (a PIL image) and its geometry, whose `y(i)` is the middle of row i."""
    from PIL import Image, ImageDraw

    font = _font()
    canvas = _Canvas(groups, now, width, font)
    legend = _legend_lines(canvas, groups)
    height = canvas.bottom + 2 * canvas.text_h + 28 + len(legend) * (canvas.text_h + 10) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    canvas.text(draw, (8, 10), title)
    _draw_axis(draw, canvas, any(bar.kind == RUNNING for group in groups for bar in group.bars), now)
    for row, (kind, item) in enumerate(canvas.rows):
        if kind == "name":
            draw.line([(8, canvas.y(row) - canvas.row_h // 2), (width - 8, canvas.y(row) - canvas.row_h // 2)], "gray")
            canvas.text(draw, (8, canvas.y(row)), f"run {item.name}", "lm")
        elif kind == "note":
            canvas.text(draw, (canvas.left, canvas.y(row)), item.note, "lm", "dimgray")
        else:
            _draw_bar(draw, canvas, row, item)
    _draw_legend(draw, canvas, legend, canvas.bottom + 2 * canvas.text_h + 28)
    return image, canvas


def _draw_bar(draw, canvas: _Canvas, row: int, bar: Bar) -> None:
    y, half = canvas.y(row), max(1, canvas.row_h * 3 // 8)
    show_text = canvas.row_h >= canvas.text_h + 4
    if row % canvas.label_every == 0 or show_text:
        canvas.text(draw, (canvas.left - 8, y), bar.label, "rm")
    if bar.start is None:  # nothing to draw over time: a swatch and what is known
        draw.rectangle([canvas.left, y - half, canvas.left + 2 * half, y + half], fill=COLOURS[bar.kind])
        if show_text:
            canvas.text(draw, (canvas.left + 2 * half + 6, y), f"{bar.text} ({bar.kind})", "lm")
        return
    x0, x1 = canvas.x(bar.start), max(canvas.x(bar.end or bar.start), canvas.x(bar.start) + 2)
    if bar.queued is not None and bar.queued < bar.start:
        draw.rectangle([canvas.x(bar.queued), y - half, x0, y + half], fill=QUEUED)
    colour = COLOURS[bar.kind]
    draw.rectangle([x0, y - half, x1, y + half], fill=colour)
    if not show_text:
        return
    text, text_w = bar.text, canvas.font.getlength(bar.text)
    if x1 - x0 >= text_w + 8:  # on the bar, in black or white, whichever reads better on its colour
        dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 140
        canvas.text(draw, (x0 + 4, y), text, "lm", "white" if dark else "black")
        return
    before = canvas.x(min(bar.start, bar.queued if bar.queued is not None else bar.start)) - 6
    if x1 + 6 + text_w > canvas.width - 4 and before - text_w >= canvas.left:  # no room right of it: left of it
        canvas.text(draw, (before, y), text, "rm")
    else:
        canvas.text(draw, (x1 + 6, y), text, "lm")


def _ticks(canvas: _Canvas) -> tuple[int, list[float]]:
    """A tick step from NICE_STEPS_S giving at most 8 ticks, and the ticks (seconds from t0) in the range."""
    span = canvas.hi - canvas.lo
    step = next((s for s in NICE_STEPS_S if span / s <= 8), 86400 * math.ceil(span / 86400 / 8))
    first = math.ceil((canvas.lo - canvas.t0) / step) * step
    return step, [first + i * step for i in range(int((canvas.hi - canvas.t0 - first) // step) + 1)]


def clock(seconds: float, step: int = 60) -> str:
    """`1h30m`, `45m`, `0`, `-5m`; with seconds (`1m30s`) where the ticks are less than a minute apart."""
    sign, seconds = ("-" if seconds < 0 else ""), int(round(abs(seconds)))
    hours, minutes, secs = seconds // 3600, seconds % 3600 // 60, seconds % 60
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs and step < 60 else ""]
    return sign + ("".join(parts) or "0")


def _draw_axis(draw, canvas: _Canvas, running: bool, now: float) -> None:
    step, ticks = _ticks(canvas)
    bottom = canvas.bottom
    for tick in ticks:
        x = canvas.x(canvas.t0 + tick)
        draw.line([(x, canvas.top), (x, bottom)], fill=(236, 236, 236))
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        canvas.text(draw, (x, bottom + 6), clock(tick, step), "mt")
    draw.line([(canvas.left, bottom), (canvas.right, bottom)], fill="black")
    started = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(canvas.t0))
    caption = f"wall time from the first attempt's start ({started})"
    if running:
        x = canvas.x(now)
        for y in range(canvas.top, bottom, 6):  # dashed: now
            draw.line([(x, y), (x, min(y + 3, bottom))], fill="black")
        caption += "; dashed line: now"
    canvas.text(draw, (canvas.left, bottom + canvas.text_h + 14), caption)


def _legend_lines(canvas: _Canvas, groups: list[Group]) -> list[list[tuple[tuple[int, int, int], str]]]:
    """The legend's entries, the colours used in their palette order, wrapped into lines."""
    bars = [bar for group in groups for bar in group.bars]
    entries = [(colour, str(name)) for name, colour in COLOURS.items() if any(bar.kind == name for bar in bars)]
    if any(bar.queued is not None and bar.start is not None and bar.queued < bar.start for bar in bars):
        entries.append((QUEUED, QUEUED_NAME))
    lines, width = [[]], 8
    for colour, name in entries:
        size = 14 + 6 + canvas.font.getlength(name) + 18
        if width + size > canvas.width - 8 and lines[-1]:
            lines.append([])
            width = 8
        lines[-1].append((colour, name))
        width += size
    return lines


def _draw_legend(draw, canvas: _Canvas, lines: list, top: int) -> None:
    for number, line in enumerate(lines):
        x, y = 8, top + number * (canvas.text_h + 10) + canvas.text_h // 2 + 4
        for colour, name in line:
            draw.rectangle([x, y - 6, x + 13, y + 6], fill=colour, outline="black" if colour == QUEUED else None)
            canvas.text(draw, (x + 20, y), name, "lm")
            x += 14 + 6 + canvas.font.getlength(name) + 18
