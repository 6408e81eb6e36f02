"""A parser of CEL expressions (the grammar of the CEL language definition) into a small tree,
for the policy checker (verifier/celcheck.py). Pure.

The common-expression-language runtime compiles and evaluates expressions but exposes neither
its syntax tree nor a type checker, so the policy reads each expression a second time here.
Every expression is compiled by the runtime first; this parser then accepts the whole grammar
the runtime does, except message construction (``Type{field: value}``), which names protobuf
types the policy environment does not have, and the optional syntax (``x.?y``), which the
runtime refuses too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from devtrust.verifier.schema import BOOL, BYTES, DOUBLE, INT, NULL, STRING, UINT, Type


class ParseError(ValueError):
    """An expression the checker cannot read; the message says where."""


@dataclass(frozen=True)
class Node:
    pos: int


@dataclass(frozen=True)
class Lit(Node):
    type: Type
    value: object


@dataclass(frozen=True)
class Ident(Node):
    name: str


@dataclass(frozen=True)
class Select(Node):
    operand: Node
    field: str


@dataclass(frozen=True)
class Index(Node):
    operand: Node
    index: Node


@dataclass(frozen=True)
class Call(Node):
    function: str
    target: Node | None
    args: tuple[Node, ...]


@dataclass(frozen=True)
class ListLit(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class MapLit(Node):
    entries: tuple[tuple[Node, Node], ...]


@dataclass(frozen=True)
class Unary(Node):
    op: str
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Cond(Node):
    cond: Node
    then: Node
    other: Node


_TOKEN = re.compile(
    r"""(?P<space>\s+|//[^\n]*)
    |(?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d+|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+[uU]?)
    |(?P<string>(?:[rR][bB]?|[bB][rR]?)?
        (?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>\|\||&&|==|!=|<=|>=|[<>!+\-*/%?:.,()\[\]{}])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "`": "`", "?": "?"}
_RELATIONS = ("==", "!=", "<", "<=", ">", ">=", "in")


def _tokens(source: str) -> list[tuple[str, str, int]]:
    out, at = [], 0
    while at < len(source):
        match = _TOKEN.match(source, at)
        if match is None:
            raise ParseError(f"unexpected {source[at]!r} at column {at + 1}")
        kind = match.lastgroup or ""
        if kind != "space":
            text = match.group()
            out.append(("op" if kind == "ident" and text == "in" else kind, text, at))
        at = match.end()
    out.append(("end", "", len(source)))
    return out


def _literal(kind: str, text: str, pos: int) -> Lit:
    if kind == "number":
        try:
            return _number(text, pos)
        except ValueError:  # "01" (Python refuses a leading zero), 5,000 digits, ...
            raise ParseError(f"number {text[:40]!r} at column {pos + 1}") from None
    prefix = text[: len(text) - len(text.lstrip("rRbB"))].lower()
    body = text[len(prefix) :]
    quote = 3 if body[:3] in ("'''", '"""') else 1
    inner = body[quote:-quote]
    if "r" not in prefix:  # the escapes a field name or map key may hold; others stay as written
        inner = _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group()), inner)
    return Lit(pos, BYTES if "b" in prefix else STRING, inner)


def _number(text: str, pos: int) -> Lit:
    if text[-1] in "uU":
        return Lit(pos, UINT, int(text[:-1], 0))
    if any(c in text for c in ".eE") and not text.lower().startswith("0x"):
        return Lit(pos, DOUBLE, float(text))
    return Lit(pos, INT, int(text, 0))


