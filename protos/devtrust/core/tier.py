"""The trust tier of draft-ietf-rats-ar4si, the one value a relying party gates on."""

from __future__ import annotations

from enum import IntEnum


class Tier(IntEnum):
    """Ordered so that ``max`` is the worst."""

    NONE = 0
    AFFIRMING = 1
    WARNING = 2
    CONTRAINDICATED = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Tier:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown tier {text!r}: one of none, affirming, warning, contraindicated"
            ) from None

    def meets(self, minimum: Tier) -> bool:
        """True when this tier is ``minimum`` or better. NONE (nothing appraised) meets
        nothing: the integer order puts it first, and a bare ``tier <= minimum`` would let
        an unappraised device through every gate."""
        return self is not Tier.NONE and self <= minimum
