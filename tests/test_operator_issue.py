"""`devtrust operator issue` (issue 10, item 5): an admin issues a new operator's certificate
over the Query API (IssueOperatorCertificate); the key is made by the command and never sent."""

from __future__ import annotations

import asyncio
import stat
from dataclasses import replace
from pathlib import Path

from devtrust.swtpm import EndorsementCA
from devtrust.verifier.pki import PkiFiles
from tests.env import running
from tests.test_ops_cli import OPERATORS, Run, _config, devtrust, profile


def test_an_admin_issues_an_operator_over_the_api(
    workdir: Path, pki: PkiFiles, endorsement_ca: EndorsementCA
) -> None:
    config = replace(_config(workdir, pki, endorsement_ca), operators={**OPERATORS, "ada": "admin"})
    out = workdir / "issued"

    async def scenario() -> tuple[dict[str, Run], dict[str, str]]:
        async with running(config) as verifier:
            ada = str(profile(workdir, pki, verifier, "ada"))
            otto = str(profile(workdir, pki, verifier, "otto"))
            issue = ("operator", "issue")
            runs = {
                "issue": await devtrust(
                    *issue, "bob", "--role", "viewer", "--out", str(out), "--profile", ada
                )
            }
            bob = str(out / "bob.yaml")
            runs["bob devices"] = await devtrust("devices", "--profile", bob)
            runs["bob revoke"] = await devtrust(
                "revoke", "ab" * 32, "--reason", "x", "--profile", bob
            )
            runs["again"] = await devtrust(
                *issue, "bob", "--role", "admin", "--out", str(out), "--profile", ada
            )
            runs["not admin"] = await devtrust(
                *issue, "carol", "--role", "viewer", "--out", str(workdir / "c"), "--profile", otto
            )
            runs["listed"] = await devtrust(
                *issue, "otto", "--role", "admin", "--out", str(workdir / "o"), "--profile", ada
            )
            return runs, await verifier.repos.roles.all()

    runs, roles = asyncio.run(scenario())
    assert runs["issue"].status == 0, runs["issue"]
    assert "operator bob: certificate" in runs["issue"].out
    assert stat.S_IMODE((out / "bob.key").stat().st_mode) == 0o600
    assert runs["bob devices"].status == 0, runs["bob devices"]
    assert runs["bob revoke"].status == 4, runs["bob revoke"]
    assert "operator bob has role viewer" in runs["bob revoke"].err
    assert runs["again"].status == 1
    assert "already there" in runs["again"].err
    assert runs["not admin"].status == 4
    assert runs["not admin"].err.count("\n") == 1
    assert "operator otto has role operator" in runs["not admin"].err
    assert not (workdir / "c").exists()
    assert runs["listed"].status == 1, runs["listed"]
    assert "listed in the verifier's configuration" in runs["listed"].err
    assert roles == {"bob": "viewer"}
