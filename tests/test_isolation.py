"""The bisection of suspects (spoold/isolation.py, design §5a), driven like the runner
drives it: run the first group alone; a group holding a culprit crashes the engine."""

from __future__ import annotations

import math
import random

import pytest

from spoold import isolation


def _isolate(suspects: list[int], culprits: set[int]) -> tuple[list[int], int]:
    """(dead-lettered lines, crashes) until no suspect is left. The first crash is the
    one that made them suspects."""
    iso = isolation.begin(suspects)
    crashes, dead = 1, []
    while iso.groups:
        group = isolation.first_group(iso)
        iso.trying = True
        if culprits & set(group):
            crashes += 1
            line = isolation.blame(iso)
            if line is not None:
                dead.append(line)
        else:
            isolation.finished(iso, set(group))
    return dead, crashes


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 2000, 5000, 7500])
def test_one_culprit_costs_about_log2_n_crashes(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        culprit = rng.randrange(n)
        dead, crashes = _isolate(list(range(n)), {culprit})
        assert dead == [culprit]
        # One crash per halving, the first crash included, and the second strike alone.
        assert crashes <= math.ceil(math.log2(n)) + 2, (n, crashes)


def test_two_culprits_are_both_found_and_nobody_else() -> None:
    dead, crashes = _isolate(list(range(1000)), {17, 900})
    assert sorted(dead) == [17, 900]
    assert crashes <= 2 * (math.ceil(math.log2(1000)) + 2)


def test_a_crash_that_was_nobodys_fault_blames_nobody() -> None:
    """A SIGKILL, not a request: the halves then simply complete."""
    dead, crashes = _isolate(list(range(5000)), set())
    assert dead == [] and crashes == 1


def test_a_lone_request_needs_two_strikes() -> None:
    iso = isolation.begin([42])
    assert iso.strikes == 1 and iso.groups == [1]
    iso.trying = True
    assert isolation.blame(iso) == 42
    assert iso.suspects == [] and iso.groups == []


def test_partly_finished_group_keeps_only_what_is_left() -> None:
    iso = isolation.begin(list(range(10)))  # [5, 5]
    iso.trying = True
    isolation.finished(iso, {0, 1, 2})  # a commit mid-group
    assert iso.groups == [2, 5] and iso.suspects[:2] == [3, 4] and iso.trying
    assert isolation.blame(iso) is None  # the crash is blamed on what was left
    assert iso.groups == [1, 1, 5] and not iso.trying
