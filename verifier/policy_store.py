"""The fleet's policy, kept in the database (issue 12, C2): every replica appraises with one.

The rule: the database holds the fleet's policy.
- At start a replica publishes the policy of its own files when the database holds none;
  when it holds one, the replica uses that one, loaded from the documents stored with it
  (its text and data files, not this host's files), and warns, naming both digests, when
  its own files say something else.
- ReloadPolicy and SIGHUP, on any replica, load that replica's files and publish them (the
  audit trail names the operator, or ``local/sighup``); a policy that does not load is
  refused there, and nothing is published.
- Every other replica follows the ``policy`` row on the change feed: it loads the stored
  documents and takes the policy only when its digest is the one stored (refused and logged
  otherwise: the old policy stays).

A stored policy's documents are its text, under ``MAIN``, and each data file it names, under
the name it gives relative to its own directory. A replica loading them writes them to a
directory of its own (the policy's data paths and the policy workers, verifier/policy_pool.py,
read files), one per digest, removed at stop. Names from the database are checked before any
file is written: relative, without ``..``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from devtrust.core.errors import ConfigError
from devtrust.verifier.policy import Policy, PolicyError, PolicyHolder
from devtrust.verifier.storage.changes import POLICY, Change
from devtrust.verifier.storage.interfaces import Policies, StoredPolicy

logger = logging.getLogger(__name__)
Clock = Callable[[], datetime.datetime]
# The policy's own text among its documents.
MAIN = "policy.yaml"
# A stored policy's digest: hex sha256 (anything else in the row is refused before use).
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Actors of the audit entries of publications without an operator.
START_ACTOR = "local/start"
SIGHUP_ACTOR = "local/sighup"


def _data_files(policy: Policy) -> list[str]:
    """The data files the policy names (relative to its directory), as written."""
    return _data_files_of(policy.text)


def _data_files_of(text: str) -> list[str]:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy text is not YAML: {exc}") from exc
    section = data.get("data") if isinstance(data, dict) else None
    named = section.get("bulletins") if isinstance(section, dict) else None
    return [str(named)] if named else []


def _document_name(name: str, *, what: str) -> PurePosixPath:
    """A document's name as a relative path beneath the policy's directory, or PolicyError."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name == MAIN:
        raise PolicyError(
            f"{what} {name!r}: a policy shared through the database names its data files "
            f"relative to its own directory, beneath it (not {MAIN})"
        )
    return path


def documents_of(policy: Policy) -> dict[str, str]:
    """Every file ``policy`` was loaded from, by name: its text under ``MAIN``, each data
    file under the name the policy gives it. PolicyError when one cannot be read or named."""
    if not policy.text:
        raise PolicyError(f"policy {policy.policy_id} has no text to publish")
    documents = {MAIN: policy.text}
    for name in _data_files(policy):
        _document_name(name, what=f"{policy.source}: data file")
        file = policy.base / name
        try:
            documents[name] = file.read_bytes().decode("utf-8")
        except OSError as exc:
            raise PolicyError(f"{file}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{file}: not UTF-8 text (byte {exc.start})") from exc
    return documents


def write_documents(documents: dict[str, str], directory: Path) -> Path:
    """The documents as files in ``directory``; the policy file's path."""
    if MAIN not in documents:
        raise PolicyError(f"the stored policy has no {MAIN} among its documents")
    for name, text in documents.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise PolicyError(f"the stored policy's document {name!r} is not text")
        relative = PurePosixPath(MAIN) if name == MAIN else _document_name(name, what="document")
        target = directory.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text.encode("utf-8"))
    return directory / MAIN


def load_documents(documents: dict[str, str], directory: Path, *, source: str) -> Policy:
    """The policy the documents hold, its files written to ``directory`` (which must outlive
    it: the policy workers read its data files from there). PolicyError when it does not
    load."""
    main = write_documents(documents, directory)
    # The data files the text names must be among the documents, beneath the directory:
    # a policy from the database never reads this host's own files.
    for name in _data_files_of(documents[MAIN]):
        _document_name(name, what=f"{source}: data file")
        if name not in documents:
            raise PolicyError(f"{source}: data file {name!r} is not among its documents")
    return Policy.parse(documents[MAIN], source=source, base=main.parent)


def to_store(policy: Policy, *, now: datetime.datetime) -> StoredPolicy:
    """``policy`` as the database keeps it. Its documents are loaded again (in a directory
    removed after) and must give its digest: a file changed between loading and reading
    would otherwise be published under a digest it does not have."""
    documents = documents_of(policy)
    with tempfile.TemporaryDirectory(prefix="devtrust-policy-") as scratch:
        again = load_documents(documents, Path(scratch), source=policy.source)
        if again.digest != policy.digest:
            raise PolicyError(
                f"{policy.source}: its files changed while read (digest {_short(policy.digest)}"
                f", then {_short(again.digest)}): reload again"
            )
    return StoredPolicy(
        policy_id=policy.policy_id, digest=policy.digest, documents=documents, published_at=now
    )


