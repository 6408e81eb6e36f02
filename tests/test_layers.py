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
# What the gate may use besides core (devtrust.gate: a relying party's only dependency).
GATE = ("cryptography", "grpc")


# The example relying party's generated code (devtrust/example/registry.proto).
EXAMPLE_GENERATED = ("devtrust.example.registry_pb2", "devtrust.example.registry_pb2_grpc")

# Where the verifier converts protobuf messages, in both directions.
WIRE_MODULES = (
    "wire",
    "wire_attest",
    "wire_body",
    "wire_enroll",
    "wire_ops",
    "wire_query",
    "wire_revocation",
    "wire_schema",
)
# The gRPC servicers, and the module that registers them with the server.
SERVICERS = ("attest_service", "enroll_service", "query_service", "revocation_service")
REGISTRAR = "devtrust.verifier.server"


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
    # A relying party installs the gate without a TPM or GPU library, or the verifier.
    Rule(
        "the gate imports only core, the standard library, cryptography and grpc",
        importers=("devtrust.gate",),
        forbidden=("*",),
        allowed=("devtrust.gate", "devtrust.core", *sorted(sys.stdlib_module_names), *GATE),
        exempt=("devtrust.gate.follower",),
    ),
    Rule(
        "the gate's revocation follower adds only the generated devtrust.v1",
        importers=("devtrust.gate.follower",),
        forbidden=("*",),
        allowed=(
            *("devtrust.gate", "devtrust.core", *sorted(sys.stdlib_module_names), *GATE),
            "devtrust.v1",
        ),
    ),
    # The example relying party needs no more than a service of its own would.
    Rule(
        "the example imports only core, the gate, its generated code, grpc, cryptography, stdlib",
        importers=("devtrust.example",),
        forbidden=("*",),
        allowed=(
            *("devtrust.example", "devtrust.gate", "devtrust.core"),
            *sorted(sys.stdlib_module_names),
            *GATE,
            "google.protobuf",  # for its generated code: the next rule keeps it there
        ),
    ),
    Rule(
        "only the example's generated code imports protobuf",
        importers=("devtrust.example",),
        forbidden=("google.protobuf",),
        exempt=EXAMPLE_GENERATED,
    ),
    Rule(
        "the verifier never imports the agent or swtpm",
        importers=("devtrust.verifier",),
        forbidden=("devtrust.agent", "devtrust.swtpm"),
    ),
    Rule(
        "in the verifier only enrollment imports tpm2_pytss (make_challenge, see below)",
        importers=("devtrust.verifier",),
        forbidden=("tpm2_pytss",),
        exempt=("devtrust.verifier.enrollment",),
    ),
    Rule(
        "the verifier never imports pynvml (GPU state comes in the evidence)",
        importers=("devtrust.verifier",),
        forbidden=("pynvml",),
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
            # The servicers, for their base classes and their methods' signatures, and the
            # server that registers them: what they may do with protobuf is checked on their
            # source (servicer_problems, registrar_problems below).
            *(f"devtrust.verifier.{m}" for m in SERVICERS),
            REGISTRAR,
        ),
    ),
)

# What an operator command must not load: it runs where the operator is, with no TPM or GPU.
NOT_LOADED_BY_COMMANDS = ("tpm2_pytss", "pynvml", "devtrust.agent", "devtrust.swtpm")
COMMAND_MODULES = ("devtrust.cli", "devtrust.verifier.cli", "devtrust.verifier.main")


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


# --- where the verifier imports tpm2_pytss ----------------------------------------------------


def function_imports(source: str, module: str) -> set[tuple[str, str]]:
    """(function, imported) for every import in ``source``; "" for the module level, the
    innermost function's name otherwise."""
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(
                    (function, m) for m in imports_of(ast.unparse(child), module, is_package=False)
                )
            else:
                visit(child, function)

    visit(ast.parse(source), "")
    return found


def test_the_verifier_loads_tpm2_pytss_only_to_make_a_credential_challenge() -> None:
    """The one exemption of the rule above, as narrow as it is meant: inside
    enrollment.make_challenge, so that only enrolling a TPM loads it (the servers and the
    operator commands import enrollment)."""
    module = "devtrust.verifier.enrollment"
    source = modules()[module].read_text(encoding="utf-8")
    where = {f for f, m in function_imports(source, module) if within(m, ("tpm2_pytss",))}
    assert where == {"make_challenge"}
    probe = "import os\ndef f():\n    import tpm2_pytss\n    def g():\n        import pynvml\n"
    assert function_imports(probe, "devtrust.verifier.x") == {
        ("", "os"),
        ("f", "tpm2_pytss"),
        ("g", "pynvml"),
    }


# --- protobuf in the servicers ----------------------------------------------------------------


def _generated(name: str) -> bool:
    return name.endswith(("_pb2", "_pb2_grpc"))


def _root(node: ast.expr) -> ast.expr:
    """``a`` of ``a.b[c].d(e).f``."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _protobuf_imports(tree: ast.AST) -> list[str]:
    """Generated code imported as anything but a module of devtrust.v1 under its own name
    (the checks below recognise it by that name), and any google.protobuf."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if within(a.name, ("devtrust.v1", "google"))]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "devtrust.v1":
                names = [
                    f"{a.name} as {a.asname}" if a.asname else a.name
                    for a in node.names
                    if a.asname or not _generated(a.name)
                ]
            elif within(node.module, ("devtrust.v1", "google")):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
        else:
            continue
        problems += [f"line {node.lineno}: imports {n}" for n in names]
    return problems


