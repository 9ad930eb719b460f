"""The score head's mapping, against values worked out by hand (never against itself).

p(yes) = softmax((logit_no, logit_yes))[yes] = e^yes / (e^no + e^yes) = 1 / (1 + e^-(yes - no)).
"""

from __future__ import annotations

import math

import pytest

from lychee_server.engine.interface import probability

# (logit gap yes - no, p(yes)) by hand: sigmoid(0) = 1/2; sigmoid(ln 3) = 1/(1 + 1/3) = 3/4;
# sigmoid(ln 1/9) = 1/(1 + 9) = 1/10; sigmoid(1) = e/(1 + e) = 0.7310585786300049.
HAND = [
    (0.0, 0.5),
    (math.log(3), 0.75),
    (-math.log(3), 0.25),
    (math.log(1 / 9), 0.1),
    (math.log(99), 0.99),
    (1.0, 0.7310585786300049),
    (-1.0, 0.2689414213699951),
    (2.5, 0.9241418199787566),
]


@pytest.mark.parametrize("gap,want", HAND)
def test_probability_matches_hand_values(gap: float, want: float) -> None:
    assert probability(gap) == pytest.approx(want, abs=1e-12)


def test_probability_is_the_two_way_softmax_of_raw_logits() -> None:
    no, yes = 3.25, 1.75  # e^1.75 / (e^3.25 + e^1.75) = 1 / (1 + e^1.5) = 0.18242552380635635
    assert probability(yes - no) == pytest.approx(0.18242552380635635, abs=1e-12)
    assert probability(no - yes) == pytest.approx(1 - 0.18242552380635635, abs=1e-12)


def test_probability_saturates_without_overflow_and_keeps_tails() -> None:
    assert probability(800.0) == 1.0 and probability(-800.0) == 0.0  # exp(800) would overflow
    assert probability(-40.0) == pytest.approx(math.exp(-40.0), rel=1e-12)  # 4.2e-18, not rounded to 0
    assert probability(math.inf) == 1.0 and probability(-math.inf) == 0.0
    assert math.isnan(probability(math.nan))
    assert probability(1e-9) > 0.5 > probability(-1e-9)  # strictly increasing through 0
