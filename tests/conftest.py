"""Shared fixtures: real swtpm processes with EK certificates, a verifier PKI.

swtpm is not optional: ``make test`` installs it, and a missing binary fails the session
rather than skipping (issue 2: no test skipped for lack of swtpm).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtrust.swtpm import EndorsementCA, Swtpm, provision, swtpm_available
from devtrust.verifier.pki import PkiFiles, init_pki


@pytest.fixture(scope="session", autouse=True)
def _require_swtpm() -> None:
    if not swtpm_available():
        pytest.fail(
            "swtpm, swtpm_setup and swtpm_localca are required: run `make test`, which "
            "installs the swtpm and swtpm-tools packages"
        )


@pytest.fixture(scope="session")
def endorsement_ca(tmp_path_factory: pytest.TempPathFactory) -> EndorsementCA:
    return EndorsementCA.create(tmp_path_factory.mktemp("ek-ca"))


@pytest.fixture(scope="session")
def other_endorsement_ca(tmp_path_factory: pytest.TempPathFactory) -> EndorsementCA:
    return EndorsementCA.create(
        tmp_path_factory.mktemp("other-ek-ca"), common_name="not the trusted endorsement CA"
    )


SwtpmFactory = Callable[..., Swtpm]


@pytest.fixture(scope="session")
def swtpm_factory(
    tmp_path_factory: pytest.TempPathFactory, endorsement_ca: EndorsementCA
) -> Iterator[SwtpmFactory]:
    """Make a fresh provisioned and started swtpm; all are stopped at the end."""
    started: list[Swtpm] = []

    def make(ca: EndorsementCA | None = None) -> Swtpm:
        state = tmp_path_factory.mktemp("tpm")
        provision(state, ca or endorsement_ca)
        tpm = Swtpm(state).start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


@pytest.fixture(scope="session")
def shared_swtpm(swtpm_factory: SwtpmFactory) -> Swtpm:
    """One swtpm for tests that only read from it (quotes, public areas)."""
    return swtpm_factory()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return init_pki(
        tmp_path_factory.mktemp("pki"),
        hostnames=["localhost", "127.0.0.1"],
        now=datetime.datetime.now(datetime.UTC),
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
