"""Exception types shared by the CLI and the library.

Kept free of third-party imports so the CLI can catch them without paying for yaml,
jsonschema or ansible_runner at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        return f"{self.file}:{self.line}:{self.col}: {self.pointer or '/'}"


@dataclass(frozen=True)
class Problem:
    """One validation finding, rendered as one line."""

    location: Location
    found: str
    expected: str
    fix: str

    def __str__(self) -> str:
        return f"{self.location}: found {self.found}; expected {self.expected}; fix: {self.fix}"

    def to_dict(self) -> dict[str, object]:
        loc = self.location
        return {
            "file": loc.file,
            "line": loc.line,
            "col": loc.col,
            "pointer": loc.pointer,
            "found": self.found,
            "expected": self.expected,
            "fix": self.fix,
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
