"""The policy checker: the type of a CEL expression over the declared evidence document
(verifier/schema.py), so that a mistake in a rule is refused when the policy loads rather
than read as ``policy.unknown`` at every appraisal. Pure.

The common-expression-language runtime has no type checker (it takes no declarations of
variable types and exposes no syntax tree), so the expression is parsed again
(verifier/celparse.py) and its type inferred here, bottom up.

What is refused, each with the reason (a ``CheckError``):
- a name that is not in the document (``host``, ``os``, ``gpu``, ``device``, ``sent``, and in
  GPU rules ``this``), and a field that is not in the schema, at any depth and through
  comprehension variables (``m.taint`` in ``os.modules.all(m, ...)`` is a field of a kernel
  module), with the closest field as a suggestion;
- a rule whose ``expr`` is not a boolean (``os.lockdown``);
- an operation the runtime has no overload for on the declared types, which would fail on
  every host: ``&&``, ``||``, ``!`` and conditions on a non-boolean, arithmetic or ordering
  across types (``"n=" + this.index``, ``1 + 2u``), ``in``, indexing, ``size`` on what has
  none, a function the runtime lacks (``lowerAscii``) or an argument it does not take
  (``string(true)``), a selection on a scalar (``os.lockdown.x``);
- ``==`` and ``!=`` between types that are never equal (``os.secure_boot == "true"``): CEL
  answers false (or true, for ``!=``) without an error, so such a rule would always fail, or
  always hold.

What is not checked, and why:
- null: any field the host could not read is null, whatever its type; a rule over it reads as
  unknown at appraisal, naming the field (document.unknown_values), never as compliant;
- map keys (``this.fabric_health["summary"]``): which keys a host reports is data, not schema;
- ``host.zone`` and ``host.labels``, the host's own claim, which the document never holds:
  a rule may name them, and reads unknown with the reason (rules read ``device.zone``);
- values of type ``dyn`` (``dyn(x)``, ``type(x)``, a ternary whose branches differ): they are
  accepted, and checked by the runtime when evaluated;
- regular expressions, string formats (``timestamp("...")``) and division by zero: runtime.
A result of ``dyn`` type for a rule's ``expr`` is accepted: the runtime's value must then be
``true``, and anything else is a failed rule, never a pass.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from devtrust.verifier.celparse import (
    Binary,
    Call,
    Cond,
    Ident,
    Index,
    ListLit,
    Lit,
    MapLit,
    Node,
    ParseError,
    Select,
    Unary,
    parse,
    text,
)
from devtrust.verifier.schema import (
    BOOL,
    BYTES,
    DOUBLE,
    DURATION,
    DYN,
    INT,
    STRING,
    TIMESTAMP,
    TYPE,
    UINT,
    Type,
    list_of,
    map_of,
)

Path = tuple[str, ...]
_NUMBERS = {"int", "uint", "double"}
_ORDERED = {"string", "bytes", "bool", "timestamp", "duration"}
_TYPE_NAMES = {
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
}
_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_CONVERSIONS: dict[str, tuple[Type, set[str]]] = {
    "int": (INT, {"int", "uint", "double", "string"}),
    "uint": (UINT, {"int", "uint", "double", "string"}),
    "double": (DOUBLE, {"int", "uint", "double", "string"}),
    "string": (STRING, {"int", "uint", "double", "string", "bytes", "timestamp"}),
    "bytes": (BYTES, {"string", "bytes"}),
    "timestamp": (TIMESTAMP, {"string", "timestamp"}),
    "duration": (DURATION, {"string"}),
}
_STRING_TESTS = {"startsWith", "endsWith", "contains", "matches"}
_TIME_PARTS = {
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek",
    "getHours", "getMinutes", "getSeconds", "getMilliseconds",
}  # fmt: skip
FUNCTIONS = sorted(
    {"has", "size", "dyn", "type", *_MACROS, *_CONVERSIONS, *_STRING_TESTS, *_TIME_PARTS}
)


class CheckError(ValueError):
    """A rule expression refused at load; the message says what and how to fix it."""


@dataclass(frozen=True)
class Checked:
    """An expression's type, and the document paths it reads (for naming unknown values)."""

    type: Type
    paths: frozenset[Path]