def _short(digest: str) -> str:
    return digest[:16]


class SharedPolicy:
    """This replica's side of the fleet's policy: the holder the appraisals read, kept to
    the database's policy."""

    def __init__(
        self, holder: PolicyHolder, policies: Policies, *, origin: str, clock: Clock
    ) -> None:
        self._holder = holder
        self._policies = policies
        self._origin = origin
        self._clock = clock
        self._root: Path | None = None
        # reload and follow one at a time: a reload's publication and a followed row from
        # another replica must not cross, or this replica keeps a policy the database does
        # not hold.
        self._lock = asyncio.Lock()

    @property
    def holder(self) -> PolicyHolder:
        return self._holder

    def close(self) -> None:
        """Remove the files of the policies loaded from the database."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _load(self, stored: StoredPolicy) -> Policy:
        """The stored policy, loaded from its documents; PolicyError unless its digest is
        the one stored."""
        source = f"the database's policy {stored.policy_id!r}"
        if not isinstance(stored.digest, str) or not _DIGEST.fullmatch(stored.digest):
            raise PolicyError(f"{source}: its digest {stored.digest!r} is not hex sha256")
        if not isinstance(stored.documents, dict):
            raise PolicyError(f"{source}: its documents are not a mapping of names to text")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="devtrust-policies-"))
        # A directory of its own, named here: nothing from the database names a path.
        directory = Path(tempfile.mkdtemp(prefix="policy-", dir=self._root))
        policy = load_documents(stored.documents, directory, source=source)
        if policy.digest != stored.digest:
            raise PolicyError(
                f"{source}: its documents give digest {_short(policy.digest)}, the database "
                f"says {_short(stored.digest)}"
            )
        return policy

    async def start(self) -> None:
        """At start: publish this replica's policy when the database holds none, else take
        the stored one (warning when the files here differ)."""
        local = self._holder.current
        stored = await self._policies.current()
        if stored is None:
            if local is not None:
                try:
                    await self._publish(local, actor=START_ACTOR)
                except PolicyError as exc:
                    raise ConfigError(
                        f"policy cannot be shared through the database: {exc}"
                    ) from exc
                logger.info(
                    "policy %s (digest %s) published to the database: the first of the fleet",
                    local.policy_id,
                    _short(local.digest),
                )
            return
        if local is not None and local.digest == stored.digest:
            return
        try:
            policy = self._load(stored)
        except PolicyError as exc:
            logger.error(  # noqa: TRY400 (the reason is the message)
                "the database's policy %s (digest %s) does not load here, this replica keeps "
                "its own files' policy (%s): %s",
                stored.policy_id,
                _short(stored.digest),
                _local_text(local),
                exc,
            )
            return
        self._holder.current = policy
        logger.warning(
            "policy: using the database's policy %s (digest %s, published %s), not this "
            "replica's files (%s): the database holds the fleet's policy; ReloadPolicy or "
            "SIGHUP publishes this replica's files",
            stored.policy_id,
            _short(stored.digest),
            stored.published_at.isoformat(),
            _local_text(local),
        )

    async def reload(self, *, actor: str) -> Policy | None:
        """ReloadPolicy or SIGHUP: this replica's files, loaded and published, then in force
        here (the others follow the feed). PolicyError keeps the old one everywhere; None:
        this replica has no policy file."""
        if self._holder.path is None:
            return None
        async with self._lock:
            policy = Policy.load(self._holder.path)
            stored = await self._policies.current()
            # The fleet's already (SIGHUP reaches every worker; files reloaded unchanged): no
            # second publication, no audit entry for a change that is none.
            if stored is None or stored.digest != policy.digest:
                await self._publish(policy, actor=actor)
            self._holder.current = policy
            # Another replica may have published after this one: the database's is the
            # fleet's; its row reaches follow() next, which takes it.
            return policy

    async def _publish(self, policy: Policy, *, actor: str) -> None:
        now = self._clock()
        await self._policies.publish(
            to_store(policy, now=now), actor=actor, origin=self._origin, now=now
        )

    async def follow(self, changes: Sequence[Change]) -> None:
        """A change feed consumer: another replica published a policy; take it when its
        documents give its digest."""
        if not any(c.kind == POLICY and c.origin != self._origin for c in changes):
            return
        async with self._lock:
            await self._follow()

    async def _follow(self) -> None:
        stored = await self._policies.current()
        current = self._holder.current
        if stored is None or (current is not None and current.digest == stored.digest):
            return
        try:
            policy = self._load(stored)
        except PolicyError as exc:
            logger.error(  # noqa: TRY400 (the reason is the message)
                "policy %s published by another verifier refused here, the old one stays: %s",
                stored.policy_id,
                exc,
            )
            return
        self._holder.current = policy
        logger.info(
            "policy %s (digest %s) in force: published by another verifier",
            policy.policy_id,
            _short(policy.digest),
        )


def _local_text(local: Policy | None) -> str:
    if local is None:
        return "none configured"
    return f"{local.policy_id}, digest {_short(local.digest)}, from {local.source}"
