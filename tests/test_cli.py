"""``dualpipe-fx schedule`` in-process: it prints the DualPipe README's bubble figures, the
program exactly as generated, and turns bad input into one line with exit status 2."""
from __future__ import annotations

import json

import pytest

from dualpipe_fx.ui.cli import main, parse_costs
from dualpipe_fx.schedules.registry import SCHEDULES, generate
from dualpipe_fx.planning.simulate import Costs

COSTS = "F=1,B=2,W=1,FB=2.5"  # meets every README formula's assumptions


def _run(capsys, *argv: str) -> str:
    assert main(["schedule", *argv]) == 0
    return capsys.readouterr().out


def _comparison(out: str) -> dict[str, list[str]]:
    """The comparison table's rows by schedule name, split on whitespace."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("schedule "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("wrote "):
            break
        rows[line.split()[0]] = line.split()[1:]
    return rows


# The README's bubble column at C = 20 with F=1, B=2, W=1, F&B=2.5, written out:
# 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe(V) (PP/2-1)(F&B+B-3W).
README = {
    2: {"1f1b": 3, "zb1p": 1, "dualpipe": 0, "dualpipev": 0},
    4: {"1f1b": 9, "zb1p": 3, "dualpipe": 1.5, "dualpipev": 1.5},
    8: {"1f1b": 21, "zb1p": 7, "dualpipe": 4.5, "dualpipev": 4.5},
}
PEAK = {"1f1b": 0, "zb1p": 0, "dualpipe": 1, "dualpipev": 1}  # PP + this


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_prints_the_readme_bubbles(capsys, pp):
    # 1F1B, ZB1P and DualPipe run PP stages on PP ranks; DualPipeV on PP/2 ranks.
    same_ranks = _comparison(_run(capsys, "--schedule", "1f1b", "--ranks", str(pp), "--microbatches", "20",
                                  "--costs", COSTS))
    v_ranks = _comparison(_run(capsys, "--schedule", "dualpipev", "--ranks", str(pp // 2), "--microbatches", "20",
                               "--costs", COSTS))
    rows = {name: same_ranks[name] for name in ("1f1b", "zb1p", "dualpipe")} | {"dualpipev": v_ranks["dualpipev"]}
    for name, row in rows.items():
        stages, bubble, ratio, peak, makespan, readme, pp_note = row
        assert float(bubble) == README[pp][name], (name, row)
        assert float(readme) == README[pp][name] and pp_note == f"(PP={pp})", (name, row)
        assert int(peak) == pp + PEAK[name], (name, row)
        assert float(ratio) == pytest.approx(float(bubble) / float(makespan), abs=5e-4)


def test_comparison_has_every_schedule_and_says_why_one_cannot_run(capsys):
    rows = _comparison(_run(capsys, "--ranks", "3", "--microbatches", "8"))
    assert set(rows) == set(SCHEDULES)
    assert " ".join(rows["dualpipe"]).startswith("n/a: dualpipe: num_ranks=3, expected an even N")
    assert rows["gpipe"][3] == "8"  # GPipe holds every micro-batch: peak C


def test_prints_the_program_as_generated(capsys):
    out = _run(capsys, "--schedule", "zbv", "--ranks", "2", "--microbatches", "5")
    printed: dict[int, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("rank "):
            _, rank, *actions = line.split()
            printed.setdefault(int(rank), []).extend(actions)
    assert out.splitlines()[0] == "zbv: 2 ranks, 4 stages, 5 micro-batches; costs F=1 B=2 W=1 FB=3 comm=0"
    assert printed == {r: [str(a) for a in acts] for r, acts in generate("zbv", 2, 5).items()}


def test_writes_png_and_trace(capsys, tmp_path):
    png, trace = tmp_path / "v.png", tmp_path / "v.json"
    out = _run(capsys, "--ranks", "2", "--microbatches", "4", "--png", str(png), "--trace", str(trace))
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(len(a) for a in generate("dualpipev", 2, 4).values())


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "foo", "--ranks", "2", "--microbatches", "4"], "unknown schedule 'foo'"),
    (["--ranks", "0", "--microbatches", "4"], "num_ranks=0, expected N >= 1"),
    (["--ranks", "4", "--microbatches", "7"], "num_microbatches=7 with num_ranks=4, expected C >= 2N"),
    (["--schedule", "dualpipe", "--ranks", "3", "--microbatches", "8"], "num_ranks=3, expected an even N"),
    (["--schedule", "dualpipe", "--ranks", "4", "--microbatches", "9"], "num_microbatches=9, expected an even C"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "F=-1"], "cost F=-1.0 is negative"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "F=1,W=3"], "W=3.0 > B=2.0"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "F1"], "'F1' is not KEY=VALUE"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "X=1"], "unknown key 'X'"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "F=1,F=2"], "'F=2' repeats a key"),
    (["--ranks", "2", "--microbatches", "4", "--costs", "B=two"], "B='two' is not a number"),
    (["--ranks", "two", "--microbatches", "4"], "argument --ranks: invalid int value: 'two'"),
    (["--ranks", "2", "--microbatches", "4", "--png", "x.svg"], "--png 'x.svg' must end in .png"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["schedule", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("dualpipe-fx: error: ")
    assert message in captured.err


def test_no_subcommand_is_exit_2(capsys):
    assert main([]) == 2
    assert "required: command" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["schedule", "--help"]) == 0
    assert "--microbatches" in capsys.readouterr().out


def test_costs_left_out_keep_their_defaults():
    assert parse_costs("FB=2.5, comm=0.5") == Costs(F=1, B=2, W=1, FB=2.5, comm=0.5)
    assert parse_costs("") == Costs(F=1, B=2, W=1)


def test_plan_prints_every_ranks_bytes_for_a_meta_llama_on_8_ranks(capsys, tmp_path):
    """`dualpipe-fx plan`: 16 stages of the 8-layer example cut by op, traced on meta; one row
    per rank (readable units, then exact bytes), and the same figures in the JSON."""
    path = tmp_path / "plan.json"
    assert main(["plan", "--example", "llama", "--ranks", "8", "--microbatches", "16", "--dtype", "bfloat16",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    plan = json.loads(path.read_text())
    assert [r["rank"] for r in plan["ranks"]] == list(range(8)) and len(plan["stages"]) == 16
    assert plan["ranks"][0]["stages"] == [0, 15] and plan["optimizer"] == "adamw"
    for r in plan["ranks"]:
        assert r["grads"] > 0 and r["optimizer"] > 2 * r["grads"] and r["activations"] > 0
        assert f"{r['total']:,}" in out
    assert "(bfloat16)" in out and "activations" in out


def test_plan_refuses_an_unknown_dtype(capsys):
    assert main(["plan", "--ranks", "2", "--microbatches", "4", "--dtype", "float8"]) == 2
    assert "--dtype 'float8'" in capsys.readouterr().err


def test_plan_auto_prints_the_ranking_and_the_pick(capsys):
    assert main(["plan", "--auto", "--example", "mlp", "--ranks", "2", "--device", "h100", "--batch", "8",
                 "--layers", "4", "--dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "fastest first" in out and "pick: pp=2, schedule=" in out and "rejected: pp=2, dualpipev, C=2" in out
    # --world: the pipeline degree is searched too (1 or 2 here), the other ranks data-parallel
    assert main(["plan", "--auto", "--example", "mlp", "--world", "2", "--device", "h100", "--batch", "8",
                 "--layers", "4", "--dim", "16", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 replicate" in out and "2 shard" in out and "pick: pp=" in out, out
    assert main(["plan", "--example", "mlp", "--world", "2", "--microbatches", "2"]) == 2
    assert "--world is an --auto option" in capsys.readouterr().err
