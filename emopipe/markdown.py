"""Markdown tables, for text a person reads (the run summary, the headline with its CIs); tables that
are data go to the UI as Dagster table metadata instead (assets/common.table_metadata)."""

from __future__ import annotations

from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], *, numeric: Sequence[int] = ()) -> str:
    """A GitHub-flavoured Markdown table; the columns at `numeric` are right-aligned."""
    align = ["---:" if j in numeric else "---" for j in range(len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
