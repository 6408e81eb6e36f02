"""What each rule reads, and the CEL contexts of one policy evaluation (verifier/policy.py).
Pure.

Converting a document to CEL is the expensive part of an evaluation, so each rule's reads are
found once, when the policy loads, by a conservative scan of its text (any doubt reads the
name whole), and an evaluation converts only what its rules select.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import cel

from devtrust.verifier.document import Document

if TYPE_CHECKING:
    from devtrust.verifier.policy import Rule


def _wanted(rules: list[Rule]) -> dict[str, frozenset[str] | None]:
    """Per name the rules read, the union of the fields they select (None: whole)."""
    wanted: dict[str, frozenset[str] | None] = {}
    for rule in rules:
        for name, fields in rule.fields:
            have = wanted.get(name, frozenset())
            wanted[name] = None if fields is None or have is None else have | fields
    return wanted


def _pruned(value: Any, fields: frozenset[str] | None) -> Any:
    if fields is None or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k in fields}


class Contexts:
    """The CEL contexts of one evaluation, each converted from Python at most once.

    Converting to CEL is the expensive part (~0.1 ms per GPU; a rule then runs in under a
    microsecond), and a context converts all of its content again whenever a variable is
    added to it, so `this` is never added to a context that holds the GPU list: that made a
    failing GPU rule cost the whole document per GPU, quadratic in the GPU count. Instead:
    - host rules run on the document without the GPU list, unless one may read it;
    - each GPU gets a small context of its own: `this` and the parts of the document its
      rules read (``gpu`` without the list);
    - a GPU rule that may read gpu.gpus runs on the whole document, converted once, with
      `this` supplied by a resolver (asked on every execution, so no conversion of the
      document per GPU; such a rule still costs the list per GPU, by its own choice).
    """

    def __init__(self, doc: Document, gpu_rules: list[Rule]) -> None:
        self.doc = doc
        self.gpus: list[dict[str, Any]] = doc.get("gpu", {}).get("gpus") or []
        slim = {**doc, "gpu": {k: v for k, v in doc.get("gpu", {}).items() if k != "gpus"}}
        self.slim = slim
        own = [r for r in gpu_rules if not r.reads_gpu_list]
        wanted = _wanted(own)
        self.shared = {n: _pruned(slim[n], wanted[n]) for n in set(wanted) & set(slim)}
        # Of each GPU, only the fields the rules select of `this`.
        self._this_fields = wanted.get("this")
        self._whole: Any = None
        self._this: dict[str, Any] = {}

    def host(self, rules: list[Rule]) -> Any:
        """The host rules' context: the document without the GPU list (unless a rule may
        read it), and of each name only the fields the rules select."""
        if any(r.reads_gpu_list for r in rules):
            return self._whole_context()
        wanted = _wanted(rules)
        return cel.Context(
            {
                name: _pruned(value, wanted[name])
                for name, value in self.slim.items()
                if name in wanted
            }
        )

    def gpu(self, gpu: dict[str, Any]) -> Any:
        return cel.Context({**self.shared, "this": _pruned(gpu, self._this_fields)})

    def whole_with(self, gpu: dict[str, Any]) -> Any:
        context = self._whole_context()
        if not self._this:
            context.set_variable_resolver(self._this.get)  # None: the document's own names
        self._this["this"] = gpu
        return context

    def _whole_context(self) -> Any:
        if self._whole is None:
            self._whole = cel.Context(self.doc)
        return self._whole


_GPU_NAME = re.compile(r"\bgpu\b")
_SELECTION = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")


def may_read_gpu_list(source: str) -> bool:
    """Whether a CEL expression may read gpu.gpus, or the ``gpu`` map whole: any mention of the
    name ``gpu`` that is not the selection of another field (``gpu.driver_version``; not
    ``gpu.gpus``, ``gpu["gpus"]``, ``size(gpu)`` or a call on it, ``gpu.all(k, ...)``, whose
    keys would differ). Conservative by construction: a mention inside a string literal or a
    comment counts too, so no reference can hide."""
    for mention in _GPU_NAME.finditer(source):
        field = _SELECTION.match(source, mention.end())
        if field is None or field.group(1) == "gpus":
            return True
        if source[field.end() :].lstrip().startswith("("):  # a macro or method on the map
            return True
    return False


def selected_fields(source: str, name: str) -> frozenset[str] | None:
    """The fields of ``name`` a CEL expression selects (``os.lockdown``), or None when it
    may read ``name`` whole (``os["x"]``, ``size(os)``, ``os.all(...)``, a mention in a
    string). Conservative like ``may_read_gpu_list``: any doubt reads it whole."""
    fields = set()
    for mention in re.finditer(rf"\b{re.escape(name)}\b", source):
        if source[: mention.start()].rstrip().endswith("."):
            return None  # x.os: a field of something else named like it, or a trick
        field = _SELECTION.match(source, mention.end())
        if field is None or source[field.end() :].lstrip().startswith("("):
            return None
        fields.add(field.group(1))
    return frozenset(fields)
