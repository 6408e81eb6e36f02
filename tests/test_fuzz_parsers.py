"""Issue 12, item 5: every parser of device and operator bytes, fuzzed for a bounded number of
inputs in the suite (the long runs are ``make fuzz``: tests/fuzz/__main__.py).

Each harness (tests/fuzz/targets.py) lets only its parser's domain errors through, so any
other exception fails the test with the input that raised it. Inputs are raw bytes and the
corpus seeds mutated (tests/fuzz/mutate.py); the runs are derandomized, so the suite sees
the same inputs every time, and the seeds themselves must go through without a failure too.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz import mutate
from tests.fuzz.targets import TARGETS

# Inputs per harness: all eleven together stay near 20 s on one core. The parsers that hash,
# replay or parse YAML for every input get fewer.
EXAMPLES = {
    "tpms_attest": 1500,
    "tpm2b_public": 1500,
    "tpmt_signature": 1500,
    "eventlog": 600,
    "evidence_body": 1000,
    "smi_xml": 400,
    "sshd_config": 1500,
    "policy": 400,
    # An ECDSA P-384 verification per parsed report; a chain and XML-DSig per RIM that parses.
    "gpu_report": 800,
    "rim": 200,
    "gpu_leaf_fwid": 1500,
}


def test_every_harness_has_a_budget() -> None:
    assert set(EXAMPLES) == set(TARGETS)


@pytest.mark.parametrize("name", list(TARGETS))
def test_seeds_parse_without_a_crash(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds, f"{name}: no seeds (tests/fuzz/seeds.py)"
    for seed in seeds:
        target.check(seed)


@pytest.mark.parametrize("name", list(TARGETS))
def test_mutated_input_ends_in_a_domain_error_or_a_result(name: str) -> None:
    target = TARGETS[name]

    @settings(
        max_examples=EXAMPLES[name],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutate.inputs(target.seeds()))
    def run(data: bytes) -> None:
        target.check(data)

    run()


def test_mutations_change_the_seed() -> None:
    seed = bytes(range(16))
    assert mutate.apply(seed, [("flip", 3, 0, 0)], [seed]) == seed[:3] + b"\x02" + seed[4:]
    assert mutate.apply(seed, [("truncate", 5, 0, 0)], [seed]) == seed[:5]
    assert (
        mutate.apply(seed, [("field", 1, 2, 0xFFFF)], [seed]) == seed[:1] + b"\xff\xff" + seed[3:]
    )
    assert mutate.apply(seed, [("splice", 8, 0, 0)], [seed]) == seed[:8] + seed