def check(source: str, names: Mapping[str, Type], *, boolean: bool) -> Checked:
    """The type of ``source`` over ``names`` (verifier/schema.py), or CheckError; with
    ``boolean``, the expression must be a condition."""
    try:
        tree = parse(source)
    except ParseError as exc:
        raise CheckError(f"the policy checker cannot read it: {exc}") from None
    checker = _Checker(names)
    result, _ = checker.infer(tree)
    if boolean and result.kind not in ("bool", "dyn"):
        hint = f" (compare it: {text(tree)} == ...)" if isinstance(tree, Ident | Select) else ""
        raise CheckError(
            f"expr is of type {result}, not bool: a rule holds when its expr is true, "
            f"so it must be a condition{hint}"
        )
    paths = checker.paths  # the longest: walking one names the first null along it
    return Checked(
        result, frozenset(p for p in paths if not any(q[: len(p)] == p != q for q in paths))
    )


def _step(key: object) -> str:
    return f"[{json.dumps(key)}]"


class _Checker:
    def __init__(self, names: Mapping[str, Type]) -> None:
        self.scope: dict[str, tuple[Type, Path | None]] = {
            name: (t, (name,)) for name, t in names.items()
        }
        self.roots = sorted(names)
        self.paths: set[Path] = set()

    def _read(self, t: Type, path: Path | None) -> tuple[Type, Path | None]:
        if path is not None:
            self.paths.add(path)
        return t, path

    def infer(self, node: Node) -> tuple[Type, Path | None]:  # noqa: PLR0911 - one per node kind
        """The node's type, and its document path when it is a selection of the document."""
        if isinstance(node, Lit):
            return node.type, None
        if isinstance(node, Ident):
            return self._ident(node)
        if isinstance(node, Select):
            return self._select(node)
        if isinstance(node, Index):
            return self._index(node)
        if isinstance(node, Call):
            return self._call(node), None
        if isinstance(node, ListLit):
            items = [self.type_of(i) for i in node.items]
            return list_of(_join(items)), None
        if isinstance(node, MapLit):
            keys = [self.type_of(k) for k, _ in node.entries]
            values = [self.type_of(v) for _, v in node.entries]
            return map_of(_join(keys), _join(values)), None
        if isinstance(node, Unary):
            operand = self.type_of(node.operand)
            if node.op == "!":
                self._condition(operand, node.operand, "the operand of !")
                return BOOL, None
            if operand.kind not in ("int", "double", "dyn"):
                raise CheckError(f"-{text(node.operand)}: cannot negate {_a(operand)}")
            return operand, None
        if isinstance(node, Binary):
            return self._binary(node), None
        assert isinstance(node, Cond)  # the parser makes no other node
        self._condition(self.type_of(node.cond), node.cond, "the condition of ?:")
        then, other = self.type_of(node.then), self.type_of(node.other)
        return (then if _same(then, other) else DYN), None

    def type_of(self, node: Node) -> Type:
        return self.infer(node)[0]

    def _condition(self, t: Type, node: Node, what: str) -> None:
        if t.kind not in ("bool", "dyn"):
            raise CheckError(f"{what} must be a bool; {text(node)} is of type {t}")

    def _ident(self, node: Ident) -> tuple[Type, Path | None]:
        if node.name in self.scope:
            return self._read(*self.scope[node.name])
        if node.name in _TYPE_NAMES:
            return TYPE, None
        if node.name == "this":
            raise CheckError("this (the GPU in scope) exists only in rules with scope: gpu")
        raise CheckError(
            f"unknown name {node.name}{_suggest(node.name, self.roots, '')}; "
            f"rules read {', '.join(self.roots)}"
        )

    def _select(self, node: Select) -> tuple[Type, Path | None]:
        operand, path = self.infer(node.operand)
        where = None if path is None else (*path, node.field)
        return self._member(operand, node.field, node.operand, where, field=True)

    def _member(
        self, t: Type, name: str, operand: Node, path: Path | None, *, field: bool
    ) -> tuple[Type, Path | None]:
        if t.kind == "message":
            if name in t.fields:
                return self._read(t.fields[name], path)
            shown = f"{text(operand)}.{name}" if field else f'{text(operand)}["{name}"]'
            if name in t.withheld:
                raise CheckError(f"{shown} is not in the document: {t.withheld[name]}")
            fix = _suggest(name, list(t.fields), f"{text(operand)}.")
            listing = "" if fix else f"; {text(operand)} ({t}) has {', '.join(t.fields)}"
            raise CheckError(f"field {shown} does not exist{fix}{listing}")
        if t.kind == "map":
            self._compatible(STRING, t.key or DYN, operand, "a key of")
            return self._read(t.elem or DYN, path)
        if t.kind == "dyn":
            return DYN, None
        raise CheckError(f"{text(operand)} is of type {t}; it has no field {name}")

    def _index(self, node: Index) -> tuple[Type, Path | None]:
        operand, path = self.infer(node.operand)
        index = self.type_of(node.index)
        if operand.kind == "list":
            if index.kind not in ("int", "uint", "dyn"):
                raise CheckError(f"{text(node)}: a list index is an int, not {_a(index)}")
            return operand.elem or DYN, None
        if isinstance(node.index, Lit) and isinstance(node.index.value, str):
            where = None if path is None else (*path, _step(node.index.value))
            if operand.kind == "message":
                where = None if path is None else (*path, node.index.value)
            return self._member(operand, node.index.value, node.operand, where, field=False)
        if operand.kind == "map":
            self._compatible(index, operand.key or DYN, node.index, "a key of")
            return operand.elem or DYN, None
        if operand.kind in ("message", "dyn"):
            return DYN, None
        raise CheckError(f"{text(node.operand)} is of type {operand}; it cannot be indexed")

    def _binary(self, node: Binary) -> Type:
        op = node.op
        if op in ("&&", "||"):
            for side in (node.left, node.right):
                self._condition(self.type_of(side), side, f"each side of {op}")
            return BOOL
        left, right = self.type_of(node.left), self.type_of(node.right)
        if op in ("==", "!="):
            if not _comparable(left, right):
                always = "never holds" if op == "==" else "always holds"
                raise CheckError(
                    f"{text(node.left)} {op} {text(node.right)} compares {_a(left)} with "
                    f"{_a(right)}: CEL answers without an error and the comparison {always}"
                )
            return BOOL
        if op == "in":
            if right.kind == "list":
                self._compatible(left, right.elem or DYN, node.left, "an element of")
            elif right.kind == "map":
                self._compatible(left, right.key or DYN, node.left, "a key of")
            elif right.kind == "message":
                self._compatible(left, STRING, node.left, "a field name of")
            elif right.kind != "dyn":
                raise CheckError(f"{text(node.right)} is of type {right}: `in` needs a list or map")
            return BOOL
        if op in ("<", "<=", ">", ">="):
            numbers = left.kind in _NUMBERS and right.kind in _NUMBERS
            same = left.kind == right.kind and left.kind in _ORDERED
            if not (numbers or same or "dyn" in (left.kind, right.kind)):
                raise CheckError(f"{text(node)}: cannot order {_a(left)} and {_a(right)}")
            return BOOL
        return _arithmetic(op, left, right, node)

    def _compatible(self, t: Type, want: Type, node: Node, what: str) -> None:
        if not _comparable(t, want):
            raise CheckError(f"{text(node)} is of type {t}, never {what} {want} values")

    def _call(self, node: Call) -> Type:  # noqa: PLR0911 - one return per function
        name, target, args = node.function, node.target, node.args
        if name in _MACROS and target is not None:
            return self._macro(node, target)
        if name == "has":
            if target is not None or len(args) != 1 or not isinstance(args[0], Select):
                raise CheckError("has() takes one field selection: has(x.field)")
            self.type_of(args[0])
            return BOOL
        receiver = [] if target is None else [target]
        given = [self.type_of(a) for a in (*receiver, *args)]
        if name in ("dyn", "type"):
            _arity(node, given, 1)
            return DYN if name == "dyn" else TYPE
        if name == "size":
            _arity(node, given, 1)
            if given[0].kind not in ("string", "bytes", "list", "map", "message", "dyn"):
                raise CheckError(f"size({text((*receiver, *args)[0])}): {_a(given[0])} has no size")
            return INT
        if name in _CONVERSIONS:
            _arity(node, given, 1)
            result, accepted = _CONVERSIONS[name]
            if given[0].kind not in accepted | {"dyn"}:
                raise CheckError(
                    f"{name}() does not take {_a(given[0])} ({text((*receiver, *args)[0])}); "
                    f"it takes {', '.join(sorted(accepted))}"
                )
            return result
        if name in _STRING_TESTS:
            _arity(node, given, 2)
            for t, arg in zip(given, (*receiver, *args), strict=True):
                if t.kind not in ("string", "dyn"):
                    raise CheckError(f"{name}() works on strings; {text(arg)} is {_a(t)}")
            return BOOL
        if name in _TIME_PARTS and target is not None:
            if given[0].kind not in ("timestamp", "duration", "dyn"):
                raise CheckError(f"{name}() works on timestamps; {text(target)} is {_a(given[0])}")
            return INT
        fix = _suggest(name, FUNCTIONS, "")
        raise CheckError(
            f"unknown function {name}()"
            + (fix or f"; the CEL runtime of the verifier has {', '.join(FUNCTIONS)}")
        )

    def _macro(self, node: Call, target: Node) -> Type:
        receiver, path = self.infer(target)
        args = node.args
        if len(args) not in (2, 3) or not isinstance(args[0], Ident):
            raise CheckError(f"{node.function}() takes a variable name and an expression")
        if len(args) == 3 and node.function != "map":
            raise CheckError(f"{node.function}() takes one variable and one expression")
        if receiver.kind == "list":
            elem, where = receiver.elem or DYN, None if path is None else (*path, "[]")
        elif receiver.kind in ("map", "message"):
            elem, where = (receiver.key or DYN) if receiver.kind == "map" else STRING, None
        elif receiver.kind == "dyn":
            elem, where = DYN, None
        else:
            raise CheckError(
                f"{node.function}() needs a list or map; {text(target)} is {_a(receiver)}"
            )
        var = args[0].name
        saved = self.scope.get(var)
        self.scope[var] = (elem, where)
        try:
            body = [self.type_of(a) for a in args[1:]]
        finally:
            if saved is None:
                del self.scope[var]
            else:
                self.scope[var] = saved
        if node.function != "map" or len(args) == 3:
            self._condition(body[0], args[1], f"the condition of {node.function}()")
        if node.function == "map":
            return list_of(body[-1])
        return list_of(elem) if node.function == "filter" else BOOL


