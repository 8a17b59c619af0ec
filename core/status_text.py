"""A node's status as text: the one formatter the dashboard's table and the headless `status`
share. Remote text (names come from the config, errors from nodes) is made inert here."""

from __future__ import annotations

import time

from core.status import READY, STARTING, CoordinatorStatus, NodeStatus
from core.text import terminal_safe as sanitize


def uptime(started_at: float | None, now: float | None = None) -> str:
    """Whole minutes, hours, days: `<1m`, `42m`, `3h05`, `2d04h`."""
    if started_at is None:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - started_at))
    minutes = seconds // 60
    if minutes < 1:
        return "<1m"
    if minutes < 60:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 24:
        return f"{hours}h{minutes % 60:02d}"
    return f"{hours // 24}d{hours % 24:02d}h"


SLOW = "slow"  # shown for a ready node whose status round trip took SLOW_MS or more
SLOW_MS = 500


def node_state_text(status: NodeStatus) -> str:
    """The state cell: the state, or `slow` for a ready node that answers slowly (its RTT is
    in the latency cell): it serves, it is not dead."""
    if status.state == READY and status.probe_ms is not None and status.probe_ms >= SLOW_MS:
        return SLOW
    return str(status.state)


def coordinator_state_text(status: CoordinatorStatus) -> str:
    """`ready`, `starting (loading 12 s)`, `not responding` ...: what its endpoint answers."""
    if status.state == STARTING and status.loading_s is not None:
        return f"{status.state} (loading {status.loading_s:.0f} s)"
    return str(status.state)


def status_cells(status: NodeStatus, now: float | None = None) -> dict[str, str]:
    """A node's status as text, sanitized: the cells the dashboard's table and the headless
    `status` share (name, host, backend, state, pid, latency, uptime, endpoint, error)."""
    running = status.state in (READY, STARTING)
    return {
        "name": sanitize(status.name),
        "host": sanitize(status.host),
        "backend": sanitize(status.backend),
        "state": sanitize(node_state_text(status)),
        "pid": str(status.pid or "-"),
        "latency": f"{status.probe_ms}ms" if status.probe_ms is not None else "-",
        "uptime": uptime(status.started_at, now) if running else "-",
        "endpoint": sanitize(status.endpoint),
        "error": sanitize(status.error),
    }
