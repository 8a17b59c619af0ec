"""What a recovery left behind: its outcome as a typed record (also written to recovery.json
beside the coordinator, for `status` from any shell) and its one-line description."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from core.engines.base import Span

RECOVERY_FILE = "recovery.json"  # the last recovery's outcome, for `status` from any shell
RECOVERED, DEGRADED, FAILED_RECOVERY = "recovered", "degraded", "failed"


@dataclass(frozen=True)
class RecoveryResult:
    """How one recovery ended. `outcome`: recovered, degraded (the rest cannot hold the model:
    nothing restarted) or failed (the restart itself failed)."""

    outcome: str
    lost: tuple[str, ...]  # workers left out
    workers: tuple[str, ...]  # workers the restarted coordinator uses
    spans: tuple[Span, ...]
    recovered_after: float | None  # seconds from the fault's detection to /health 200
    reason: str  # what happened, as a sentence
    at: float  # wall-clock time (time.time()) the recovery ended
    missing_bytes: int = 0  # degraded: memory the rest lacks
    # (step, seconds from the detection to its end), in order: where the time went
    steps: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spans"] = [list(s) for s in self.spans]
        data["steps"] = {name: round(at, 3) for name, at in self.steps}
        return data


def format_steps(steps: Sequence[tuple[str, float]]) -> str:
    """`confirmed +0.31 s, surveyed +0.02 s, ...`: each step's own share of the time."""
    out, last = [], 0.0
    for name, at in steps:
        out.append(f"{name} +{at - last:.2f} s")
        last = at
    return ", ".join(out)


def _steps(record: dict[str, Any]) -> list[tuple[str, float]]:
    steps = record.get("steps")
    if not isinstance(steps, dict):
        return []
    try:
        return [(str(k), float(v)) for k, v in steps.items()]
    except (TypeError, ValueError):
        return []


def format_recovery(record: dict[str, Any]) -> str:
    """One line about a recovery record, for `status` and `watch`."""
    when = time.strftime("%H:%M:%S", time.localtime(float(record.get("at", 0))))
    lost = ", ".join(record.get("lost", ())) or "none"
    outcome = record.get("outcome", "?")
    if outcome == RECOVERED:
        workers = ", ".join(record.get("workers", ())) or "none"
        steps = _steps(record)
        return (f"recovered at {when} in {float(record.get('recovered_after') or 0):.1f} s: "
                f"coordinator restarted over {workers} (left out: {lost})"
                + (f"; from the detection: {format_steps(steps)}" if steps else ""))
    return f"{outcome} at {when} (lost: {lost}): {record.get('reason', '')}"
