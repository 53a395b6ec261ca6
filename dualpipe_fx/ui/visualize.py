"""Draw a program's timeline as a PNG (like the DualPipe README figures) or a Perfetto trace.

**Contract**: ``visualize(program, path, sim=None, title=None) -> Path``; writes ``path``.
``sim`` is a ``SimResult`` or a measured profile: any object with ``.timeline`` (a list
of ``dualpipe_fx.planning.timeline.TimelineEntry``) and optionally ``.time_unit`` (``"s"`` for a
measured profile in seconds) and ``.costs``. Both are drawn the same way, so simulated
and measured pictures can be put side by side.

**Pseudocode**
    sim = sim or simulate(program, DEFAULT_COSTS)
    .png  -> one row per rank; a coloured cell per action at its [start, end),
             labelled with its micro-batch (big) and stage (small); an F&B pair is an
             F cell and a B/I cell inside one thick shared border
    .json -> Chrome/Perfetto trace: one "X" event per action, pid = rank, name "F3.7"

``DEFAULT_COSTS`` is ``Costs(F=1, B=2, W=1)``: the README figures' cell widths (an I
or a W is one cell, a full B two, an F&B pair three). Time starts at 0 at the earliest
entry. In a trace, one simulated time unit is written as one millisecond.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional

from dualpipe_fx.schedules.ir import Action, Program
from dualpipe_fx.planning.simulate import Costs, simulate
from dualpipe_fx.planning.timeline import TimelineEntry

DEFAULT_COSTS = Costs(F=1.0, B=2.0, W=1.0)

# The README figure's palette: orange forward, green backward, blue weight grad.
_COLORS = MappingProxyType({"F": "#f6a93b", "B": "#5cb85c", "I": "#9ee37d", "W": "#74b9f2"})
_LEGEND = (("F", "Forward"), ("B", "Backward"), ("I", "Backward for input"), ("W", "Backward for weights"))
# Microseconds per time unit, for traces.
_US_PER_UNIT = MappingProxyType({"s": 1e6, "ms": 1e3, "us": 1.0, "unit": 1e3})


def _forward_share(action: Action, costs: Optional[Costs]) -> float:
    """The part of an F&B pair's width drawn as its F cell (F : B or F : I)."""
    c = costs or DEFAULT_COSTS
    back = c.B if action.backward.kind == "B" else c.B - c.W
    return c.F / (c.F + back) if c.F + back > 0 else 0.5


