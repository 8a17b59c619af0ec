"""A plan's predicted speed from the calibration cache: the lines `plan` and the `p` preview
print, and their JSON."""

from __future__ import annotations

from typing import Any

from core.config import ClusterConfig
from core.engines.base import PlanView
from core.engines.llama_rpc import calibrate_run
from core.engines.llama_rpc.calibrate import LOCAL, load_cached
from core.planning.fit import NOISY, disagreement
from core.planning.perf import ModelShape, Prediction, predict, predict_prompt
from core.planning.placement import Placement

NOT_CALIBRATED = "not calibrated: torbiz-tui calibrate"


def plan_predictions(config: ClusterConfig, placement: Placement
                     ) -> tuple[Prediction, Prediction] | None:
    """(generation, prompt processing); None when this machine's CPU is not calibrated for
    this model."""
    spans = [(a.node, a.n_layers) for a in placement.plan.assignments]
    speeds, links = calibrate_run.measured(config, [node for node, _ in spans])
    if not speeds:
        return None
    shape = ModelShape(placement.model.n_layers, placement.model.n_embd)
    return (predict(spans, speeds, links, shape, coordinator=LOCAL),
            predict_prompt(spans, speeds, links, coordinator=LOCAL))


def plan_speed(config: ClusterConfig, plan: PlanView) -> tuple[list[str], dict[str, Any]]:
    placement = plan.detail
    if not isinstance(placement, Placement):
        return [], {}
    found = plan_predictions(config, placement)
    if found is None:
        return [f"speed: {NOT_CALIBRATED}"], {"speed": None}
    gen, prompt = found
    if not gen.tokens_per_s:
        return [f"speed: {', '.join(gen.unknown)} not calibrated: torbiz-tui calibrate "
                f"{' '.join(gen.unknown)}"], {"speed": {"unknown": list(gen.unknown)}}
    lines = [f"speed: predicted {gen.tokens_per_s:.1f} tok/s generation "
             f"({gen.token_seconds * 1000:.1f} ms a token)"]
    if prompt.tokens_per_s:
        lines[0] += (f", {prompt.tokens_per_s:.0f} tok/s prompt processing (a "
                     f"{prompt.tokens}-token prompt in {prompt.token_seconds * 1000:.0f} ms)")
    lines[0] += "; each token's time:"
    slowest = gen.bottleneck
    for part in gen.nodes:
        mark = "  <- slowest" if slowest is not None and part.node == slowest.node else ""
        held = f"for {part.blocks} blocks" if part.node != LOCAL or part.blocks \
            else "its own work, no blocks"
        lines.append(f"  {part.node}: {part.share:.0%} (compute "
                     f"{part.compute_seconds * 1000:.1f} ms {held}, link "
                     f"{part.link_seconds * 1000:.1f} ms){mark}")
    data: dict[str, Any] = {
        "tokens_per_s": gen.tokens_per_s, "token_seconds": gen.token_seconds,
        "bottleneck": slowest.node if slowest else None,
        "nodes": [{"node": p.node, "blocks": p.blocks, "share": p.share,
                   "compute_seconds": p.compute_seconds, "link_seconds": p.link_seconds}
                  for p in gen.nodes]}
    if prompt.tokens_per_s:
        data["prompt"] = {"tokens_per_s": prompt.tokens_per_s, "tokens": prompt.tokens,
                          "seconds": prompt.token_seconds}
    noisy = noisy_calibrations(config, [p.node for p in gen.nodes if p.node != LOCAL])
    if noisy:
        lines.append(f"  calibration of {', '.join(noisy)} is noisy (its runs disagree): this "
                     f"prediction is unreliable; torbiz-tui calibrate --force {' '.join(noisy)}"
                     " when the machines are quiet")
        data["noisy"] = noisy
    return lines, {"speed": data}


def noisy_calibrations(config: ClusterConfig, names: list[str]) -> list[str]:
    """The nodes whose stored calibration runs disagree (fit.disagreement above NOISY)."""
    found = []
    for name in names:
        cal = load_cached(config, name)
        if cal is not None and disagreement(cal.node_runs()) > NOISY:
            found.append(name)
    return found
