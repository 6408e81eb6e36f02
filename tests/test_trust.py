"""Trust results: AR4SI tiers, the overall tier, the score formula, staleness."""

from __future__ import annotations

import datetime

import pytest

from devtrust.core.ids import DeviceId
from devtrust.core.tier import Tier
from devtrust.verifier.trust import Claim, TrustResult, overall_tier, tier_of, trust_score

NOW = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("value", "tier"),
    [
        (0, Tier.NONE),
        (1, Tier.NONE),
        (-1, Tier.NONE),
        (2, Tier.AFFIRMING),
        (31, Tier.AFFIRMING),
        (32, Tier.WARNING),
        (95, Tier.WARNING),
        (96, Tier.CONTRAINDICATED),
        (99, Tier.CONTRAINDICATED),
        (127, Tier.CONTRAINDICATED),
    ],
)
def test_tier_ranges(value: int, tier: Tier) -> None:
    assert tier_of(value) is tier


def test_overall_tier_is_the_worst_asserted_claim() -> None:
    assert overall_tier({}) is Tier.NONE
    assert overall_tier({Claim.HARDWARE: 2, Claim.EXECUTABLES: 0}) is Tier.AFFIRMING
    assert overall_tier({Claim.HARDWARE: 2, Claim.CONFIGURATION: 32}) is Tier.WARNING
    assert overall_tier({Claim.HARDWARE: 32, Claim.INSTANCE_IDENTITY: 99}) is Tier.CONTRAINDICATED


@pytest.mark.parametrize(
    ("claims", "score"),
    [
        ({}, 0),
        ({Claim.HARDWARE: 2, Claim.INSTANCE_IDENTITY: 2}, 100),
        ({Claim.HARDWARE: 2, Claim.CONFIGURATION: 32}, 75),
        (
            {
                Claim.HARDWARE: 2,
                Claim.CONFIGURATION: 32,
                Claim.EXECUTABLES: 2,
                Claim.FILE_SYSTEM: 2,
            },
            88,
        ),
        ({Claim.HARDWARE: 2, Claim.INSTANCE_IDENTITY: 2, Claim.EXECUTABLES: 96}, 20),
        ({Claim.INSTANCE_IDENTITY: 99}, 0),
        ({Claim.HARDWARE: 2, Claim.INSTANCE_IDENTITY: -1}, 0),  # verifier malfunction
    ],
)
def test_score_formula(claims: dict[Claim, int], score: int) -> None:
    assert trust_score(claims) == score


def test_stale_result_has_tier_none() -> None:
    result = TrustResult(
        device_id=DeviceId("d1"),
        claims={Claim.HARDWARE: 2},
        findings=(),
        appraised_at=NOW,
        expires_at=NOW + datetime.timedelta(minutes=3),
    )
    assert result.at(NOW + datetime.timedelta(minutes=2)).tier is Tier.AFFIRMING
    stale = result.at(NOW + datetime.timedelta(minutes=3))
    assert stale.tier is Tier.NONE
    assert stale.score == 0
    assert stale.findings[-1].id == "freshness.stale"
    assert "past its staleness bound" in stale.findings[-1].message


# Every pair of tiers: a tier meets a minimum when it is that good or better, and NONE
# (nothing appraised) meets none, although the integer order puts it first.
MEETS = {
    (Tier.AFFIRMING, Tier.AFFIRMING): True,
    (Tier.AFFIRMING, Tier.WARNING): True,
    (Tier.AFFIRMING, Tier.CONTRAINDICATED): True,
    (Tier.WARNING, Tier.AFFIRMING): False,
    (Tier.WARNING, Tier.WARNING): True,
    (Tier.WARNING, Tier.CONTRAINDICATED): True,
    (Tier.CONTRAINDICATED, Tier.AFFIRMING): False,
    (Tier.CONTRAINDICATED, Tier.WARNING): False,
    (Tier.CONTRAINDICATED, Tier.CONTRAINDICATED): True,
    **{(Tier.NONE, minimum): False for minimum in Tier},
    **{(tier, Tier.NONE): False for tier in Tier},
}


@pytest.mark.parametrize(
    ("tier", "minimum"), sorted(MEETS), ids=[f"{t.label}-vs-{m.label}" for t, m in sorted(MEETS)]
)
def test_tier_meets_minimum(tier: Tier, minimum: Tier) -> None:
    assert tier.meets(minimum) is MEETS[tier, minimum]


def test_every_pair_of_tiers_is_in_the_table() -> None:
    assert len(MEETS) == len(Tier) ** 2