def _cell(ax: Any, part: Action, x: float, width: float, y: float, px_per_unit: float) -> None:
    """One coloured cell with its micro-batch (and, where it fits, its stage) written in."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y - 0.4), width, 0.8, facecolor=_COLORS[part.kind],
                           edgecolor="#333333", linewidth=0.4))
    width_pt = width * px_per_unit
    size = min(9.0, width_pt * 0.55)
    if size >= 3.0:
        ax.text(x + width / 2, y + 0.05, str(part.microbatch), ha="center", va="center", fontsize=size)
    if size >= 5.0:
        ax.text(x + width - 0.04 * width, y + 0.36, f"s{part.stage}", ha="right", va="bottom",
                fontsize=size * 0.5, color="#333333")


def _draw_entry(ax: Any, entry: TimelineEntry, t0: float, costs: Optional[Costs], px_per_unit: float) -> None:
    from matplotlib.patches import Rectangle

    x, width, y = entry.start - t0, entry.duration, entry.rank
    if entry.action.kind != "FB":
        _cell(ax, entry.action, x, width, y, px_per_unit)
        return
    split = width * _forward_share(entry.action, costs)
    _cell(ax, entry.action.forward, x, split, y, px_per_unit)
    _cell(ax, entry.action.backward, x + split, width - split, y, px_per_unit)
    # The README's shared black border: the two cells overlap each other's compute and comm.
    ax.add_patch(Rectangle((x, y - 0.4), width, 0.8, fill=False, edgecolor="black", linewidth=1.6))


def _legend(fig: Any) -> None:
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_COLORS[k], edgecolor="#333333") for k, _ in _LEGEND]
    handles.append((Patch(facecolor=_COLORS["F"], edgecolor="black"), Patch(facecolor=_COLORS["B"], edgecolor="black")))
    labels = [text for _, text in _LEGEND] + ["Overlapped forward & backward"]
    fig.legend(handles, labels, handler_map={tuple: HandlerTuple(ndivide=None, pad=0)}, loc="lower center",
               bbox_to_anchor=(0.5, 0.0), ncol=5, frameon=False, fontsize=8)


# How a timeline's time unit is shown: (factor to the shown unit, the shown unit).
_SHOWN = MappingProxyType({"s": (1e3, "ms"), "ms": (1.0, "ms"), "us": (1.0, "us"), "unit": (1.0, "")})


def _shown(sim: Any) -> tuple[float, str]:
    return _SHOWN.get(getattr(sim, "time_unit", "unit"), (1.0, getattr(sim, "time_unit", "")))


def _amount(value: float, sim: Any) -> str:
    """``value`` (in the timeline's unit) rounded, with its unit: ``73.8 ms``, ``14.5``."""
    factor, unit = _shown(sim)
    return f"{value * factor:.1f} {unit}" if unit else f"{round(value * factor, 2):g}"


def _title(program: Program, sim: Any, title: Optional[str]) -> str:
    if title is not None:
        return title
    text = f"{program.name or 'program'}: {program.num_ranks} ranks, {program.num_stages} stages, " \
           f"{program.num_microbatches} micro-batches"
    if hasattr(sim, "makespan") and hasattr(sim, "bubble"):
        text += f"; makespan {_amount(sim.makespan, sim)}, bubble {_amount(sim.bubble, sim)}"
    return text


def _figure(program: Program, sim: Any, title: Optional[str]) -> Any:
    """The picture as a matplotlib ``Figure`` (Agg): one row per rank, labelled ``rank r``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    factor, unit = _shown(sim)
    entries = [TimelineEntry(e.rank, e.action, e.start * factor, e.end * factor) for e in sim.timeline]
    t0 = min((e.start for e in entries), default=0.0)
    span = max((e.end for e in entries), default=1.0) - t0 or 1.0
    ranks = sorted(set(program) | {e.rank for e in entries})
    width_in = min(60.0, max(8.0, 0.35 * len(entries) / max(1, len(ranks)) + 2))
    height_in = 0.42 * len(ranks) + 1.5  # rows, plus inches for the title, time axis and legend
    fig, ax = plt.subplots(figsize=(width_in, height_in))
    px_per_unit = 72 * width_in * 0.85 / span  # points per time unit, for label sizes
    for entry in entries:
        _draw_entry(ax, entry, t0, getattr(sim, "costs", None), px_per_unit)
    ax.set_xlim(0, span * 1.005)  # the last cell's border stays inside the frame
    ax.set_ylim(max(ranks, default=0) + 0.6, min(ranks, default=0) - 0.6)  # rank 0 on top
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks], fontweight="bold")
    ax.set_xlabel(f"time ({unit or 'unit'})")
    ax.set_title(_title(program, sim, title), fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    _legend(fig)
    # room on the left for the widest row label, measured as drawn (plus the tick and a pad)
    renderer = fig.canvas.get_renderer()
    label_px = max((t.get_window_extent(renderer).width for t in ax.get_yticklabels()), default=0.0)
    left = (label_px + 0.2 * fig.dpi) / (width_in * fig.dpi)
    fig.subplots_adjust(left=left, right=0.98, top=1 - 0.4 / height_in, bottom=1.0 / height_in)
    return fig


def _write_png(program: Program, path: Path, sim: Any, title: Optional[str]) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(program, sim, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trace(program: Program, sim: Any) -> dict:
    """The Chrome trace-event JSON (Perfetto reads it): complete events in microseconds."""
    scale = _US_PER_UNIT.get(getattr(sim, "time_unit", "unit"), 1e3)
    t0 = min((e.start for e in sim.timeline), default=0.0)
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}}
                          for r in sorted(program)]
    for e in sim.timeline:
        parts = e.action.parts()
        events.append({"name": str(e.action), "cat": e.action.kind, "ph": "X", "pid": e.rank, "tid": 0,
                       "ts": (e.start - t0) * scale, "dur": e.duration * scale,
                       "args": {"stages": [p.stage for p in parts], "microbatches": [p.microbatch for p in parts]}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"schedule": program.name, "num_microbatches": program.num_microbatches}}


def visualize(program: Program, path: str | Path, sim: Any = None, title: Optional[str] = None) -> Path:
    """Write ``program``'s timeline to ``path``: a ``.png`` picture or a ``.json`` trace.

    Args:
        program: the program drawn (its ranks are the rows, its name the default title).
        path: where to write; the suffix picks the format.
        sim: a ``SimResult`` or a measured profile with ``.timeline``; default
            ``simulate(program, DEFAULT_COSTS)``.
        title: the picture's title; default names the schedule, sizes, makespan and bubble.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``path`` ends in anything but ``.png`` or ``.json``.
        TypeError: ``sim`` has no ``timeline``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".json"):
        raise ValueError(f"cannot write {str(path)!r}: suffix {path.suffix!r} is not supported; "
                         f"use .png for a picture or .json for a Perfetto trace")
    if sim is None:
        sim = simulate(program, DEFAULT_COSTS)
    if not hasattr(sim, "timeline"):
        raise TypeError(f"sim is a {type(sim).__name__} without .timeline; pass a SimResult or a measured profile")
    if suffix == ".png":
        _write_png(program, path, sim, title)
    else:
        path.write_text(json.dumps(_trace(program, sim)))
    return path
