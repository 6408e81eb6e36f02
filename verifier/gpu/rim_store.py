"""The RIM store: a directory of NVIDIA RIMs verified when they were added
(``devtrust gpu rim add``), read by the verifier (config ``gpu.rim_store``) as its
``RimSource``.

Layout: ``index.json`` ({"format": 1, "rims": [entry, ...]}: kind, version, product,
tag_id, measurements (hex), signer, source, sha256, verified_at) and each RIM's original
bytes as ``<sha256>.swidtag`` (a SWID tag) or ``<sha256>.corim`` (a signed CoRIM) beside
it (the name is derived from the digest and format, never read from the index); a CoRIM
added with its signer's certificate given (NVIDIA does not embed it) keeps that chain in its
entry ("signer_chain", PEM) for re-verification. Writes go through a temporary file and a
rename, under a lock file, so a reader sees the old index or the new one.

Opening the store does not verify signatures again (they were verified when added, and
NVIDIA's signers expire) but checks each file against the sha256 in the index: a file
changed or gone is named in ``problems`` and left out; the others load. ``open(path,
roots=...)`` also re-verifies each file at the time it was verified when added, and takes
the values from the file rather than from the index (for a store whose directory is not
protected as the verifier's configuration is).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from devtrust.core.errors import ConfigError
from devtrust.core.files import write_atomic
from devtrust.verifier.errors import NotFound
from devtrust.verifier.gpu.corim import load_any_rim
from devtrust.verifier.gpu.rim import MAX_RIM_BYTES, RimFormatError, RimSignatureError
from devtrust.verifier.gpu.types import ReferenceMeasurement, Rim, RimKind, same_version

__all__ = ["MAX_ENTRIES", "MAX_INDEX_BYTES", "RimStore", "RimStoreError", "StoredRim"]

logger = logging.getLogger(__name__)

INDEX = "index.json"
LOCK = ".lock"
FORMAT = 1
SUFFIX = ".swidtag"
SUFFIXES = {"swid": SUFFIX, "corim": ".corim"}
MAX_ENTRIES = 1024  # a driver RIM per driver version, a VBIOS RIM per VBIOS: years of them
MAX_INDEX_BYTES = 16 * 1024 * 1024  # ~6 KiB an entry (21 active measurements in hex)
FILE_MODE = 0o644  # RIMs are public documents; the directory's owner decides who writes
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RimStoreError(ConfigError):
    """The store's index cannot be read or written; the message names the path and why."""


@dataclass(frozen=True, slots=True)
class StoredRim:
    """A RIM in the store: its values, the digest of its original file, and when it was
    verified (the time given to ``add``)."""

    rim: Rim
    sha256: str
    verified_at: datetime
    # PEM of the signer chain given at ``add`` (a CoRIM without x5chain); "" when none.
    signer_chain: str = ""

    @property
    def file(self) -> str:
        return f"{self.sha256}{SUFFIXES.get(self.rim.format, SUFFIX)}"

    def signer(self) -> list[x509.Certificate]:
        return (
            x509.load_pem_x509_certificates(self.signer_chain.encode()) if self.signer_chain else []
        )


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry(stored: StoredRim) -> dict[str, Any]:
    rim = stored.rim
    return {
        "kind": rim.kind.value,
        "version": rim.version,
        "product": rim.product,
        "tag_id": rim.tag_id,
        "format": rim.format,
        "signer": rim.signer,
        "source": rim.source,
        "sha256": stored.sha256,
        "verified_at": _utc(stored.verified_at),
        "signer_chain": stored.signer_chain,
        "measurements": [
            {
                "index": m.index,
                "size": m.size,
                "name": m.name,
                "alternatives": [value.hex() for value in m.alternatives],
            }
            for m in rim.measurements
        ],
    }


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise TypeError(f"{key}: expected a string, found {type(value).__name__}")
    return value


def _measurement(item: Any) -> ReferenceMeasurement:
    if not isinstance(item, dict):
        raise TypeError(f"measurement: expected an object, found {type(item).__name__}")
    index, size, values = item.get("index"), item.get("size"), item.get("alternatives")
    if type(index) is not int or type(size) is not int or not isinstance(values, list):
        raise ValueError("measurement: expected index, size (integers) and alternatives")
    parsed = tuple(bytes.fromhex(v) if isinstance(v, str) else b"" for v in values)
    if not parsed or any(len(v) != size for v in parsed):
        raise ValueError(f"measurement {index}: expected {size}-byte hex alternatives")
    return ReferenceMeasurement(index, parsed, size, str(item.get("name", "")))


