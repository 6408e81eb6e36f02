"""Import boundaries (issue 9, DESIGN.md "Code layout"): which part of devtrust may import
which, checked on the source of every module and on what a command really loads.

The rules are a table: a rule names the modules it applies to, what they may not import and
the exceptions, so that a new boundary ("devtrust.v1 only in the wire modules") is one more
row. Every import counts, at module level or inside a function: a function-level import is
a dependency too, only a later one. Modules are named as installed, from the folder mapping
in pyproject.toml ([tool.setuptools.package-dir]).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The packages that run in production; the swtpm harness (tests, the demo, simulation) may
# import them, never the reverse.
RUNTIME = ("devtrust.core", "devtrust.v1", "devtrust.agent", "devtrust.verifier")
# What the core may use besides itself: a relying party imports it without grpc, protobuf
# or a TPM library.
CORE_THIRD_PARTY = ("cryptography", "yaml")


# Where the verifier converts protobuf messages, in both directions.
WIRE_MODULES = ("wire", "wire_attest", "wire_body", "wire_enroll", "wire_query", "wire_schema")


@dataclass(frozen=True)
class Rule:
    """Modules within ``importers`` (and not within ``exempt``) import nothing within
    ``forbidden`` unless it is within ``allowed``. "Within": the name or below it; "*" is
    every module."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


RULES = (
    Rule(
        "core imports nothing of devtrust but core",
        importers=("devtrust.core",),
        forbidden=("devtrust",),
        allowed=("devtrust.core",),
    ),
    Rule(
        "core imports only core, the standard library, cryptography and pyyaml",
        importers=("devtrust.core",),
        forbidden=("*",),
        allowed=("devtrust.core", *sorted(sys.stdlib_module_names), *CORE_THIRD_PARTY),
    ),
    Rule(
        "the verifier never imports the agent or swtpm",
        importers=("devtrust.verifier",),
        forbidden=("devtrust.agent", "devtrust.swtpm"),
    ),
    Rule(
        "the agent never imports the verifier or swtpm",
        importers=("devtrust.agent",),
        forbidden=("devtrust.verifier", "devtrust.swtpm"),
    ),
    Rule(
        "nothing that runs in production imports swtpm (tests, demo and simulation only)",
        importers=RUNTIME,
        forbidden=("devtrust.swtpm",),
    ),
    Rule(
        "the verifier converts protobuf in its wire modules only (STYLE 4)",
        importers=("devtrust.verifier",),
        forbidden=("devtrust.v1", "google.protobuf"),
        exempt=(
            *(f"devtrust.verifier.{m}" for m in WIRE_MODULES),
            # The servicers, for their methods' signatures, and the server that registers
            # them: they build no message (their wire modules do).
            "devtrust.verifier.attest_service",
            "devtrust.verifier.enroll_service",
            "devtrust.verifier.query_service",
            "devtrust.verifier.server",
        ),
    ),
)

# What an operator command must not load: it runs where the operator is, with no TPM or GPU.
NOT_LOADED_BY_COMMANDS = ("tpm2_pytss", "pynvml", "devtrust.agent", "devtrust.swtpm")
COMMAND_MODULES = ("devtrust.verifier.cli", "devtrust.verifier.main")


def within(module: str, prefixes: Iterable[str]) -> bool:
    return any(p in ("*", module) or module.startswith(f"{p}.") for p in prefixes)


def violations(imports: Iterable[tuple[str, str]], rules: Iterable[Rule] = RULES) -> list[str]:
    """One line per (importer, imported) pair that breaks a rule, naming both and the rule."""
    found = []
    for rule in rules:
        for importer, imported in imports:
            if not within(importer, rule.importers) or within(importer, rule.exempt):
                continue
            if within(imported, rule.forbidden) and not within(imported, rule.allowed):
                found.append(f"{importer} imports {imported}: breaks {rule.name!r}")
    return found


# --- reading the imports -------------------------------------------------------------------


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name, from pyproject's mapping
    of folders to packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, folder in mapping.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join([package, *parts]), path)
    return found


