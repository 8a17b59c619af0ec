"""How sizes and tables are written for the operator, in one place for the CLI, the plan
tables and the dashboard."""

from __future__ import annotations

from collections.abc import Sequence

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def format_bytes(value: int | float) -> str:
    """2.50 GiB, 180.1 MiB, 12.0 KiB, 512 B."""
    if value >= GIB:
        return f"{value / GIB:.2f} GiB"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    if value >= KIB:
        return f"{value / KIB:.1f} KiB"
    return f"{int(value)} B"


def table_lines(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def format_age(seconds: float) -> str:
    """just now, 5 min ago, 3 h ago, 2 days ago."""
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600:.0f} h ago"
    return f"{seconds // 86400:.0f} days ago"