def _from_entry(entry: Any) -> StoredRim:
    """An index entry as a StoredRim; ValueError names the field that does not fit."""
    if not isinstance(entry, dict):
        raise TypeError(f"expected an object, found {type(entry).__name__}")
    sha256 = _text(entry, "sha256")
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256: expected 64 lowercase hex digits, found {sha256[:80]!r}")
    verified_at = datetime.fromisoformat(_text(entry, "verified_at"))
    if verified_at.tzinfo is None:
        raise ValueError("verified_at: expected a time with its zone")
    measurements = entry.get("measurements")
    if not isinstance(measurements, list):
        raise TypeError("measurements: expected a list")
    rim = Rim(
        kind=RimKind(_text(entry, "kind")),
        version=_text(entry, "version"),
        product=_text(entry, "product"),
        tag_id=_text(entry, "tag_id"),
        measurements=tuple(_measurement(item) for item in measurements),
        signer=_text(entry, "signer"),
        source=_text(entry, "source"),
        format=_text(entry, "format"),
    )
    if rim.format not in SUFFIXES:
        raise ValueError(f"format: expected one of {sorted(SUFFIXES)}, found {rim.format[:32]!r}")
    chain = entry.get("signer_chain", "")  # absent in entries written before CoRIMs
    if not isinstance(chain, str):
        raise TypeError(f"signer_chain: expected a string, found {type(chain).__name__}")
    return StoredRim(rim, sha256, verified_at, chain)


class RimStore:
    """The RIMs of a store directory, as loaded by ``open``. ``find`` implements RimSource."""

    def __init__(
        self,
        path: Path,
        entries: Sequence[StoredRim],
        problems: Sequence[str] = (),
        *,
        roots: Sequence[x509.Certificate] | None = None,
    ) -> None:
        self.path = path
        self._roots = None if roots is None else tuple(roots)
        self._entries = list(entries)
        # Entries left out when opened (file changed or gone, entry unreadable), each a
        # sentence naming the file; the CLI lists them, the verifier logs them.
        self.problems: tuple[str, ...] = tuple(problems)

    @classmethod
    def open(cls, path: Path, *, roots: Sequence[x509.Certificate] | None = None) -> RimStore:
        """The store at ``path`` (an absent directory or index is an empty store).
        ``RimStoreError`` when the index itself is unreadable; each entry that does not
        load is a problem, not an error. ``roots``: also re-verify each file (see above)."""
        entries, problems = _load(path, roots)
        for problem in problems:
            logger.warning("RIM store %s: %s", path, problem)
        return cls(path, entries, problems, roots=roots)

    def list(self) -> tuple[StoredRim, ...]:
        return tuple(sorted(self._entries, key=lambda s: (s.rim.kind.value, s.rim.version)))

    def find(self, kind: RimKind, version: str) -> Rim | None:
        """The RIM of ``kind`` for exactly ``version`` (NVIDIA's hex digits in either case)."""
        for stored in self._entries:
            if stored.rim.kind is kind and same_version(stored.rim.version, version):
                return stored.rim
        return None

    def add(
        self,
        data: bytes,
        *,
        roots: Sequence[x509.Certificate],
        at: datetime,
        source: str = "",
        signer: Sequence[x509.Certificate] = (),
        replace: bool = False,
    ) -> Rim:
        """Verify ``data`` (a SWID tag or a signed CoRIM: ``corim.load_any_rim`` at ``at``,
        ``signer`` the CoRIM signer's chain when the CoRIM does not carry it; its errors pass
        through) and keep it: the original bytes, then the index entry. A RIM of the same kind
        and version with other content is replaced only with ``replace``: NVIDIA signs more
        than one RIM for a version (a production and a test VBIOS RIM, both valid, with other
        golden values), and which one is compared must be the operator's choice, never the
        last file added (RimStoreError names both). The same file again changes nothing."""
        rim = load_any_rim(data, roots=roots, at=at, signer=signer, source=source)
        chain = "".join(c.public_bytes(Encoding.PEM).decode() for c in signer)
        stored = StoredRim(
            rim, hashlib.sha256(data).hexdigest(), at, chain if rim.format == "corim" else ""
        )
        with self._locked():
            entries, problems = _load(self.path, self._roots)
            kept = [
                s
                for s in entries
                if not (s.rim.kind is rim.kind and same_version(s.rim.version, rim.version))
            ]
            held = [s for s in entries if s not in kept and s.sha256 != stored.sha256]
            if held and not replace:
                raise RimStoreError(
                    f"RIM store {self.path}: it holds another {rim.kind.value} RIM for "
                    f"{rim.version} (sha256 {held[0].sha256}, tag {held[0].rim.tag_id}, from "
                    f"{held[0].rim.source or '?'}) than this one (sha256 {stored.sha256}, "
                    f"from {source or '?'}): give --replace to compare with this one instead"
                )
            if len(kept) >= MAX_ENTRIES:
                raise RimStoreError(
                    f"RIM store {self.path}: expected at most {MAX_ENTRIES} RIMs, found "
                    f"{len(kept)} already; remove old ones (devtrust gpu rim remove)"
                )
            self._write(self.path / stored.file, bytes(data), FILE_MODE)
            self._save([*kept, stored])
            self._drop_unreferenced(entries, [*kept, stored])
            self._entries, self.problems = [*kept, stored], tuple(problems)
        return rim

    def remove(self, kind: RimKind, version: str) -> StoredRim:
        """Take the RIM of ``kind`` for ``version`` out; NotFound names what the store has."""
        with self._locked():
            entries, problems = _load(self.path, self._roots)
            gone = [
                s for s in entries if s.rim.kind is kind and same_version(s.rim.version, version)
            ]
            if not gone:
                held = ", ".join(f"{s.rim.kind.value} {s.rim.version}" for s in entries)
                raise NotFound(
                    f"RIM store {self.path}: expected a {kind.value} RIM for {version}, found "
                    f"{held or 'no RIMs'}"
                )
            kept = [s for s in entries if s not in gone]
            self._save(kept)
            self._drop_unreferenced(entries, kept)
            self._entries, self.problems = kept, tuple(problems)
        return gone[0]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (``flock`` on ``.lock``: released when the process ends)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = (self.path / LOCK).open("a")
        except OSError as exc:
            raise RimStoreError(f"RIM store {self.path}: cannot open: {exc.strerror}") from None
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        try:
            write_atomic(path, data, mode=mode)
        except OSError as exc:
            raise RimStoreError(f"RIM store: cannot write {path}: {exc.strerror}") from None

    def _save(self, entries: Sequence[StoredRim]) -> None:
        document = {"format": FORMAT, "rims": [_entry(s) for s in entries]}
        text = json.dumps(document, indent=1, sort_keys=True) + "\n"
        self._write(self.path / INDEX, text.encode("utf-8"), FILE_MODE)

    def _drop_unreferenced(self, before: Sequence[StoredRim], after: Sequence[StoredRim]) -> None:
        still = {s.sha256 for s in after}
        for stored in before:
            if stored.sha256 not in still:
                (self.path / stored.file).unlink(missing_ok=True)


