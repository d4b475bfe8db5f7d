"""A claim an experiment makes, and how it is printed. A leaf (standard library only).

Every command that states a result (``python -m lora_np``, ``--task text``) checks each claim
on the numbers it just measured, prints it with ✓ or ✗, and exits with status 1 if any fails,
so a claim can never be shown without being true of the run that shows it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Claim", "format_claims"]


class Claim(NamedTuple):
    """One claim: what it says (with what is measured), whether this run shows it, the numbers."""
    statement: str
    holds: bool
    detail: str


def format_claims(claims) -> str:
    """One line per claim: ✓ or ✗, the statement, the numbers."""
    return "\n".join(f"{'✓' if c.holds else '✗'} {c.statement}: {c.detail}" for c in claims)