def _arity(node: Call, given: list[Type], want: int) -> None:
    if len(given) != want:
        raise CheckError(
            f"{text(node)}: {node.function}() takes {want - (node.target is not None)} argument(s)"
        )


def _arithmetic(op: str, left: Type, right: Type, node: Binary) -> Type:
    kinds = {left.kind, right.kind}
    if "dyn" in kinds:
        return DYN
    if left.kind == right.kind and (
        left.kind in ("int", "uint") or (left.kind == "double" and op != "%")
    ):
        return left
    if op == "+" and left.kind == right.kind and left.kind in ("string", "bytes", "list"):
        return left if left.kind != "list" or _same(left, right) else list_of(DYN)
    if left.kind in ("timestamp", "duration") and right.kind in ("timestamp", "duration"):
        if op == "-" and kinds == {"timestamp"}:
            return DURATION
        if op in "+-" and right.kind == "duration":
            return left
        if op == "+" and kinds == {"timestamp", "duration"}:
            return TIMESTAMP
    hint = ""
    if kinds <= _NUMBERS:
        hint = (
            "; CEL does not mix int, uint and double: convert one, e.g. int(x), or write 1, not 1u"
        )
    elif "string" in kinds:
        hint = "; convert the other with string()"
    raise CheckError(
        f"{text(node.left)} {op} {text(node.right)}: no {op} for {_a(left)} and {_a(right)}{hint}"
    )


def _comparable(a: Type, b: Type) -> bool:
    """Whether values of types a and b can ever be equal (null: any optional field)."""
    kinds = {a.kind, b.kind}
    if kinds & {"dyn", "null"} or kinds <= _NUMBERS:
        return True
    if kinds == {"map", "message"}:  # a message is a map in the document
        return True
    if a.kind != b.kind:
        return False
    if a.kind == "list":
        return _comparable(a.elem or DYN, b.elem or DYN)
    if a.kind == "map":
        return _comparable(a.key or DYN, b.key or DYN) and _comparable(a.elem or DYN, b.elem or DYN)
    return a.kind != "message" or a.name == b.name


def _same(a: Type, b: Type) -> bool:
    return str(a) == str(b)


def _join(types: list[Type]) -> Type:
    return types[0] if types and all(_same(t, types[0]) for t in types) else DYN


def _a(t: Type) -> str:
    return f"{'an' if str(t)[0] in 'aeioAEIO' else 'a'} {t}"


def _suggest(name: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