def _read_index(path: Path) -> list[Any]:
    index = path / INDEX
    if path.exists() and not path.is_dir():
        raise RimStoreError(f"RIM store {path}: expected a directory, found a file")
    try:
        with index.open("rb") as handle:
            raw = handle.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RimStoreError(f"RIM store {index}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise RimStoreError(
            f"RIM store {index}: expected at most {MAX_INDEX_BYTES} bytes, found more"
        )
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RimStoreError(f"RIM store {index}: expected JSON, found: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RimStoreError(
            f"RIM store {index}: expected an object with format {FORMAT}, found "
            f"{document.get('format') if isinstance(document, dict) else type(document).__name__}"
        )
    rims = document.get("rims")
    if not isinstance(rims, list) or len(rims) > MAX_ENTRIES:
        found = f"{len(rims)} entries" if isinstance(rims, list) else type(rims).__name__
        raise RimStoreError(
            f"RIM store {index}: rims: expected a list of at most {MAX_ENTRIES}, found {found}"
        )
    return rims


def _load(
    path: Path, roots: Sequence[x509.Certificate] | None
) -> tuple[list[StoredRim], list[str]]:
    entries: list[StoredRim] = []
    problems: list[str] = []
    for n, raw in enumerate(_read_index(path)):
        try:
            stored = _from_entry(raw)
        except (ValueError, TypeError) as exc:
            problems.append(f"{INDEX} entry {n}: {exc}; left out")
            continue
        problem = _check_file(path, stored)
        if not problem and roots is not None:  # the values the signature covers, not the index's
            try:
                rim = load_any_rim(
                    _read_file(path, stored),
                    roots=roots,
                    at=stored.verified_at,
                    signer=stored.signer(),
                )
                stored = replace(stored, rim=replace(rim, source=stored.rim.source))
            except (RimFormatError, RimSignatureError, ValueError) as exc:  # ValueError: PEM
                problem = f"{_name(stored)}: does not verify at {_utc(stored.verified_at)}: {exc}"
        if problem:
            problems.append(f"{problem}; left out")
            continue
        if any(
            s.rim.kind is stored.rim.kind and same_version(s.rim.version, stored.rim.version)
            for s in entries
        ):
            problems.append(
                f"{INDEX} entry {n}: a second {stored.rim.kind.value} RIM for "
                f"{stored.rim.version}; left out"
            )
            continue
        entries.append(stored)
    return entries, problems


def _read_file(path: Path, stored: StoredRim) -> bytes:
    with (path / stored.file).open("rb") as handle:
        return handle.read(MAX_RIM_BYTES + 1)


def _name(stored: StoredRim) -> str:
    return f"{stored.rim.kind.value} RIM {stored.rim.version} ({stored.file})"


def _check_file(path: Path, stored: StoredRim) -> str:
    """ "" when the file is the one the index names, else why not."""
    try:
        data = _read_file(path, stored)
    except OSError as exc:
        return f"{_name(stored)}: cannot read: {exc.strerror}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != stored.sha256:
        return (
            f"{_name(stored)}: expected sha256 {stored.sha256}, found {digest}: the file was "
            "changed after it was added (add the RIM again)"
        )
    return ""
