"""Markdown tables and percentages: the one format every report (eval, audit, parity, bench) uses."""

from __future__ import annotations

from typing import Any


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
