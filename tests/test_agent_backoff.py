"""The agent's backoff (full jitter), its verifier addresses (a list, DNS names with several
records) and their configuration (issue 12, C6): pure pieces, no network."""

from __future__ import annotations

import ast
import asyncio
import random
from pathlib import Path

import grpc
import pytest

from devtrust.agent.addresses import AddressRing, Resolver, Target, expand, split_address
from devtrust.agent.backoff import (
    DRAIN_JITTER_S,
    Backoff,
    ceiling,
    drain_delay,
    full_jitter,
)
from devtrust.agent.channel import channel_options, drained
from devtrust.agent.config import AgentConfig, VerifierEndpoint
from devtrust.core.errors import ConfigError


def _top(low: float, high: float) -> float:
    return high


# --- backoff ---------------------------------------------------------------------------------


def test_ceiling_doubles_from_min_to_max() -> None:
    caps = [ceiling(n, min_s=0.5, max_s=30.0) for n in range(9)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # A counter that ran for years neither overflows nor passes the cap.
    assert ceiling(10_000, min_s=0.5, max_s=30.0) == 30.0
    with pytest.raises(ValueError, match="attempt must be 0 or more"):
        ceiling(-1, min_s=0.5, max_s=30.0)


def test_every_wait_is_drawn_from_zero_to_the_cap() -> None:
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    backoff = Backoff(min_s=0.5, max_s=4.0, uniform=uniform)
    waits = [backoff.delay() for _ in range(6)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # Full jitter: each draw starts at zero, not at a fraction of the cap.
    assert all(low == 0.0 for low, _ in draws)


def test_reset_after_a_result_starts_again_at_min() -> None:
    backoff = Backoff(min_s=0.5, max_s=30.0, uniform=_top)
    for _ in range(5):
        backoff.delay()
    assert backoff.bound == 16.0
    backoff.reset()
    assert backoff.bound == 0.5
    assert backoff.delay() == 0.5


def test_a_max_below_min_caps_every_wait() -> None:
    """Tests configure reconnect_max_s under the default minimum: the cap still holds."""
    backoff = Backoff(min_s=0.5, max_s=0.1, uniform=_top)
    assert [backoff.delay() for _ in range(3)] == [0.1, 0.1, 0.1]


def test_backoff_refuses_non_positive_bounds() -> None:
    with pytest.raises(ValueError, match="min_s must be positive"):
        Backoff(min_s=0.0)
    with pytest.raises(ValueError, match="max_s must be positive"):
        Backoff(max_s=-1.0)


def test_full_jitter_spreads_waits_over_the_whole_window() -> None:
    """Distribution sanity, no timing: 4,000 draws at the cap of 8 s fall in [0, 8], about
    half below 4 s, with both ends of the window reached (a +-20 % jitter would put none
    below 6.4 s)."""
    rng = random.Random(12)  # noqa: S311 - seeded, for a repeatable test
    draws = [full_jitter(4, min_s=0.5, max_s=30.0, uniform=rng.uniform) for _ in range(4000)]
    assert all(0.0 <= d <= 8.0 for d in draws)
    below_half = sum(d < 4.0 for d in draws) / len(draws)
    assert 0.45 < below_half < 0.55
    assert min(draws) < 0.4
    assert max(draws) > 7.6
    assert 3.6 < sum(draws) / len(draws) < 4.4


def test_a_drain_waits_at_most_a_second() -> None:
    rng = random.Random(3)  # noqa: S311 - seeded, for a repeatable test
    waits = [drain_delay(rng.uniform) for _ in range(1000)]
    assert all(0.0 <= w <= DRAIN_JITTER_S for w in waits)
    assert DRAIN_JITTER_S == 1.0


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, trailer: tuple[tuple[str, str], ...]) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailer), "bye")


