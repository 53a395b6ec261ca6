"""The registry: names, aliases, spec fields, and the size rules every generator enforces."""
import dataclasses

import pytest

from dualpipe_fx.schedules import SCHEDULES, ScheduleSpec, generate, get_schedule
from dualpipe_fx.schedules import dualpipe, dualpipev, gpipe, interleaved_1f1b, one_f_one_b, zb1p, zbv

NAMES = ["dualpipev", "dualpipe", "gpipe", "1f1b", "zb1p", "zbv", "interleaved_1f1b"]


def test_names_generators_and_fields():
    assert sorted(SCHEDULES) == sorted(NAMES)
    expected = {"dualpipev": (dualpipev, 2, True, False), "dualpipe": (dualpipe, 2, True, True),
                "gpipe": (gpipe, 1, False, False), "1f1b": (one_f_one_b, 1, False, False),
                "zb1p": (zb1p, 1, False, False), "zbv": (zbv, 2, False, False),
                "interleaved_1f1b": (interleaved_1f1b, 2, False, False)}
    for name, (gen, per_rank, has_fb, bidir) in expected.items():
        spec = get_schedule(name)
        assert (spec.name, spec.generator, spec.stages_per_rank, spec.has_fb, spec.bidirectional) == \
            (name, gen, per_rank, has_fb, bidir)


def test_registry_is_immutable():
    with pytest.raises(TypeError):
        SCHEDULES["mine"] = SCHEDULES["gpipe"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SCHEDULES["gpipe"].stages_per_rank = 3  # type: ignore[misc]
    assert isinstance(SCHEDULES["gpipe"], ScheduleSpec)


def test_alias_and_unknown_name():
    assert get_schedule("one_f_one_b") is get_schedule("1f1b")
    assert generate("one_f_one_b", 2, 2).format() == one_f_one_b(2, 2).format()
    with pytest.raises(ValueError, match="unknown schedule 'dualpipeX'.*dualpipev, dualpipe, gpipe, 1f1b"):
        get_schedule("dualpipeX")
    with pytest.raises(ValueError, match="unknown schedule"):
        generate("nope", 2, 4)


@pytest.mark.parametrize("name, n, minimum", [
    ("dualpipev", 1, 2), ("dualpipev", 3, 6), ("dualpipe", 2, 4), ("dualpipe", 4, 8),
    ("gpipe", 3, 1), ("1f1b", 3, 3), ("zb1p", 3, 1), ("zbv", 3, 1), ("interleaved_1f1b", 3, 1),
])
def test_min_microbatches_is_the_boundary(name, n, minimum):
    spec = get_schedule(name)
    assert spec.min_microbatches(n) == minimum
    spec.validate(n, minimum)
    generate(name, n, minimum)
    if minimum > 1:
        with pytest.raises(ValueError, match=f"num_microbatches={minimum - 1 - (name == 'dualpipe')}"):
            spec.validate(n, minimum - 1 - (name == "dualpipe"))


@pytest.mark.parametrize("name", NAMES)
def test_zero_ranks_is_refused(name):
    with pytest.raises(ValueError, match=r"num_ranks=0, expected N >= 1"):
        generate(name, 0, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: dualpipev(4, 7), r"num_microbatches=7 with num_ranks=4, expected C >= 2N \(at least 8\)"),
    (lambda: dualpipe(3, 8), r"num_ranks=3, expected an even N"),
    (lambda: dualpipe(4, 9), r"num_microbatches=9, expected an even C"),
    (lambda: dualpipe(4, 6), r"num_microbatches=6 with num_ranks=4"),
    (lambda: one_f_one_b(4, 3), r"num_microbatches=3 with num_ranks=4, expected C >= N"),
    (lambda: interleaved_1f1b(4, 9), r"num_microbatches=9 with num_ranks=4 must be a multiple of C // N = 2"),
    (lambda: gpipe(2, 0), r"num_microbatches=0 with num_ranks=2, expected C >= 1"),
])
def test_bad_sizes_name_the_value_and_the_rule(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_int_sizes_are_type_errors():
    with pytest.raises(TypeError, match="num_microbatches must be an int, got 8.0"):
        dualpipev(2, 8.0)
