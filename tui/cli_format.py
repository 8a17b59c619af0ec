"""How the headless commands write core's results: status, the doctor's report, the block map
and the event lines. Remote text goes through terminal_safe before it reaches a terminal."""

from __future__ import annotations

import sys

from core.checks import DoctorReport
from core.status import ClusterStatus, Event, Level, NodeChanged, NodeState, Notice
from core.status_text import coordinator_state_text, status_cells
from core.supervision.bottleneck import Bottleneck
from core.units import table_lines
from tui.text import sanitize


def print_event(event: Event) -> None:
    """Progress on stderr while a command works; its own error lines say failures once."""
    if isinstance(event, Notice):
        if event.level == Level.ERROR:
            return
        prefix = "warning: " if event.level == Level.WARNING else ""
        print(f"{prefix}{sanitize(event.text)}", file=sys.stderr, flush=True)
    elif isinstance(event, NodeChanged) and event.status.state == NodeState.STARTING \
            and event.status.pid is None:
        print(f"{event.status.name}: starting worker on {event.status.endpoint}",
              file=sys.stderr, flush=True)


def print_problems(problems: list[str]) -> None:
    for problem in problems:
        print(f"error: {sanitize(problem)}", file=sys.stderr)


def format_status(status: ClusterStatus) -> str:
    columns = ("name", "host", "backend", "state", "pid", "endpoint", "error")
    rows: list[tuple[str, ...]] = [tuple(c.upper() for c in columns)]
    for n in status.nodes:
        cells = status_cells(n)
        rows.append(tuple(cells[key] for key in columns))
    lines = table_lines(rows)
    c = status.coordinator
    if c.url or c.state != NodeState.STOPPED:
        lines.append("")
        lines.append(f"coordinator: {coordinator_state_text(c)}  {c.url}  pid {c.pid or '-'}"
                     + (f"  {sanitize(c.error)}" if c.error else ""))
    if status.blocks or status.unserved:
        lines.append(format_block_map(status))
    neck = Bottleneck.from_json(status.bottleneck, float(status.bottleneck.get("age_s") or 0)) \
        if status.bottleneck else None
    if neck is not None:
        lines += ["", *(sanitize(line) for line in neck.lines())]
    return "\n".join(line.rstrip() for line in lines)


def format_block_map(status: ClusterStatus) -> str:
    """One line per node (its served span and DHT state) and the unserved blocks."""
    lines = []
    for share in status.layers:
        served = (f"{share.first_layer}:{share.first_layer + (share.layers or 0)}"
                  if share.first_layer is not None else "-")
        planned = (f"{share.planned_first}:{share.planned_first + (share.planned_layers or 0)}"
                   if share.planned_first is not None else "-")
        lines.append(f"  {share.node:<12} blocks {served:<9} (planned {planned})  "
                     f"{share.state or 'not in the DHT'}")
    unserved = ", ".join(map(str, status.unserved)) or "none"
    return "\n".join(["block map (DHT):", *lines, f"  unserved blocks: {unserved}"])


def format_doctor(report: DoctorReport) -> str:
    marks = {"ok": "ok  ", "warning": "WARN", "failed": "FAIL"}
    lines = [f"{marks[str(c.level)]}  {c.part:<14} {c.name:<8} {sanitize(c.message)}"
             for c in report.checks]
    failed = len(report.failed)
    lines.append("")
    lines.append("all checks passed" if not failed else
                 f"{failed} check{'s' if failed > 1 else ''} failed: fix them, or "
                 "`up --force` to start anyway")
    return "\n".join(lines)
