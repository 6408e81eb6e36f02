"""Device-supplied text in the verifier's log (issue 7, item 9).

Anything a device sends (a hostname, a posture signal, an agent version, a finding message
quoting a value from its evidence) is escaped before it is logged: a newline or an ANSI
escape in a hostname must not forge a log line or rewrite a terminal. Control and other
non-printable characters become Python-style escapes (``\\n``, ``\\x1b``, ``\\u2028``),
backslashes are doubled so an escape cannot be faked, and long values are cut.
"""

from __future__ import annotations

DEFAULT_LIMIT = 256


def printable(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` as one line of printable characters, at most ``limit`` of them (plus "...")."""
    value = str(text)
    if value.isprintable() and "\\" not in value:  # nothing to escape (the usual case)
        return value[:limit] + "..." if len(value) > limit else value
    out: list[str] = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    escaped = "".join(out)
    if len(escaped) > limit:
        return escaped[:limit] + "..."
    return escaped
