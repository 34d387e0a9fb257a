"""Pure: bisecting the requests suspected of killing the engine (design §5a).

The record (`job.Isolation`) lives in state.json, so the bisection goes on across
restarts of a process the culprit killed. These functions only change the record;
the runner feeds the groups and commits.
"""

from __future__ import annotations

from spoold.job import Isolation

STRIKES_TO_BLAME = 2  # a lone request is dead-lettered on its second crash


def begin(suspects: list[int]) -> Isolation:
    """The record for requests that were in flight together when the engine died:
    already blamed as a whole, so split in halves (or one strike for a lone one)."""
    n = len(suspects)
    if n == 1:
        return Isolation(suspects=list(suspects), groups=[1], strikes=1)
    return Isolation(suspects=list(suspects), groups=[n // 2, n - n // 2])


def normalize(iso: Isolation) -> None:
    """Make a record read from disk consistent (a damaged or hand-edited one stops
    nothing, SPEC §3): line numbers positive, sorted, once each; groups positive and
    partitioning the suspects, else split afresh."""
    iso.suspects = sorted({n for n in iso.suspects if n > 0})
    iso.groups = [g for g in iso.groups if g > 0]
    if sum(iso.groups) != len(iso.suspects):
        iso.groups = begin(iso.suspects).groups if iso.suspects else []
        iso.strikes = 0
    if not iso.suspects:
        iso.strikes, iso.trying = 0, False


def first_group(iso: Isolation) -> list[int]:
    """The lines to feed next, alone."""
    return iso.suspects[: iso.groups[0]] if iso.groups else []


def resolve_first(iso: Isolation) -> None:
    """The first group ran alone to its end without a death: whatever of it was not
    answered was never a request (blank, or no line of the input), so none of it is
    suspect any more."""
    if iso.groups:
        del iso.suspects[: iso.groups[0]]
        iso.groups.pop(0)
    iso.strikes, iso.trying = 0, False


def finished(iso: Isolation, done: set[int]) -> None:
    """Lines of the first group that completed leave the suspects; a group wholly
    done is resolved (innocent) and the next one is up."""
    if not iso.groups:
        return
    size = iso.groups[0]
    left = [line for line in iso.suspects[:size] if line not in done]
    iso.suspects[:size] = left
    if left:
        iso.groups[0] = len(left)
    else:
        iso.groups.pop(0)
        iso.strikes = 0
        iso.trying = False


def blame(iso: Isolation) -> int | None:
    """The first group was in flight when the engine died: split it in halves, or
    give its lone line a strike. Returns the line to dead-letter (second strike)."""
    iso.trying = False
    size = iso.groups[0]
    if size > 1:
        iso.groups[0:1] = [size // 2, size - size // 2]
        iso.strikes = 0
        return None
    iso.strikes += 1
    if iso.strikes < STRIKES_TO_BLAME:
        return None
    iso.groups.pop(0)
    iso.strikes = 0
    return iso.suspects.pop(0)


def culprit_message(line: int) -> str:
    """The errors.jsonl message of a dead-lettered culprit."""
    return (
        f"line {line}: this request crashed the engine ({STRIKES_TO_BLAME} times, run "
        "alone); it was not run again"
    )
