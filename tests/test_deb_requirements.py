"""What each Debian package holds (packaging/build_deb.py), checked against the code: the part
of devtrust a package keeps imports nothing of devtrust it leaves out, and its requirements
file (packaging/deb/ROLE/requirements.txt) lists exactly the distributions that part
imports. A module that starts importing psutil, or the agent importing the gate, fails
here, before an installed package fails on a host. No build and no root: the install test
(tests/test_deb_install.py) runs what is built.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.test_layers import imports_of, modules, within

ROOT = Path(__file__).resolve().parent.parent

# Imports a package may leave unresolved, each with its reason.
LEFT_OUT = {
    # `devtrust simulate` drives agents and software TPMs: a tool of a source checkout.
    ("devtrust.cli", "devtrust.swtpm.simulate"): "devtrust simulate",
}


def load_build_script() -> ModuleType:
    """packaging/build_deb.py (a script: `packaging` is also a PyPI distribution's name)."""
    spec = importlib.util.spec_from_file_location("build_deb", ROOT / "packaging" / "build_deb.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_deb"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ROLES: tuple[Any, ...] = load_build_script().ROLES


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kept_modules(role: Any) -> dict[str, Path]:
    """The modules of devtrust the role's package keeps (its ``keep`` entries of the
    installed devtrust/ folder)."""
    kept = {}
    for name, path in modules().items():
        parts = name.split(".")
        entry = "__init__.py" if len(parts) == 1 else parts[1]
        if entry in role.keep or f"{entry}.py" in role.keep:
            kept[name] = path
    return kept


def role_imports(role: Any) -> tuple[set[tuple[str, str]], set[str]]:
    """(importer, devtrust module) pairs left out of the package, and the top-level names of
    everything else imported that is not the standard library."""
    everything = modules()
    kept = kept_modules(role)
    missing, third_party = set(), set()
    for module, path in kept.items():
        source = path.read_text(encoding="utf-8")
        for imported in imports_of(source, module, is_package=path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top == "devtrust":
                # `from devtrust.x import name` also yields devtrust.x.name: only modules count.
                if imported in everything and imported not in kept:
                    missing.add((module, imported))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return missing, third_party


def requirements(role: Any) -> set[str]:
    text = (ROOT / "packaging" / "deb" / role.name / "requirements.txt").read_text()
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return {normalized(re.split(r"[\[<>=!~; ]", line)[0]) for line in lines if line}


def distributions(tops: set[str]) -> set[str]:
    """The distributions providing the import names ``tops`` (in this environment)."""
    providers = importlib.metadata.packages_distributions()
    found: set[str] = set()
    for top in tops:
        assert top in providers, f"no installed distribution provides {top!r}"
        found.update(normalized(d) for d in providers[top])
    return found


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_a_package_keeps_every_module_its_code_imports(role: Any) -> None:
    missing, _ = role_imports(role)
    unexplained = sorted(pair for pair in missing if pair not in LEFT_OUT)
    assert not unexplained, (
        f"devtrust-{role.name} leaves out modules its code imports: "
        + ", ".join(f"{a} imports {b}" for a, b in unexplained)
        + " (add to the role's keep in packaging/build_deb.py, or import them elsewhere)"
    )


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_requirements_list_what_the_code_imports(role: Any) -> None:
    _, tops = role_imports(role)
    imported = distributions(tops)
    listed = requirements(role)
    # psycopg[binary]: psycopg-binary is loaded by psycopg, not imported: the name counts.
    assert imported == listed, (
        f"packaging/deb/{role.name}/requirements.txt: imported but not listed: "
        f"{sorted(imported - listed)}, listed but not imported: {sorted(listed - imported)}"
    )


def test_the_check_sees_a_missing_requirement_and_a_left_out_module() -> None:
    """The two checks above can fail: the agent's code imports tpm2_pytss, and the
    verifier's keep without its gate leaves devtrust.verifier's imports of it unresolved."""
    (agent,) = (r for r in ROLES if r.name == "agent")
    assert "tpm2-pytss" in distributions(role_imports(agent)[1])
    (verifier,) = (r for r in ROLES if r.name == "verifier")
    shrunk = type(verifier)(
        verifier.name,
        tuple(k for k in verifier.keep if k != "gate"),
        verifier.commands,
        service=verifier.service,
    )
    missing, _ = role_imports(shrunk)
    assert any(within(b, ("devtrust.gate",)) for _, b in missing)
    assert ("devtrust.cli", "devtrust.swtpm.simulate") in role_imports(verifier)[0]