@pytest.mark.parametrize(
    ("code", "trailer", "expected"),
    [
        pytest.param(
            grpc.StatusCode.UNAVAILABLE, (("devtrust-drain", "1"),), True, id="drain trailer"
        ),
        pytest.param(grpc.StatusCode.UNAVAILABLE, (), False, id="unavailable without trailer"),
        pytest.param(
            grpc.StatusCode.UNAVAILABLE, (("devtrust-drain", "0"),), False, id="trailer not 1"
        ),
        pytest.param(
            grpc.StatusCode.INTERNAL, (("devtrust-drain", "1"),), False, id="another status"
        ),
    ],
)
def test_a_drain_is_unavailable_with_its_trailer(
    code: grpc.StatusCode, trailer: tuple[tuple[str, str], ...], expected: bool
) -> None:
    assert drained(_RpcError(code, trailer)) is expected


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("verifier.example:7444", ("verifier.example", 7444)),
        ("dns:///verifier.example:7444", ("verifier.example", 7444)),
        ("10.0.0.5:7444", ("10.0.0.5", 7444)),
        ("[fd00::5]:7444", ("fd00::5", 7444)),
        ("unix:/run/devtrust/verifier.sock", None),
        ("ipv4:10.0.0.5:7444", None),
    ],
)
def test_addresses_split(address: str, expected: tuple[str, int] | None) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "is empty"),
        ("verifier.example", "expected HOST:PORT"),
        ("verifier.example:0", "port 0 is not in 1-65535"),
        ("verifier.example:70000", "port 70000 is not in 1-65535"),
        ("verifier.example:https", "port https is not in 1-65535"),
        (":7444", "expected HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_address(address)


def _resolver(table: dict[str, list[str]], asked: list[str] | None = None) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if asked is not None:
            asked.append(host)
        if host not in table:
            raise OSError(f"no such name {host}")
        return table[host]

    return resolve


def test_a_name_with_several_records_is_several_addresses_checked_by_its_name() -> None:
    resolve = _resolver({"verifiers.example": ["10.0.0.5", "10.0.0.6", "fd00::7"]})
    targets = asyncio.run(expand("verifiers.example:7444", server_name="", resolver=resolve))
    assert targets == [
        Target("ipv4:10.0.0.5:7444", "verifiers.example:7444", "verifiers.example"),
        Target("ipv4:10.0.0.6:7444", "verifiers.example:7444", "verifiers.example"),
        Target("ipv6:[fd00::7]:7444", "verifiers.example:7444", "verifiers.example"),
    ]
    assert str(targets[0]) == "verifiers.example:7444 (10.0.0.5:7444)"
    # verifier.server_name, when set, is the name checked instead.
    named = asyncio.run(
        expand("verifiers.example:7444", server_name="verifier.internal", resolver=resolve)
    )
    assert {t.tls_name for t in named} == {"verifier.internal"}


def test_an_ip_address_is_not_resolved_and_a_name_that_does_not_resolve_is_dialled_as_is() -> None:
    asked: list[str] = []
    resolve = _resolver({}, asked)
    [ip] = asyncio.run(expand("10.0.0.5:7444", server_name="", resolver=resolve))
    assert ip == Target("10.0.0.5:7444", "10.0.0.5:7444", "")
    [unknown] = asyncio.run(expand("gone.example:7444", server_name="", resolver=resolve))
    # gRPC then fails it in its own words, as any unreachable address.
    assert unknown == Target("gone.example:7444", "gone.example:7444", "")
    assert asked == ["gone.example"]


def test_the_ring_moves_through_every_record_then_the_next_entry_and_resolves_again() -> None:
    table = {"a.example": ["10.0.0.1", "10.0.0.2"], "b.example": ["10.0.1.1"]}
    asked: list[str] = []
    ring = AddressRing(["a.example:7444", "b.example:7444"], resolver=_resolver(table, asked))

    async def walk(steps: int) -> list[str]:
        seen = []
        for _ in range(steps):
            seen.append((await ring.current()).target)
            ring.advance()
        return seen

    first = asyncio.run(walk(3))
    assert first == ["ipv4:10.0.0.1:7444", "ipv4:10.0.0.2:7444", "ipv4:10.0.1.1:7444"]
    # DNS changed meanwhile: the next round sees it.
    table["a.example"] = ["10.0.0.9"]
    assert asyncio.run(walk(2)) == ["ipv4:10.0.0.9:7444", "ipv4:10.0.1.1:7444"]
    assert asked == ["a.example", "b.example", "a.example", "b.example"]


def test_the_current_address_stays_until_it_fails() -> None:
    ring = AddressRing(["10.0.0.1:7444", "10.0.0.2:7444"])

    async def twice() -> tuple[Target, Target]:
        return await ring.current(), await ring.current()

    one, two = asyncio.run(twice())
    assert one == two
    assert one.target == "10.0.0.1:7444"


# --- configuration ---------------------------------------------------------------------------


def test_one_address_or_a_list(tmp_path: Path) -> None:
    one = VerifierEndpoint(enrollment="v:7443", attestation="v:7444")
    assert one.enrollment_addresses == ("v:7443",)
    assert one.attestation_addresses == ("v:7444",)
    path = tmp_path / "agent.yaml"
    path.write_text(
        "verifier:\n"
        "  enrollment: [a.example:7443, b.example:7443]\n"
        "  attestation:\n    - a.example:7444\n    - 10.0.0.6:7444\n"
    )
    cfg = AgentConfig.load(path)
    assert cfg.verifier.enrollment_addresses == ("a.example:7443", "b.example:7443")
    assert cfg.verifier.attestation_addresses == ("a.example:7444", "10.0.0.6:7444")
    assert cfg.reconnect_min_s == 0.5
    assert cfg.reconnect_max_s == 30.0


@pytest.mark.parametrize(
    ("verifier", "message"),
    [
        pytest.param(
            "  attestation: []\n",
            "attestation is an empty list: give at least one HOST:PORT",
            id="empty list",
        ),
        pytest.param(
            "  attestation: [a.example:7444, 'b.example:99999']\n",
            "attestation[1] b.example:99999: port 99999 is not in 1-65535",
            id="bad entry named",
        ),
        pytest.param(
            "  enrollment: [a.example:7443, '']\n",
            "enrollment[1] is empty",
            id="empty entry named",
        ),
        pytest.param(
            "  enrollment: [a.example:7443, 5]\n",
            "verifier.enrollment[1]: expected str, got 5",
            id="entry not text",
        ),
        pytest.param(
            "  enrollment: a.example:99999\n",
            "enrollment a.example:99999: port 99999 is not in 1-65535",
            id="single address still checked",
        ),
    ],
)
def test_bad_address_lists_are_one_line_errors(tmp_path: Path, verifier: str, message: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("verifier:\n" + verifier)
    with pytest.raises(ConfigError) as caught:
        AgentConfig.load(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_reconnect_min_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("reconnect_min_s: 0\n")
    with pytest.raises(ConfigError, match="reconnect_min_s must be positive"):
        AgentConfig.load(path)


# --- keepalive and deadlines -----------------------------------------------------------------


def test_every_channel_has_keepalive_that_pings_through_a_quiet_stream() -> None:
    options = dict(
        channel_options(Target("10.0.0.5:7444", "verifiers.example:7444", "verifiers.example"))
    )
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    # 0: pings go on while the stream carries no data (a whole challenge interval).
    assert options["grpc.http2.max_pings_without_data"] == 0
    # Each record of a name is dialled by address, TLS still checks the name.
    assert options["grpc.ssl_target_name_override"] == "verifiers.example"
    assert "grpc.ssl_target_name_override" not in dict(channel_options(Target("a:1", "a:1")))


def test_every_call_the_agent_makes_has_a_deadline() -> None:
    """Each call on a stub in agent/ passes ``timeout=`` (STYLE 15): a verifier that stops
    answering mid-call cannot hold the agent forever."""
    agent = Path(__file__).resolve().parent.parent / "agent"
    calls: list[str] = []
    for path in sorted(agent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "stub"
            ):
                where = f"{path.name}:{node.lineno} stub.{node.func.attr}"
                calls.append(where)
                assert any(k.arg == "timeout" for k in node.keywords), f"{where}: no timeout"
    assert len(calls) >= 3, calls  # Enroll, Activate, Attest
