"""Inputs for the suite's bounded fuzzing (tests/test_fuzz_parsers.py): raw bytes, and the
seeds mutated the way parsers break: bit flips, truncations, splices of two seeds, inserted
and deleted runs, and length fields overwritten with boundary values.

A mutation is data (a tuple), drawn by hypothesis, so a failing input shrinks to few small
mutations of one seed and is printed as such."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

# Values that sit on the boundaries of 1-, 2-, 4- and 8-byte length and count fields.
BOUNDARIES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 2**31, 2**32 - 1)
WIDTHS = (1, 2, 4, 8)

Mutation = tuple[str, int, int, int]

_positions = st.integers(min_value=0, max_value=2**16)
mutation: st.SearchStrategy[Mutation] = st.one_of(
    st.tuples(st.just("flip"), _positions, st.integers(0, 7), st.just(0)),
    st.tuples(st.just("truncate"), _positions, st.just(0), st.just(0)),
    st.tuples(st.just("delete"), _positions, st.integers(1, 64), st.just(0)),
    st.tuples(st.just("insert"), _positions, st.integers(0, 255), st.integers(1, 64)),
    st.tuples(st.just("splice"), _positions, st.integers(0, 2**8), _positions),
    st.tuples(
        st.just("field"),
        _positions,
        st.sampled_from(WIDTHS),
        st.sampled_from(BOUNDARIES),
    ),
)


def apply(seed: bytes, mutations: Sequence[Mutation], seeds: Sequence[bytes]) -> bytes:
    """``seed`` with each mutation applied in turn; positions wrap around the current length.
    A length field is written big-endian or little-endian by the parity of its position (TPM
    structures are big-endian, event logs little-endian)."""
    data = bytearray(seed)
    for kind, at, a, b in mutations:
        pos = at % (len(data) + 1)
        if kind == "flip" and data:
            data[pos % len(data)] ^= 1 << a
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + a]
        elif kind == "insert":
            data[pos:pos] = bytes([a]) * b
        elif kind == "splice":
            other = seeds[a % len(seeds)]
            data[pos:] = other[b % (len(other) + 1) :]
        elif kind == "field":
            value = b % (1 << (8 * a))
            data[pos : pos + a] = value.to_bytes(a, "big" if at % 2 else "little")
    return bytes(data)


def inputs(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Raw bytes, or a seed with one to four mutations (three draws in four)."""
    mutated = st.builds(
        lambda seed, mutations: apply(seed, mutations, seeds),
        st.sampled_from(seeds),
        st.lists(mutation, min_size=1, max_size=4),
    )
    return st.one_of(st.binary(max_size=512), mutated, mutated, mutated)
