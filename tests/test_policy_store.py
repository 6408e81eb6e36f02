"""The fleet's policy is the database's (issue 12, C2; verifier/policy_store.py). Two
verifiers (replicas) on one database, each with a policy file of its own: the first
publishes its policy, the second appraises with the stored one (and warns, naming both
digests); ReloadPolicy or SIGHUP on either publishes its files and the other follows, taking
a policy only when its stored documents give the stored digest."""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devtrust.core.errors import ConfigError
from devtrust.core.ids import DeviceId
from devtrust.swtpm import EndorsementCA
from devtrust.v1 import query_pb2
from devtrust.verifier.config import DEFAULT_POLICY, VerifierConfig
from devtrust.verifier.pki import PkiFiles
from devtrust.verifier.policy import Policy, PolicyError, PolicyHolder
from devtrust.verifier.policy_store import MAIN, SharedPolicy, to_store, write_documents
from devtrust.verifier.server import RunningVerifier
from devtrust.verifier.storage.changes import POLICY, Change
from devtrust.verifier.storage.interfaces import StoredPolicy
from devtrust.verifier.workers import reload_policy
from tests.conftest import SwtpmFactory
from tests.env import (
    enrolled_agent,
    manual_stream,
    operator_stub,
    quote_evidence,
    running,
    verifier_config,
)

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)


def policy_dir(root: Path, policy_id: str) -> Path:
    """A copy of the shipped policy and its bulletins, under another policy_id."""
    root.mkdir(parents=True)
    text = DEFAULT_POLICY.read_text().replace(
        "policy_id: devtrust-default-gpu-hosts-1", f"policy_id: {policy_id}"
    )
    assert f"policy_id: {policy_id}" in text
    (root / "policy.yaml").write_text(text)
    shutil.copy(DEFAULT_POLICY.parent / "nvidia-driver-bulletins.csv", root)
    return root / "policy.yaml"


def replica(workdir: Path, pki: PkiFiles, ek_ca: EndorsementCA, name: str) -> VerifierConfig:
    """A verifier on the shared database with its own policy file (policy_id ``name``)."""
    return replace(verifier_config(workdir, pki, ek_ca), policy=policy_dir(workdir / name, name))


async def followed(verifier: RunningVerifier, digest: str, limit_s: float = 10.0) -> None:
    """Wait until ``verifier`` appraises with the policy of ``digest``."""
    started = time.monotonic()
    while verifier.policy.current is None or verifier.policy.current.digest != digest:
        assert time.monotonic() - started < limit_s, "the replica did not follow"
        await asyncio.sleep(0.05)


async def published(verifier: RunningVerifier) -> list[tuple[str, str]]:
    """(actor, policy id) of each policy_changed audit entry, oldest first."""
    rows = await verifier.repos.engine.read(  # type: ignore[attr-defined]
        lambda db: db.execute(
            "SELECT actor, detail FROM audit WHERE event = 'policy_changed' ORDER BY id"
        ).fetchall()
    )
    return [(str(actor), str(detail)) for actor, detail in rows]


