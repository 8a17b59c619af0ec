"""The weight caches as `plan` and the dashboard's `p` preview show them: per node, what a load
would still send and, from the link rate `calibrate` measured (this machine to the worker's
RPC port, the link a load uses), about how long that takes; standbys and nodes the plan leaves
out with what their caches hold."""

from __future__ import annotations

from typing import Any

from core.units import format_bytes
from core.weight_cache import NodeWarmth, WarmProgress, WarmResult, WarmthReport

NOT_MEASURED = "link rate not measured: torbiz-tui calibrate"


def load_time(node: NodeWarmth) -> str:
    """`about 6.5 s at 23.7 MiB/s (measured 5 min ago)`."""
    seconds = node.load_seconds
    if node.link is None or seconds is None:
        return NOT_MEASURED
    return f"about {seconds:.1f} s at {node.link.describe()}"


def plan_lines(report: WarmthReport) -> list[str]:
    lines = []
    for node in report.nodes:
        if node.error:
            lines.append(f"  {node.name}: {node.error}")
        elif node.planned is None:
            lines.append(f"  {node.name}: not in the plan; its cache holds "
                         f"{format_bytes(node.cache_bytes)}")
        elif node.standby:
            first, count = node.planned
            then = (f"; a recovery sends it at most {format_bytes(node.send_bytes)}, "
                    f"{load_time(node)}" if node.link is not None else "")
            lines.append(f"  {node.name}: standby (not in the plan), {node.warm_share:.0%} of "
                         f"blocks {first}-{first + count - 1} warm for a recovery onto it{then}")
        else:
            warm = (f"{node.warm_share:.0%} of its {format_bytes(node.cacheable_bytes)} of "
                    "cacheable tensors warm" if node.cacheable_bytes else
                    "no tensor of its blocks is big enough for the cache")
            lines.append(f"  {node.name}: would still send {format_bytes(node.send_bytes)}, "
                         f"{load_time(node)}; {warm}")
    planned = [n for n in report.nodes if n.planned is not None and not n.standby
               and not n.error]
    times = [n.load_seconds for n in planned]
    if len(planned) > 1 and all(t is not None for t in times):
        lines.append(f"  the load: about {sum(t or 0.0 for t in times):.1f} s over the links "
                     "(llama-server loads the workers one after the other)")
    return lines


def plan_json(report: WarmthReport) -> list[dict[str, Any]]:
    return [{"node": n.name, "planned": list(n.planned) if n.planned else None,
             "send_bytes": n.send_bytes if n.planned else None, "warm_share": n.warm_share,
             "cache_bytes": n.cache_bytes, "error": n.error,
             "link_bytes_per_second": n.link.bytes_per_second if n.link else None,
             "link_measured_at": n.link.measured_at if n.link else None,
             "load_seconds": n.load_seconds if n.planned else None} for n in report.nodes]


def progress_line(p: WarmProgress) -> str:
    """`node1: push 44.0 MiB / 132.0 MiB at 20.2 MiB/s, 4 s left` (a pre-warm under way)."""
    eta = f", {p.eta_s:.0f} s left" if p.eta_s is not None else ""
    state = "done" if p.finished else p.source
    return (f"{p.node}: {state} {format_bytes(p.done_bytes)} / {format_bytes(p.total_bytes)} "
            f"at {format_bytes(p.rate)}/s{eta}")


def result_lines(w: WarmResult) -> list[str]:
    """A finished pre-warm of one node: what it wrote, from where, what it moved or evicted."""
    if w.error:
        return [f"error: {w.error}"]
    lines = [f"{w.node}: {w.written} tensor(s), {format_bytes(w.written_bytes)} from its "
             f"{w.source} in {w.elapsed_s:.1f} s; {w.skipped} already warm"]
    lines += [f"  {sentence}" for sentence in w.moved_aside]
    if w.evicted:
        lines.append(f"  evicted {len(w.evicted)} file(s), "
                     f"{format_bytes(sum(s for _, s in w.evicted))}, oldest first, to stay "
                     "within its cache_limit_gb: " + " ".join(h for h, _ in w.evicted))
    return lines
