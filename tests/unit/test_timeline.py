"""`status RUN --plot`: a run's attempts drawn from a ledger written by the ledger's own writers."""

import json
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from slurmvision.cli import main
from slurmvision.errors import RunError
from slurmvision.launch import timeline
from slurmvision.slurm import ledger as ledger_module
from slurmvision.slurm.causes import Cause, Outcome, StopReason
from slurmvision.slurm.ledger import Ledger

pytestmark = pytest.mark.unit

H = 3600.0
T0 = 1_700_000_000.0  # the first submission
NOW = T0 + 10.5 * H
# The attempts in the order drawn: (colour, seconds from T0 it started and ended, its job's first attempt).
EXPECTED = [
    (Cause.PREEMPTION, 0.1 * H, 2 * H, True),
    (Cause.TIME_LIMIT, 2.2 * H, 6 * H, False),  # the same job, requeued: no wait drawn before it
    (Cause.NODE_FAILURE, 6.3 * H, 7.5 * H, True),  # rank 0 died with its node: ends at its last record
    (Cause.FINISHED, 8 * H, 9 * H, True),
    (timeline.RUNNING, 9.5 * H, 10.5 * H, True),  # running: reaches to now
]


@pytest.fixture
def clock(monkeypatch):
    """The ledger's clock, set by the test: records carry the times of a long run."""
    now = [T0]
    fake = SimpleNamespace(time=lambda: now[0], time_ns=time.time_ns, monotonic=time.monotonic)
    monkeypatch.setattr(ledger_module, "time", fake)
    return now


