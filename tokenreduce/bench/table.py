"""Fixed-width and markdown tables from rows of strings. No torch."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "markdown_table", "num"]


def num(value: object, fmt: str, missing: str = "—") -> str:
    """``format(value, fmt)`` for a number, else ``missing``."""
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else missing


def format_table(rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """``rows[0]`` is the header; ``right[i]`` right-aligns column i (numbers). A rule under the header."""
    if not rows:
        raise ValueError("format_table: no rows (give at least the header)")
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows):
        raise ValueError(f"format_table: every row needs {ncol} cells like the header")
    right = right if right is not None else [False] * ncol
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(r, widths, right)).rstrip()

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows[1:])])


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows[0]`` is the header."""
    if not rows:
        raise ValueError("markdown_table: no rows (give at least the header)")
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