def imports_of(source: str, module: str, *, is_package: bool) -> Iterator[str]:
    """Every module ``source`` imports, anywhere in it; ``from X import y`` yields X and X.y
    (y may be a module), relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                origin = node.module
            yield origin
            yield from (f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")


def all_imports() -> list[tuple[str, str]]:
    pairs = []
    for module, path in modules().items():
        source = path.read_text(encoding="utf-8")
        is_package = path.name == "__init__.py"
        pairs += [
            (module, imported) for imported in imports_of(source, module, is_package=is_package)
        ]
    return pairs


# --- the checks ----------------------------------------------------------------------------


def test_every_module_keeps_to_the_boundaries() -> None:
    broken = violations(all_imports())
    assert not broken, "\n".join(broken)


def test_the_walk_reads_every_folder() -> None:
    """A walk that found nothing would pass every rule: it must see each package and the
    imports known to be there."""
    found = modules()
    for package in ("devtrust.core", "devtrust.v1", "devtrust.agent", "devtrust.verifier"):
        assert sum(within(m, (package,)) for m in found) >= 2, package
    assert "devtrust.swtpm.demo" in found
    pairs = set(all_imports())
    assert ("devtrust.verifier.ca", "devtrust.core.claims") in pairs
    assert ("devtrust.swtpm.demo", "devtrust.agent.enroll") in pairs
    # a function-level import
    assert ("devtrust.verifier.enrollment", "tpm2_pytss.utils") in pairs


def test_function_level_and_relative_imports_are_read() -> None:
    source = (
        "import os\n"
        "from . import sibling\n"
        "from ..verifier import ca\n"
        "def later():\n"
        "    from devtrust.agent import tpm\n"
        "    import devtrust.swtpm.process\n"
    )
    found = set(imports_of(source, "devtrust.core.thing", is_package=False))
    assert {
        "os",
        "devtrust.core.sibling",
        "devtrust.verifier.ca",
        "devtrust.agent",
        "devtrust.agent.tpm",
        "devtrust.swtpm.process",
    } <= found
    assert set(imports_of("from . import x\n", "devtrust.core", is_package=True)) == {
        "devtrust.core",
        "devtrust.core.x",
    }


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_each_rule_can_fail(rule: Rule) -> None:
    """Each rule reports a synthetic import that breaks it, naming importer, imported and
    rule; the same importer importing what the rule allows passes."""
    importer = "devtrust.probe" if rule.importers == ("*",) else f"{rule.importers[0]}.probe"
    imported = "someone_else.probe" if rule.forbidden == ("*",) else f"{rule.forbidden[0]}.probe"
    assert not within(imported, rule.allowed)
    assert violations([(importer, imported)], [rule]) == [
        f"{importer} imports {imported}: breaks {rule.name!r}"
    ]
    fine = [(importer, f"{rule.allowed[0]}.probe")] if rule.allowed else []
    assert violations([*fine, (importer, "devtrust.core.tier")], [rule]) == []


def test_an_exempt_importer_passes() -> None:
    rule = Rule(
        "devtrust.v1 only in the wire modules",
        importers=("devtrust.verifier",),
        forbidden=("devtrust.v1",),
        exempt=("devtrust.verifier.wire",),
    )
    assert violations([("devtrust.verifier.wire", "devtrust.v1.common_pb2")], [rule]) == []
    assert violations([("devtrust.verifier.appraisal", "devtrust.v1.common_pb2")], [rule]) == [
        "devtrust.verifier.appraisal imports devtrust.v1.common_pb2: "
        "breaks 'devtrust.v1 only in the wire modules'"
    ]


def _loaded_after_import(module: str) -> list[str]:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(m for m in {NOT_LOADED_BY_COMMANDS!r} if m in sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_operator_commands_load_no_tpm_or_gpu_library(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert loaded == [], (
        f"importing {module} loads {', '.join(loaded)}: import them where the command that "
        "needs them runs (python -X importtime -c 'import ...' shows who imports them)"
    )


def test_the_load_check_sees_a_tpm_library() -> None:
    assert "tpm2_pytss" in _loaded_after_import("devtrust.agent.tpm")