class _Parser:
    def __init__(self, source: str) -> None:
        self.tokens = _tokens(source)
        self.at = 0

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.at]

    def eat(self, text: str) -> bool:
        kind, value, _ = self.peek()
        if kind == "op" and value == text:
            self.at += 1
            return True
        return False

    def need(self, text: str) -> None:
        if not self.eat(text):
            _, value, pos = self.peek()
            raise ParseError(f"expected {text!r} at column {pos + 1}, found {value or 'the end'!r}")

    def expr(self) -> Node:
        cond = self.binary(0)
        pos = self.peek()[2]
        if self.eat("?"):
            then = self.binary(0)
            self.need(":")
            return Cond(pos, cond, then, self.expr())
        return cond

    _LEVELS: tuple[tuple[str, ...], ...] = (
        ("||",),
        ("&&",),
        _RELATIONS,
        ("+", "-"),
        ("*", "/", "%"),
    )

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            kind, value, pos = self.peek()
            if kind != "op" or value not in self._LEVELS[level]:
                return left
            self.at += 1
            left = Binary(pos, value, left, self.binary(level + 1))

    def unary(self) -> Node:
        kind, value, pos = self.peek()
        if kind == "op" and value in ("!", "-"):
            self.at += 1
            return Unary(pos, value, self.unary())
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while True:
            pos = self.peek()[2]
            if self.eat("."):
                kind, name, _ = self.peek()
                if kind != "ident":
                    raise ParseError(f"expected a field name at column {pos + 2}")
                self.at += 1
                if self.eat("("):
                    node = Call(pos, name, node, self.args(")"))
                else:
                    node = Select(pos, node, name)
            elif self.eat("["):
                node = Index(pos, node, self.expr())
                self.need("]")
            else:
                return node

    def args(self, close: str) -> tuple[Node, ...]:
        out: list[Node] = []
        while not self.eat(close):
            out.append(self.expr())
            if not self.eat(","):
                self.need(close)
                break
        return tuple(out)

    def primary(self) -> Node:  # noqa: PLR0911 - one return per kind of primary
        kind, value, pos = self.peek()
        self.at += 1
        if kind == "op" and value == "." and self.peek()[0] == "ident":
            kind, value, _ = self.peek()  # a leading dot: the name in the root scope
            self.at += 1
        if kind in ("number", "string"):
            return _literal(kind, value, pos)
        if kind == "ident":
            if value in ("true", "false"):
                return Lit(pos, BOOL, value == "true")
            if value == "null":
                return Lit(pos, NULL, None)
            if self.eat("("):
                return Call(pos, value, None, self.args(")"))
            if self.peek()[1] == "{":
                raise ParseError(f"message construction ({value}{{...}}) is not supported")
            return Ident(pos, value)
        if kind == "op" and value == "(":
            inner = self.expr()
            self.need(")")
            return inner
        if kind == "op" and value == "[":
            return ListLit(pos, self.args("]"))
        if kind == "op" and value == "{":
            entries = []
            while not self.eat("}"):
                key = self.expr()
                self.need(":")
                entries.append((key, self.expr()))
                if not self.eat(","):
                    self.need("}")
                    break
            return MapLit(pos, tuple(entries))
        raise ParseError(f"unexpected {value or 'end'!r} at column {pos + 1}")


def parse(source: str) -> Node:
    """The tree of a CEL expression; ParseError for what this parser does not read."""
    parser = _Parser(source)
    node = parser.expr()
    kind, value, pos = parser.peek()
    if kind != "end":
        raise ParseError(f"unexpected {value!r} at column {pos + 1}")
    return node


def _literal_text(node: Lit) -> str:
    if node.type is STRING:
        return f'"{node.value}"'
    if node.type is UINT:
        return f"{node.value}u"
    if isinstance(node.value, bool) or node.value is None:
        return {True: "true", False: "false"}.get(node.value, "null")  # type: ignore[arg-type]
    return repr(node.value)


def text(node: Node) -> str:
    """The source form of a selection, for messages (``os.sshd.permit_root_login``)."""
    if isinstance(node, Ident):
        return node.name
    if isinstance(node, Select):
        return f"{text(node.operand)}.{node.field}"
    if isinstance(node, Index):
        return f"{text(node.operand)}[{text(node.index)}]"
    if isinstance(node, Lit):
        return _literal_text(node)
    if isinstance(node, Call):
        head = f"{text(node.target)}." if node.target is not None else ""
        return f"{head}{node.function}({', '.join(text(a) for a in node.args)})"
    return "(...)"
