"""A plan's predicted speed from the calibration cache: the lines `plan` and the `p` preview
print, and their JSON."""

from __future__ import annotations

from typing import Any

from core.config import ClusterConfig
from core.engines.base import PlanView
from core.engines.llama_rpc import calibrate_run
from core.engines.llama_rpc.calibrate import LOCAL
from core.planning.perf import ModelShape, Prediction, predict
from core.planning.placement import Placement

NOT_CALIBRATED = "not calibrated: torbiz-tui calibrate"


def plan_prediction(config: ClusterConfig, placement: Placement) -> Prediction | None:
    """None when nothing is calibrated for this model."""
    names = [a.node for a in placement.plan.assignments]
    speeds, links = calibrate_run.measured(config, names)
    if not speeds:
        return None
    shape = ModelShape(placement.model.n_layers, placement.model.n_embd)
    return predict([(a.node, a.n_layers) for a in placement.plan.assignments], speeds, links,
                   shape, local=[LOCAL])


def plan_speed(config: ClusterConfig, plan: PlanView) -> tuple[list[str], dict[str, Any]]:
    placement = plan.detail
    if not isinstance(placement, Placement):
        return [], {}
    found = plan_prediction(config, placement)
    if found is None:
        return [f"speed: {NOT_CALIBRATED}"], {"speed": None}
    if not found.tokens_per_s:
        return [f"speed: {', '.join(found.unknown)} not calibrated: torbiz-tui calibrate "
                f"{' '.join(found.unknown)}"], {"speed": {"unknown": list(found.unknown)}}
    lines = [f"speed: predicted {found.tokens_per_s:.1f} tok/s generation "
             f"({found.token_seconds * 1000:.1f} ms a token); each token's time:"]
    slowest = found.bottleneck
    for part in found.nodes:
        mark = "  <- slowest" if slowest is not None and part.node == slowest.node else ""
        lines.append(f"  {part.node}: {part.share:.0%} (compute "
                     f"{part.compute_seconds * 1000:.1f} ms for {part.blocks} blocks, link "
                     f"{part.link_seconds * 1000:.1f} ms){mark}")
    return lines, {"speed": {
        "tokens_per_s": found.tokens_per_s, "token_seconds": found.token_seconds,
        "bottleneck": slowest.node if slowest else None,
        "nodes": [{"node": p.node, "blocks": p.blocks, "share": p.share,
                   "compute_seconds": p.compute_seconds, "link_seconds": p.link_seconds}
                  for p in found.nodes]}}
