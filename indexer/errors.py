"""Exceptions as the one-line reasons in our messages."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first non-blank line of ``exc``'s message (for SQLAlchemy's wrapper, the
    database driver's own), its spaces collapsed; the type's name when it says nothing."""
    orig = getattr(exc, "orig", None) or exc
    for line in str(orig).splitlines():
        if line.strip():
            return " ".join(line.split())
    return type(orig).__name__
