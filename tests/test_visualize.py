"""Pictures and traces: a PNG shows every action in its colour, a measured profile with
the same timeline draws the same pixels, and the trace has one event per action."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from dualpipe_fx.schedules.registry import generate
from dualpipe_fx.planning.simulate import Costs, simulate
from dualpipe_fx.planning.timeline import TimelineEntry
from dualpipe_fx.ui.visualize import DEFAULT_COSTS, visualize


@dataclass
class MeasuredProfile:
    """What the runtime's profiler hands over: a timeline in seconds."""

    timeline: list[TimelineEntry]
    time_unit: str = "s"


def _pixels(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))[..., :3]


def _timeline_rows(pixels: np.ndarray) -> np.ndarray:
    # The time axis and the legend sit in the bottom inch (120 px at the 120 dpi used).
    return pixels[:-120]


def _has_colour(pixels: np.ndarray, hex_colour: str) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(pixels - rgb).max(axis=-1) < 2 / 255).any())


def test_png_shows_each_kind_in_its_colour(tmp_path):
    program = generate("dualpipev", 4, 10)
    out = visualize(program, tmp_path / "dualpipev.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = _pixels(out)
    assert pixels.shape[1] > 2 * pixels.shape[0]  # a wide timeline, like the README figure
    pixels = _timeline_rows(pixels)
    for colour in ("#f6a93b", "#5cb85c", "#9ee37d", "#74b9f2"):  # F, B, I, W
        assert _has_colour(pixels, colour), colour


def test_png_without_split_backward_has_no_weight_cells(tmp_path):
    out = visualize(generate("1f1b", 2, 4), tmp_path / "1f1b.png")
    pixels = _timeline_rows(_pixels(out))
    assert _has_colour(pixels, "#f6a93b") and _has_colour(pixels, "#5cb85c")
    assert not _has_colour(pixels, "#74b9f2") and not _has_colour(pixels, "#9ee37d")


def test_measured_profile_is_drawn_like_the_simulation(tmp_path):
    program = generate("dualpipev", 2, 5)
    sim = simulate(program, DEFAULT_COSTS)
    # The same timeline, shifted and in seconds, as a profiler would record it.
    measured = MeasuredProfile([TimelineEntry(e.rank, e.action, 100 + e.start, 100 + e.end) for e in sim.timeline],
                               time_unit="unit")
    a = visualize(program, tmp_path / "sim.png", sim=sim, title="t")
    b = visualize(program, tmp_path / "measured.png", sim=measured, title="t")
    assert np.array_equal(_pixels(a), _pixels(b))


def test_default_sim_is_the_default_costs(tmp_path):
    program = generate("zb1p", 3, 6)
    a = visualize(program, tmp_path / "a.png", title="t")
    b = visualize(program, tmp_path / "b.png", sim=simulate(program, Costs(F=1, B=2, W=1)), title="t")
    c = visualize(program, tmp_path / "c.png", sim=simulate(program, Costs(F=1, B=3, W=1)), title="t")
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_trace_has_one_complete_event_per_action(tmp_path):
    program = generate("dualpipev", 2, 4)
    sim = simulate(program, Costs(F=1, B=2, W=1, FB=2.5, comm=0.5))
    trace = json.loads(visualize(program, tmp_path / "t.json", sim=sim).read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(sim.timeline) == sum(len(a) for a in program.values())
    by_name = {(e["pid"], e["name"]): e for e in events}
    for entry in sim.timeline:
        event = by_name[(entry.rank, str(entry.action))]
        assert event["ts"] == pytest.approx(entry.start * 1e3) and event["dur"] == pytest.approx(entry.duration * 1e3)
    assert (0, "F0.0") in by_name and any("&" in name for _, name in by_name)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"rank 0", "rank 1"}


def test_trace_of_a_measured_profile_is_in_microseconds(tmp_path):
    program = generate("1f1b", 2, 2)
    sim = simulate(program, DEFAULT_COSTS)
    measured = MeasuredProfile([TimelineEntry(e.rank, e.action, 5 + e.start / 1000, 5 + e.end / 1000)
                                for e in sim.timeline])  # milliseconds of work, in seconds
    trace = json.loads(visualize(program, tmp_path / "m.json", sim=measured).read_text())
    first = next(e for e in trace["traceEvents"] if e.get("name") == "F0.0")
    assert first["ts"] == pytest.approx(0) and first["dur"] == pytest.approx(1000)


def test_unknown_suffix_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '\.svg' is not supported"):
        visualize(generate("1f1b", 2, 2), tmp_path / "x.svg")
    assert not (tmp_path / "x.svg").exists()


def test_sim_without_timeline_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="without .timeline"):
        visualize(generate("1f1b", 2, 2), tmp_path / "x.png", sim=object())


def test_png_text_rows_say_rank_whole_and_the_title_is_rounded_with_units():
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from dualpipe_fx.ui.visualize import _figure

    program = generate("dualpipev", 2, 4)
    sim = simulate(program, DEFAULT_COSTS)
    scale = 0.0738123 / sim.makespan  # a measured step of 73.8 ms, in seconds

    @dataclass
    class Profile(MeasuredProfile):
        makespan: float = 0.0738123
        bubble: float = 0.0046049

    measured = Profile([TimelineEntry(e.rank, e.action, e.start * scale, e.end * scale) for e in sim.timeline])
    fig = _figure(program, measured, None)
    try:
        ax = fig.axes[0]
        assert ax.get_title().endswith("; makespan 73.8 ms, bubble 4.6 ms"), ax.get_title()
        assert ax.get_xlabel() == "time (ms)"
        labels = ax.get_yticklabels()
        assert [t.get_text() for t in labels] == ["rank 0", "rank 1"]
        renderer = fig.canvas.get_renderer()
        for label in labels:  # whole: inside the figure, not clipped at its left edge
            assert label.get_window_extent(renderer).x0 >= 0, label.get_window_extent(renderer)
        right = max(p.get_x() + p.get_width() for p in ax.patches if isinstance(p, Rectangle))
        assert right == pytest.approx(73.8123, rel=1e-6) and right < ax.get_xlim()[1]  # last action inside
        assert fig.transFigure.inverted().transform(ax.transData.transform((right, 0)))[0] < 1.0
    finally:
        plt.close(fig)
    sim_title = _figure(program, sim, None)
    try:
        assert sim_title.axes[0].get_title().endswith(f"; makespan {sim.makespan:g}, bubble {sim.bubble:g}")
    finally:
        plt.close(sim_title)
