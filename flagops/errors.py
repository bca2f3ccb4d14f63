"""Exception types shared by the CLI and the library.

Kept free of third-party imports so the CLI can catch them without paying for yaml,
jsonschema or ansible_runner at start-up.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

# Characters a terminal acts on or that change how text reads (ESC sequences, CR,
# backspace, bidi overrides such as U+202E, zero-width marks, line/paragraph separators).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: str) -> str:
    """``text`` with every control, format or unassigned character escaped (``\\x1b``,
    ``\\u202e``), so nothing from an input file acts on the terminal that shows it."""
    if text.isprintable() and text.isascii():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_pointer_token(token: str | int) -> str:
    """Escape one JSON-pointer reference token (RFC 6901)."""
    return str(token).replace("~", "~0").replace("/", "~1")


def join_pointer(pointer: str, *tokens: str | int) -> str:
    return pointer + "".join("/" + escape_pointer_token(t) for t in tokens)


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file, 1-based line/column, and its JSON pointer there."""

    file: str
    line: int
    col: int
    pointer: str

    def __str__(self) -> str:
        return printable(f"{self.file}:{self.line}:{self.col}: {self.pointer or '/'}")

    def to_dict(self) -> dict[str, object]:
        return {"file": printable(self.file), "line": self.line, "col": self.col, "pointer": printable(self.pointer)}


@dataclass(frozen=True)
class Problem:
    """One validation finding, rendered as one line."""

    location: Location
    found: str
    expected: str
    fix: str

    def __str__(self) -> str:
        return printable(f"{self.location}: found {self.found}; expected {self.expected}; fix: {self.fix}")

    def to_dict(self) -> dict[str, object]:
        return {
            **self.location.to_dict(),
            "found": printable(self.found),
            "expected": printable(self.expected),
            "fix": printable(self.fix),
            "message": str(self),
        }


@dataclass(frozen=True)
class Unverified:
    """A release value its sources leave unstated or contradict (the release's
    ``unverified`` map): a warning, never an error."""

    location: Location
    field: str  # dotted, as written in the release's unverified map
    reason: str

    def __str__(self) -> str:
        return printable(f"{self.location}: warning: {self.field} is unverified: {self.reason}")

    def to_dict(self) -> dict[str, object]:
        return {
            **self.location.to_dict(),
            "field": printable(self.field),
            "reason": printable(self.reason),
            "message": str(self),
        }


class FlagopsError(Exception):
    """Base class of errors the CLI reports without a traceback (exit status `exit_code`)."""

    exit_code = 1


class ConfigError(FlagopsError):
    """Invalid inventory or release. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self.summary())

    def summary(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found"
        return "\n".join([*(str(p) for p in self.problems), head])


class LockError(FlagopsError):
    """Another flagops run holds the lock."""

    exit_code = 3


class RunError(FlagopsError):
    """A playbook or an external step failed."""

    exit_code = 1