def servicer_problems(source: str) -> list[str]:
    """What a servicer does with protobuf beyond its signatures: a generated module
    (``*_pb2``) named outside an annotation, a ``*_pb2_grpc`` one outside the class's bases,
    or a field read from a message (a name annotated with a generated type). It converts
    through its wire module; building or reading a message is that module's job."""
    tree = ast.parse(source)
    allowed: set[int] = set()  # ids of the Name nodes in a signature or a base class
    problems = _protobuf_imports(tree)

    def mentions(annotation: ast.expr) -> set[ast.Name]:
        return {
            n for n in ast.walk(annotation) if isinstance(n, ast.Name) and n.id.endswith("_pb2")
        }

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            allowed |= {
                id(n)
                for base in node.bases
                for n in ast.walk(base)
                if isinstance(n, ast.Name) and n.id.endswith("_pb2_grpc")
            }
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = node.args
        params = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        params += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
        messages = set()  # the names that hold messages in this function
        for param in params:
            if param.annotation is not None and (found := mentions(param.annotation)):
                allowed |= {id(n) for n in found}
                messages.add(param.arg)
        if node.returns is not None:
            allowed |= {id(n) for n in mentions(node.returns)}
        for inner in ast.walk(node):
            if isinstance(inner, ast.AnnAssign) and (found := mentions(inner.annotation)):
                allowed |= {id(n) for n in found}
                if isinstance(inner.target, ast.Name):
                    messages.add(inner.target.id)
        problems += [
            f"line {n.lineno}: reads {n.value.id}.{n.attr}, a field of a message"
            for n in ast.walk(node)
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id in messages
        ]
    problems += [
        f"line {n.lineno}: uses {n.id} outside a signature"
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and _generated(n.id) and id(n) not in allowed
    ]
    return sorted(problems)


def registrar_problems(source: str) -> list[str]:
    """The server registers the servicers and names their services (reflection, health):
    it may call ``*_pb2_grpc.add_*_to_server`` and read descriptors and enum values, never
    build a message or a stub."""
    tree = ast.parse(source)
    problems = [p for p in _protobuf_imports(tree) if "google" in p or " as " in p or "_pb2." in p]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        root = _root(node.func)
        if not isinstance(root, ast.Name) or not _generated(root.id):
            continue
        func = node.func
        registers = (
            root.id.endswith("_pb2_grpc")
            and isinstance(func, ast.Attribute)
            and func.value is root
            and func.attr.startswith("add_")
            and func.attr.endswith("_to_server")
        )
        if not registers:
            problems.append(f"line {node.lineno}: calls {ast.unparse(func)}")
    return problems


@pytest.mark.parametrize("servicer", SERVICERS)
def test_servicers_touch_protobuf_only_in_their_signatures(servicer: str) -> None:
    module = f"devtrust.verifier.{servicer}"
    problems = servicer_problems(modules()[module].read_text(encoding="utf-8"))
    assert not problems, f"{module}: convert in its wire module:\n" + "\n".join(problems)


def test_the_server_builds_no_message() -> None:
    problems = registrar_problems(modules()[REGISTRAR].read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


_SERVICER = """
from devtrust.v1 import x_pb2, x_pb2_grpc
from devtrust.verifier import wire_x

class S(x_pb2_grpc.XServicer):
    async def Get(self, request: x_pb2.Req, context: object) -> x_pb2.Resp:
        pending: list[x_pb2.Req] = [request]
        return wire_x.resp_to_wire(wire_x.req_from_wire(pending[0]))

    def helper(self, request: Domain) -> str:
        return request.name
"""


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("return wire_x.resp_to_wire(", "return x_pb2.Resp(a=1) or wire_x.resp_to_wire("),
         "line 8: uses x_pb2 outside a signature"),
        (("wire_x.req_from_wire(pending[0])", "request.device_id"),
         "line 8: reads request.device_id, a field of a message"),
        (("wire_x.req_from_wire(pending[0])", "pending.count(0)"),
         "line 8: reads pending.count, a field of a message"),
        (("from devtrust.verifier import wire_x", "from devtrust.v1.x_pb2 import Resp"),
         "line 3: imports devtrust.v1.x_pb2.Resp"),
        (("from devtrust.v1 import x_pb2, x_pb2_grpc", "from devtrust.v1 import x_pb2 as w"),
         "line 2: imports x_pb2 as w"),
        (("from devtrust.verifier import wire_x", "from google.protobuf import json_format"),
         "line 3: imports google.protobuf.json_format"),
        (("object) ->", "object = x_pb2_grpc.X) ->"),
         "line 6: uses x_pb2_grpc outside a signature"),
    ],
)  # fmt: skip
def test_the_servicer_check_can_fail(change: tuple[str, str], problem: str) -> None:
    assert servicer_problems(_SERVICER) == []
    assert problem in servicer_problems(_SERVICER.replace(*change))


def test_the_server_check_can_fail() -> None:
    fine = (
        "from devtrust.v1 import x_pb2, x_pb2_grpc\n"
        "x_pb2_grpc.add_XServicer_to_server(s, server)\n"
        "names = [x_pb2.DESCRIPTOR.services_by_name['X'].full_name, x_pb2.Status.SERVING]\n"
    )
    assert registrar_problems(fine) == []
    assert registrar_problems(fine + "m = x_pb2.Msg(a=1)\n") == ["line 4: calls x_pb2.Msg"]
    assert registrar_problems(fine + "s = x_pb2_grpc.XStub(ch)\n") == [
        "line 4: calls x_pb2_grpc.XStub"
    ]
    assert registrar_problems(fine + "from devtrust.v1.x_pb2 import Msg\n") == [
        "line 4: imports devtrust.v1.x_pb2.Msg"
    ]
