"""`torbiz-tui cache`, `cache warm`, `cache prune`: the weight cache headless."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

from core import operations
from core.cluster import Cluster
from core.config import ClusterConfig
from core.operations import OperationError
from core.units import format_bytes, table_lines
from core.weight_cache import NodeWarmth, WarmProgress, WarmthReport
from core.weight_cache_view import progress_line, result_lines
from tui.cli_format import print_problems
from tui.text import sanitize


def add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="the workers' weight caches: what is warm where; "
                       "`cache warm [NODE...]` fills them, `cache prune` evicts")
    p.add_argument("action", nargs="?", choices=("show", "warm", "prune"), default="show")
    p.add_argument("nodes", nargs="*", metavar="NODE", help="warm only these nodes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the cache files on the nodes (moves aside wrong ones)")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would go")


def _span(row: NodeWarmth) -> str:
    if row.planned is None:
        return "not planned"
    first, count = row.planned
    return f"{first}-{first + count - 1}" + (" (standby)" if row.standby else "")


def format_warmth(report: WarmthReport, why: str | None) -> list[str]:
    lines = [f"model {sanitize(report.model)}: {format_bytes(report.model_bytes)}, "
             f"{report.cacheable_share:.0%} in tensors above 10 MiB (the ones a cache can hold)"]
    if why:
        lines.append(f"no plan ({sanitize(why)}): caches listed without spans")
    rows = [["node", "blocks", "warm", "cached", "load would send", "cache", "free", "note"]]
    for r in report.nodes:
        note = sanitize(r.error) if r.error else ""
        if r.wrong_files:
            note += f"{r.wrong_files} file(s) of the wrong size (moved aside at the next start)"
        if r.foreign_bytes:
            note += (" " if note else "") + f"{format_bytes(r.foreign_bytes)} of other models"
        rows.append([r.name, _span(r),
                     f"{r.warm_share:.0%}" if r.planned else "-",
                     f"{format_bytes(r.warm_bytes)} / {format_bytes(r.cacheable_bytes)}"
                     if r.planned else f"{r.cached_files} tensors",
                     format_bytes(r.send_bytes) if r.planned else "-",
                     format_bytes(r.cache_bytes),
                     format_bytes(r.free_bytes) if r.free_bytes is not None else "?", note])
    lines += table_lines(rows)
    for r in report.nodes:
        if r.parts:
            cells = []
            for p in r.parts:
                mark = ("warm" if p.warm_bytes == p.cacheable_bytes
                        else "cold" if p.warm_bytes == 0 else
                        f"{p.warm_bytes / p.cacheable_bytes:.0%}")
                cells.append(f"{p.part.replace('block ', 'b')}:{mark}")
            lines.append(f"  {r.name}: " + " ".join(cells))
    return lines


def _progress_printer() -> Callable[[WarmProgress], None]:
    last: dict[str, float] = {}

    def show(p: WarmProgress) -> None:
        now = time.monotonic()
        if not p.finished and now - last.get(p.node, 0.0) < 1.0:
            return
        last[p.node] = now
        if p.error:
            return  # said once at the end
        print(sanitize(progress_line(p)), file=sys.stderr, flush=True)

    return show


async def run_cache(config: ClusterConfig, args: argparse.Namespace) -> int:
    cluster = Cluster(config)
    try:
        if args.action == "prune":
            results = await operations.cache_prune(cluster, dry_run=args.dry_run)
            if args.json:
                print(json.dumps([asdict(r) for r in results], indent=2))
                return 0
            verb = "would evict" if args.dry_run else "evicted"
            for r in results:
                if r.error:
                    print(f"{r.node}: {sanitize(r.error)}")
                    continue
                gone = sum(size for _, size in r.evicted)
                limit = f" (limit {format_bytes(r.limit_bytes)})" if r.limit_bytes else ""
                print(f"{r.node}: {verb} {len(r.evicted)} file(s), {format_bytes(gone)}; "
                      f"keeps {format_bytes(r.kept_bytes)}{limit}")
                for name, size in r.evicted:
                    print(f"  {name}  {format_bytes(size)}")
                for note in r.notes:
                    print(f"  {sanitize(note)}")
            return 0
        if args.action == "warm":
            names = args.nodes or None
            warmed = await operations.cache_warm(cluster, names, verify=args.verify,
                                                 progress=_progress_printer())
            for w in warmed:
                for line in result_lines(w):
                    print(sanitize(line))
            return 1 if any(w.error for w in warmed) else 0
        if args.verify:
            for sentence in await operations.cache_verify(cluster, args.nodes or None):
                print(sanitize(sentence))
        report, why = await operations.cache_report(cluster)
        if args.json:
            print(json.dumps({**asdict(report), "no_plan": why,
                              "nodes": [asdict(r) | {"send_bytes": r.send_bytes,
                                                     "warm_share": r.warm_share}
                                        for r in report.nodes]}, indent=2))
        else:
            print("\n".join(format_warmth(report, why)))
        return 0
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