def attempt(clock, run_dir, job_id, restart, start_h, step, steps_h, end=None):
    """An attempt as rank 0 writes it: its start, progress records, and its end when it has one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rank0 = Ledger(run_dir, writer=f"attempt-{job_id}.{restart}")
    clock[0] = T0 + start_h * H
    rank0.attempt_started(job_id, restart, nodes="gpu[01-04]", world_size=32, step=step, checkpoint=None)
    for hours, reached in steps_h:
        clock[0] = T0 + hours * H
        rank0.attempt_progress(job_id, restart, step=reached, saved=reached - reached % 500, step_time=0.4)
    if end:
        clock[0] = T0 + end[0] * H
        rank0.attempt_ended(job_id, restart, outcome=end[1], step=end[2], signal=end[3] if len(end) > 3 else None)


def cause(clock, run_dir, job_id, restart, hours, why):
    clock[0] = T0 + hours * H
    Ledger(run_dir, writer="coordinator").set_cause(job_id, restart, why)


def submit(clock, run_dir, job_id, hours, reason="launch"):
    clock[0] = T0 + hours * H
    run_dir.mkdir(parents=True, exist_ok=True)
    Ledger(run_dir, writer="launch").add_job(job_id, "a100", reason)


def write_run(clock, run_dir):
    """Preempted, requeued and stopped at the time limit, resubmitted and lost with a node, resubmitted and
    finished, resumed for more steps and running now."""
    submit(clock, run_dir, "1001", 0)
    attempt(clock, run_dir, "1001", 0, 0.1, 0, [(1, 1200), (1.9, 2300)], (2, Outcome.STOPPED, 2400, StopReason.SIGTERM))
    cause(clock, run_dir, "1001", 0, 2.01, Cause.PREEMPTION)
    attempt(clock, run_dir, "1001", 1, 2.2, 2000, [(4, 4000)], (6, Outcome.STOPPED, 6000, StopReason.SIGUSR2))
    cause(clock, run_dir, "1001", 1, 6.01, Cause.TIME_LIMIT)
    submit(clock, run_dir, "1002", 6.02, "resubmit after time limit")
    attempt(clock, run_dir, "1002", 0, 6.3, 6000, [(7, 6800), (7.5, 7300)])
    cause(clock, run_dir, "1002", 0, 7.6, Cause.NODE_FAILURE)
    submit(clock, run_dir, "1003", 7.61, "resubmit after node failure")
    attempt(clock, run_dir, "1003", 0, 8, 7000, [(8.5, 8500)], (9, Outcome.FINISHED, 10000))
    cause(clock, run_dir, "1003", 0, 9.01, Cause.FINISHED)
    submit(clock, run_dir, "1004", 9.2, "resume")
    attempt(clock, run_dir, "1004", 0, 9.5, 10000, [(10, 11500)])


def row_colours(image, canvas, row):
    """The colours of the pixels in the middle band of row `row`, right of the labels."""
    y = canvas.y(row)
    return {image.getpixel((x, yy)) for x in range(canvas.left, image.width) for yy in range(y - 2, y + 3)}


def span_of(image, canvas, row, colour):
    xs = [x for x in range(canvas.left, image.width) if image.getpixel((x, canvas.y(row))) == colour]
    return min(xs), max(xs)


def test_each_attempt_is_a_bar_of_its_cause_in_its_row(tmp_path, clock):
    run_dir = tmp_path / "run"
    write_run(clock, run_dir)
    out = tmp_path / "timeline.png"
    assert timeline.plot_status(str(run_dir), out, now=NOW) == {"plot": str(out), "runs": 1, "attempts": 5}
    image = Image.open(out).convert("RGB")
    assert image.format is None and Image.open(out).format == "PNG"
    title, groups = timeline.run_groups(run_dir, NOW)
    _, canvas = timeline.render(title, groups, NOW)
    rows = len(EXPECTED)
    assert image.width == timeline.WIDTH and rows * timeline.ROW_HEIGHT < image.height < rows * 24 + 200
    # The chromatic colours: the greys (user cancel, unknown) are also in the anti-aliased edges of the text.
    palette = {colour for colour in timeline.COLOURS.values() if len(set(colour)) > 1}
    for row, (kind, _, _, first_of_job) in enumerate(EXPECTED):
        colours = row_colours(image, canvas, row)
        assert timeline.COLOURS[kind] in colours, f"row {row} has no {kind} bar"
        assert not (palette - {timeline.COLOURS[kind]}) & colours, f"row {row} has another kind's colour"
        assert (timeline.QUEUED in colours) == first_of_job, f"row {row}: its wait in the queue"
    # Bars are as long as their attempts: the time-limit attempt ran twice as long as the preempted one.
    widths = [span_of(image, canvas, row, timeline.COLOURS[kind]) for row, (kind, *_) in enumerate(EXPECTED)]
    (a0, a1), (b0, b1) = widths[0], widths[1]
    assert abs((b1 - b0) / (a1 - a0) - (6 - 2.2) / (2 - 0.1)) < 0.05
    assert widths[-1][1] == pytest.approx(canvas.right, abs=1)  # the running one reaches to now, the right end
    # The node failure's bar ends at rank 0's last record (7.5 h), not at the coordinator's cause (7.6 h).
    assert widths[2][1] == pytest.approx(canvas.x(T0 + 7.5 * H), abs=1)
    legend = {image.getpixel((x, y)) for x in range(image.width) for y in range(canvas.bottom + 1, image.height)}
    assert {timeline.COLOURS[kind] for kind, *_ in EXPECTED} | {timeline.QUEUED} <= legend
    assert timeline.COLOURS[Cause.OOM] not in legend  # only the colours used


def test_the_steps_are_written_and_the_axis_counts_from_the_first_start(tmp_path, clock):
    run_dir = tmp_path / "run"
    write_run(clock, run_dir)
    bars = timeline.attempt_bars(Ledger(run_dir), NOW)
    assert [bar.label for bar in bars] == [
        "#1 job 1001.0",
        "#2 job 1001.1",
        "#3 job 1002.0",
        "#4 job 1003.0",
        "#5 job 1004.0",
    ]
    assert bars[0].text == "steps 0-2400, 400 lost" and bars[3].text == "steps 7000-10000"
    assert bars[2].text == "steps 6000-7300, 300 lost (ends at its last record)"
    assert bars[-1].end == NOW and bars[0].queued == T0
    assert [timeline.clock(s) for s in (0, 1800, 5400, 36000, -600)] == ["0", "30m", "1h30m", "10h", "-10m"]
    assert timeline.clock(90, step=30) == "1m30s"


def test_no_attempts_is_one_message_and_no_picture(tmp_path, clock, capsys):
    run_dir = tmp_path / "run"
    submit(clock, run_dir, "1001", 0)  # submitted, still in the queue
    out = tmp_path / "timeline.png"
    with pytest.raises(RunError, match="no attempts in the ledger"):
        timeline.plot_status(str(run_dir), out)
    assert main(["status", str(run_dir), "--plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slurmvision: error: no attempts") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_ledger_that_cannot_be_read_is_one_message(tmp_path, clock, capsys):
    run_dir = tmp_path / "run"
    write_run(clock, run_dir)
    (run_dir / "ledger" / "broken.jsonl").mkdir()  # a ledger file that cannot be read
    out = tmp_path / "timeline.png"
    assert main(["status", str(run_dir), "--plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slurmvision: error: cannot read the ledger") and "Traceback" not in err
    assert not out.exists()
    assert main(["status", str(tmp_path / "nowhere"), "--plot", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err and not out.exists()


def test_a_sweep_is_one_group_of_rows_per_run(tmp_path, clock, capsys):
    sweep_dir = tmp_path / "sweep"
    write_run(clock, sweep_dir / "000-lr=1e-3")
    submit(clock, sweep_dir / "001-lr=5e-4", "2001", 0)  # never started
    record = {
        "recipe": "r",
        "runs": [{"name": "000-lr=1e-3", "job_id": "1001"}, {"name": "001-lr=5e-4", "job_id": "1"}],
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(record))
    out = tmp_path / "sweep.png"
    assert main(["status", str(sweep_dir), "--plot", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: 5 attempts of 2 runs"
    title, groups = timeline.run_groups(sweep_dir, NOW)
    assert [(g.name, len(g.bars), g.note) for g in groups] == [
        ("000-lr=1e-3", 5, ""),
        ("001-lr=5e-4", 0, "no attempts yet"),
    ]
    image, canvas = timeline.render(title, groups, NOW)
    assert [kind for kind, _ in canvas.rows] == ["name", *["bar"] * 5, "name", "note"]
    assert timeline.COLOURS[Cause.PREEMPTION] in row_colours(image, canvas, 1)  # under its run's name


def test_many_attempts_still_make_a_picture_of_bounded_height(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(ledger_module.os, "fsync", lambda fd: None)  # the same files, written faster
    run_dir = tmp_path / "run"
    for i in range(200):
        attempt(clock, run_dir, str(5000 + i), 0, i * 0.1, i * 10, [], (i * 0.1 + 0.08, Outcome.STOPPED, i * 10 + 10))
    title, groups = timeline.run_groups(run_dir, NOW)
    image, canvas = timeline.render(title, groups, NOW)
    assert image.height < 2 * timeline.ROW_HEIGHT * timeline.MAX_ROWS_HIGH
    assert timeline.COLOURS[Outcome.STOPPED] in row_colours(image, canvas, 199)


def test_a_run_without_a_ledger_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["status", str(run_dir), "--plot", str(tmp_path / "t.png")]) == 2
    assert "slurmvision: error: no ledger records in" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()
