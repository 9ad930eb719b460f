"""Result ordering: descending score, ties in input order, NaN last, +/-inf in their places, top_n
after ordering; probabilities checked against hand-computed values (never the engine's function)."""

from __future__ import annotations

import asyncio
import math

import pytest
from test_scheduler_core import WAIT, make_job, running

from harness import FakeEngine
from lychee_server.domain import ScoreKind

pytestmark = pytest.mark.timeout(60)


async def _rank(*texts: str, **kw: object) -> list[tuple[int, float]]:
    async with running(FakeEngine()) as sched:
        result = await asyncio.wait_for(sched.rerank(make_job(*texts, **kw)), WAIT)  # type: ignore[arg-type]
    return [(r.index, r.score) for r in result.results]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-12), (got, want)


async def test_logits_nan_last_infinities_in_place_ties_in_input_order() -> None:
    got = await _rank("nan", "1.0", "inf", "-inf", "-2", "nan", "1.0")
    _same(got, [(2, math.inf), (1, 1.0), (6, 1.0), (4, -2.0), (3, -math.inf), (0, math.nan), (5, math.nan)])


async def test_probabilities_by_hand_and_nan_last() -> None:
    got = await _rank("nan", "0", "inf", "-inf", "1.0986122886681098", "-1.5", kind=ScoreKind.PROBABILITY)
    # sigmoid: inf -> 1, ln 3 -> 0.75, 0 -> 0.5, -1.5 -> 1/(1 + e^1.5) = 0.18242552380635635, -inf -> 0
    _same(got, [(2, 1.0), (4, 0.75), (1, 0.5), (5, 0.18242552380635635), (3, 0.0), (0, math.nan)])


async def test_top_n_cuts_after_ordering_so_nan_goes_first() -> None:
    got = await _rank("nan", "-3", "5", "0.5", top_n=3)
    _same(got, [(2, 5.0), (3, 0.5), (1, -3.0)])
    got = await _rank("nan", "nan", "-1", top_n=2)
    _same(got, [(2, -1.0), (0, math.nan)])


async def test_all_equal_scores_keep_input_order() -> None:
    got = await _rank("0.25", "0.25", "0.25", "0.25")
    _same(got, [(0, 0.25), (1, 0.25), (2, 0.25), (3, 0.25)])


async def test_timings_are_consistent_durations() -> None:
    """queue = first dispatch - admission, total = answer - admission: both within the call's wall
    time, and the queue wait plus device time fit in the total."""
    import time

    async with running(FakeEngine()) as sched:
        t0 = time.monotonic()
        result = await asyncio.wait_for(sched.rerank(make_job("1", "2", "3")), WAIT)
        wall = time.monotonic() - t0
    t = result.timings
    assert t.queue >= 0.0 and t.inference > 0.0
    assert t.queue + t.inference <= t.total <= wall