def test_the_first_replica_publishes_and_the_next_appraises_with_the_stored_policy(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    swtpm_factory: SwtpmFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = replica(workdir, pki, endorsement_ca, "fleet-1")
    second = replica(workdir, pki, endorsement_ca, "fleet-2")
    # The second's files differ from the first's (a rule more), and say so by digest.
    (second.policy or Path()).write_text(
        (second.policy or Path()).read_text() + "\n# replica two\n"
    )
    one, two = Policy.load(first.policy or Path()), Policy.load(second.policy or Path())
    assert one.digest != two.digest

    async def scenario() -> str:
        async with running(first) as a:
            assert a.policy.current is not None
            assert a.policy.current.digest == one.digest
            async with running(second) as b:
                assert b.policy.current is not None
                assert b.policy.current.digest == one.digest
                assert b.policy.current.policy_id == "fleet-1"
                async with enrolled_agent(workdir, pki, b, swtpm_factory()) as agent:
                    reply = await manual_stream(
                        pki, b, agent, lambda challenge: quote_evidence(agent, challenge)
                    )
                actors = await published(b)
                assert [actor for actor, _ in actors] == ["local/start"]
                return reply.result.trust.policy_id

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(scenario()) == "fleet-1"
    warning = next(r.getMessage() for r in caplog.records if "database's policy" in r.getMessage())
    assert one.digest[:16] in warning
    assert two.digest[:16] in warning


def test_a_reload_on_one_replica_reaches_the_other(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """ReloadPolicy on replica B publishes B's files (audited as the operator's); A follows
    from the stored documents. Then A's file changes and A gets SIGHUP: A publishes (audited
    as local/sighup), B follows; a SIGHUP with the files unchanged publishes nothing."""
    first = replica(workdir, pki, endorsement_ca, "fleet-1")
    second = replica(workdir, pki, endorsement_ca, "fleet-2")
    two = Policy.load(second.policy or Path())

    async def scenario() -> list[tuple[str, str]]:
        async with running(first) as a, running(second) as b:
            channel, stub = operator_stub(pki, b, workdir)
            async with channel:
                reloaded = await stub.ReloadPolicy(query_pb2.ReloadPolicyRequest(), timeout=30)
            assert reloaded.policy_id == "fleet-2"
            await followed(a, two.digest)
            assert b.policy.current is not None
            assert b.policy.current.digest == two.digest
            path = first.policy or Path()
            path.write_text(path.read_text().replace("fleet-1", "fleet-3"))
            three = Policy.load(path)
            await reload_policy(a)
            await followed(b, three.digest)
            assert b.policy.current is not None
            assert b.policy.current.policy_id == "fleet-3"
            await reload_policy(a)  # the files unchanged: nothing published again
            return await published(a)

    actors = asyncio.run(scenario())
    assert [actor for actor, _ in actors] == ["local/start", "operator/alice", "local/sighup"]


def test_a_stored_policy_whose_documents_do_not_give_its_digest_is_refused(
    workdir: Path,
    pki: PkiFiles,
    endorsement_ca: EndorsementCA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Someone writes a policy into the database whose documents do not give the digest
    stored with them (changed after the digest was taken): the replica following the feed
    refuses it, says why, and keeps appraising with the policy it had."""
    config = replica(workdir, pki, endorsement_ca, "fleet-1")

    async def scenario() -> str:
        async with running(config) as verifier:
            assert verifier.policy.current is not None
            before = verifier.policy.current.digest
            good = to_store(Policy.load(config.policy or Path()), now=NOW)
            documents = dict(good.documents)
            documents[MAIN] = documents[MAIN].replace("fleet-1", "fleet-evil")
            forged = StoredPolicy("fleet-evil", "ab" * 32, documents, NOW)
            await verifier.repos.policies().publish(
                forged, actor="operator/mallory", origin="elsewhere", now=NOW
            )
            assert verifier.feed is not None
            await verifier.feed.catch_up()
            for _ in range(50):
                if "refused here" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert verifier.policy.current.digest == before
            return before

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "policy fleet-evil published by another verifier refused here" in caplog.text
    assert "its documents give digest" in caplog.text


def test_document_names_from_the_database_stay_in_their_directory(tmp_path: Path) -> None:
    """A document named ../x or /x is refused before anything is written."""
    target = tmp_path / "policy"
    target.mkdir()
    for name in ("../escape.csv", "/tmp/escape.csv", "a/../../escape.csv", ""):
        with pytest.raises(PolicyError, match="beneath it"):
            write_documents({MAIN: "rules: []", name: "x"}, target)
    assert not (tmp_path / "escape.csv").exists()
    with pytest.raises(PolicyError, match=f"no {MAIN}"):
        write_documents({"data.csv": "x"}, target)


def test_a_policy_whose_data_file_lies_outside_its_directory_cannot_be_shared(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    """The first replica's policy names its bulletins by an absolute path: another replica
    could not load it from the stored documents, so the verifier refuses to start, saying
    why in one line."""
    config = replica(workdir, pki, endorsement_ca, "fleet-1")
    path = config.policy or Path()
    bulletins = path.parent / "nvidia-driver-bulletins.csv"
    path.write_text(
        path.read_text().replace(
            "bulletins: nvidia-driver-bulletins.csv", f"bulletins: {bulletins}"
        )
    )

    async def scenario() -> None:
        async with running(config):
            pass

    with pytest.raises(ConfigError, match="cannot be shared through the database") as refused:
        asyncio.run(scenario())
    assert "\n" not in str(refused.value)


class MemoryPolicies:
    """The ``Policies`` repository in memory: what a database writer put there is served."""

    def __init__(self, stored: StoredPolicy | None = None) -> None:
        self.stored = stored
        self.actors: list[str] = []
        self.publishing = asyncio.Event()
        self.go_on = asyncio.Event()
        self.go_on.set()

    async def current(self) -> StoredPolicy | None:
        return self.stored

    async def publish(
        self, policy: StoredPolicy, *, actor: str, origin: str, now: datetime.datetime
    ) -> None:
        self.stored = policy
        self.actors.append(actor)
        self.publishing.set()  # committed; the caller has not heard back yet
        await self.go_on.wait()


def _shared(path: Path, policies: MemoryPolicies) -> SharedPolicy:
    return SharedPolicy(PolicyHolder(path), policies, origin="here", clock=lambda: NOW)


POLICY_ROW = Change(seq=1, kind=POLICY, device_id=DeviceId(""), ref="", origin="elsewhere")


def test_a_stored_digest_naming_a_path_touches_no_file(tmp_path: Path) -> None:
    """Someone who can write the database stores a policy whose digest is a path (absolute,
    or climbing out): no replica deletes or writes anything there; the row is refused before
    any file is written, and the policy in force stays."""
    mine = policy_dir(tmp_path / "mine", "mine")
    theirs = to_store(Policy.load(policy_dir(tmp_path / "theirs", "theirs")), now=NOW)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "ca.key").write_text("keep me")
    for digest in (str(victim), "../../../../" + str(victim).lstrip("/"), "A" * 64):
        policies = MemoryPolicies(replace(theirs, digest=digest))
        shared = _shared(mine, policies)
        before = shared.holder.current
        asyncio.run(shared.start())
        asyncio.run(shared.follow([POLICY_ROW]))
        assert shared.holder.current is before, digest
        assert (victim / "ca.key").read_text() == "keep me", digest
        assert sorted(p.name for p in victim.iterdir()) == ["ca.key"], digest
        shared.close()


def test_a_stored_policy_reads_no_file_of_this_host(tmp_path: Path) -> None:
    """A stored policy whose text names a data file of this host (an absolute path, not
    among its documents), stored with the digest that policy would have here: refused
    before it is parsed, so no file of the host is read into it. Documents that are not text
    are refused, not a crash."""
    mine = policy_dir(tmp_path / "mine", "mine")
    theirs = to_store(Policy.load(policy_dir(tmp_path / "theirs", "theirs")), now=NOW)
    (name,) = [n for n in theirs.documents if n != MAIN]
    secret = tmp_path / "host-secret.csv"
    shutil.copy(tmp_path / "theirs" / name, secret)
    text = theirs.documents[MAIN].replace(name, str(secret))
    # The digest the policy has when its data is read from the host's file.
    digest = Policy.parse(text, source="forged", base=tmp_path / "mine").digest
    forged = replace(theirs, digest=digest, documents={MAIN: text})
    garbage: Any = {**theirs.documents, name: 7}  # what a JSON column may hold
    not_text = replace(theirs, documents=garbage)
    for stored in (forged, not_text):
        shared = _shared(mine, MemoryPolicies(stored))
        before = shared.holder.current
        asyncio.run(shared.follow([POLICY_ROW]))
        assert shared.holder.current is before
        shared.close()


def test_a_reload_and_a_followed_row_do_not_cross(tmp_path: Path) -> None:
    """Replica A reloads (publishes P1) while B's P2 lands in the database and its row
    reaches A: A ends with the database's policy, not the one it published first."""
    mine = policy_dir(tmp_path / "mine", "mine")
    theirs = to_store(Policy.load(policy_dir(tmp_path / "theirs", "theirs")), now=NOW)
    policies = MemoryPolicies(theirs)

    async def scenario() -> str:
        shared = _shared(mine, policies)
        policies.go_on.clear()
        reload = asyncio.create_task(shared.reload(actor="operator/alice"))
        await policies.publishing.wait()
        # A's publication is committed; B's commits after it, and B's row reaches A before
        # A's reload has heard back from the database.
        policies.stored = theirs
        follow = asyncio.create_task(shared.follow([POLICY_ROW]))
        await asyncio.wait({follow}, timeout=0.5)
        policies.go_on.set()
        await reload
        await follow
        assert shared.holder.current is not None
        digest = shared.holder.current.digest
        shared.close()
        return digest

    assert asyncio.run(scenario()) == theirs.digest
