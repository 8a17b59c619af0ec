"""The doctor's vocabulary: one check's result and the report of a whole run. Engines produce
checks; core/doctor.py runs them; the CLI and the dashboard format the report."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from core.reach.probe import NodeProbe


class CheckLevel(str, Enum):
    OK = "ok"
    WARN = "warning"
    FAIL = "failed"

    def __str__(self) -> str:
        return self.value


OK, WARN, FAIL = CheckLevel.OK, CheckLevel.WARN, CheckLevel.FAIL


@dataclass(frozen=True)
class Check:
    part: str  # a node name, "coordinator", "this machine" or "swarm"
    name: str  # "ssh", "binary", "clock", "port", "bind", "memory", ...
    level: str  # a CheckLevel
    message: str


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]
    probes: dict[str, NodeProbe]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.level == FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.level == WARN]

    def to_json(self) -> dict[str, object]:
        return {"ok": not self.failed,
                "checks": [c.__dict__ for c in self.checks],
                "nodes": {name: {"cores": p.cores, "ram_total_bytes": p.ram_total_bytes,
                                 "ram_available_bytes": p.ram_available_bytes,
                                 "gpus": [g.__dict__ for g in p.gpus],
                                 "clock_offset_s": round(p.clock_offset_s, 3),
                                 "worker_binary": p.worker_binary, "errors": list(p.errors)}
                          for name, p in self.probes.items()}}
