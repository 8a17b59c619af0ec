"""The dashboard under a synthetic feed, headless: CPU share of one core, redraw latency, memory.

The feed is the app's own messages (NodeUpdated, LogLines) posted from a task on its loop, as
the Cluster and the log streams would post them; no node, no SSH, no subprocess. live=False, so
the app starts no IO of its own.

- CPU: process CPU time / wall time over a window, for an idle dashboard (the baseline) and for
  64 and 256 nodes at 1 update per node per second plus 5,000 log lines per second into the
  selected node's pane; "dashboard" leaves out the CPU the feed and the redraw probes spend
  (measured around their own code). Target: under 10% of one core at 64 nodes.
- Redraw: every update carries a sequence number in a cell (the node's error column, the log
  line's text); the time from posting it to the first time the widget's render_line draws it.
  Only updates to rows on screen can be drawn, so only those count. Target: under 100 ms.
- Memory: log lines pushed as fast as the pane takes them; RSS once the buffers are full, then
  after ten minutes' worth (3,000,000 lines at 5,000/s) and 10x the buffer. Target: flat.

    .venv/bin/python bench/dashboard.py [--window 15] [--sizes 64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import ClusterConfig, load_config  # noqa: E402
from core.status import READY, STARTING, NodeStatus  # noqa: E402
from tests.cluster_files import toml_text  # noqa: E402
from tui.app import TorbizApp, make_app  # noqa: E402
from tui.screens.main import MainScreen  # noqa: E402
from tui.widgets.log_pane import LogPane  # noqa: E402
from tui.widgets.log_view import LogView  # noqa: E402
from tui.widgets.node_table import NodeTable  # noqa: E402

SIZE = (140, 40)  # the terminal size the tests and the tmux session use
# Every update changes a visible cell (the error column); one in STARTING_EVERY also turns the
# node to "starting" until its next update, so about 1/16 of the rows spin at any time, as in
# a rolling restart. The "all starting" scenario is the spinner's worst case.
STARTING_EVERY = 16
TICK = 0.05  # seconds between feed batches
LOG_RATE = 5_000  # lines per second
LOG_LINES = 5_000  # the pane's buffer (the dashboard's default)
NODE_MARK = re.compile(r"upd (\d+)")
LOG_MARK = re.compile(r"^L(\d+) ")
PAYLOAD = "load_tensors: RPC0[10.9.66.41:50052] model buffer size = 180.07 MiB " + "x" * 20


def synthetic_config(workdir: Path, count: int) -> ClusterConfig:
    nodes = [{"name": f"node-{i:03d}", "host": f"10.{i // 250}.{i % 250}.1", "rpc_port": 50052}
             for i in range(count)]
    path = workdir / f"cluster-{count}.toml"
    path.write_text(toml_text({"name": f"bench{count}", "state_dir": str(workdir / "state")},
                              nodes, model={"gguf": str(workdir / "none.gguf")},
                              coordinator={"host": "127.0.0.1", "port": 8181}))
    return load_config(path)


@dataclass
class Redraws:
    """Posting times of marked updates, and how long each took to be drawn."""

    pending_nodes: dict[int, float] = field(default_factory=dict)
    pending_logs: dict[int, float] = field(default_factory=dict)
    node_ms: list[float] = field(default_factory=list)
    log_ms: list[float] = field(default_factory=list)

    def seen(self, text: str, pattern: re.Pattern[str], pending: dict[int, float],
             found: list[float]) -> None:
        match = pattern.search(text)
        if match is not None:
            posted = pending.pop(int(match.group(1)), None)
            if posted is not None:
                found.append((time.perf_counter() - posted) * 1000)


REDRAWS = Redraws()


@dataclass
class Cost:
    """CPU seconds the benchmark itself spends in the app's process: making the feed, and
    reading the marks back out of drawn lines. Subtracted for the dashboard's own share."""

    feed: float = 0.0
    probe: float = 0.0


COST = Cost()


def instrument() -> None:
    """Wrap the two widgets' render_line to note when a marked update is first drawn."""
    table_render: Callable[..., Any] = NodeTable.render_line
    view_render: Callable[..., Any] = LogView.render_line

    def table_line(self: NodeTable, y: int) -> Any:
        strip = table_render(self, y)
        if REDRAWS.pending_nodes:
            started = time.process_time()
            REDRAWS.seen(strip.text, NODE_MARK, REDRAWS.pending_nodes, REDRAWS.node_ms)
            COST.probe += time.process_time() - started
        return strip

    def view_line(self: LogView, y: int) -> Any:
        strip = view_render(self, y)
        if REDRAWS.pending_logs:
            started = time.process_time()
            REDRAWS.seen(strip.text.strip(), LOG_MARK, REDRAWS.pending_logs, REDRAWS.log_ms)
            COST.probe += time.process_time() - started
        return strip

    NodeTable.render_line = table_line  # type: ignore[method-assign]
    LogView.render_line = view_line  # type: ignore[method-assign]


@dataclass
class Result:
    name: str
    cpu: float  # the whole process, per second of wall time
    net: float  # without the feed's and the probes' own CPU: the dashboard's share
    node_rate: float
    log_rate: float
    node_ms: list[float]
    log_ms: list[float]
    rss_mb: float


async def feed(app: TorbizApp, config: ClusterConfig, window: float, nodes_per_s: float,
               lines_per_s: float) -> tuple[int, int]:
    """Post node updates and log lines at the given rates for `window` seconds."""
    names = [n.name for n in config.nodes]
    selected = names[0]
    seq = line_seq = updates = lines = 0
    node_credit = line_credit = 0.0
    started = time.perf_counter()
    next_tick = started
    while (now := time.perf_counter()) - started < window:
        work_started = time.process_time()
        node_credit += nodes_per_s * TICK
        line_credit += lines_per_s * TICK
        while node_credit >= 1:
            node_credit -= 1
            name = names[seq % len(names)]
            node = config.node(name)
            state = STARTING if seq % STARTING_EVERY == 0 else READY
            REDRAWS.pending_nodes[seq] = time.perf_counter()
            app.main.post_message(MainScreen.NodeUpdated(NodeStatus(
                name, node.host, node.backend, state, 10_000 + seq % 50_000, node.endpoint,
                f"upd {seq}")))
            seq += 1
            updates += 1
        count = int(line_credit)
        if count:
            line_credit -= count
            batch = [f"L{line_seq + i} {PAYLOAD}" for i in range(count)]
            line_seq += count
            REDRAWS.pending_logs[line_seq - 1] = time.perf_counter()
            app.main.post_message(MainScreen.LogLines(selected, batch))
            lines += count
        COST.feed += time.process_time() - work_started
        next_tick += TICK
        await asyncio.sleep(max(0.0, next_tick - now))
    return updates, lines


async def scenario(name: str, config: ClusterConfig, window: float, nodes_per_s: float,
                   lines_per_s: float) -> Result:
    app = make_app(config, live=False, log_lines=LOG_LINES)
    async with app.run_test(size=SIZE) as pilot:
        for status in app.cluster.nodes.values():  # every row known before the clock starts
            app.main.post_message(MainScreen.NodeUpdated(status))
        await pilot.pause(1.0)
        await feed(app, config, 2.0, nodes_per_s, lines_per_s)  # warm up: buffers fill
        await pilot.pause(0.2)
        REDRAWS.pending_nodes.clear()
        REDRAWS.pending_logs.clear()
        REDRAWS.node_ms.clear()
        REDRAWS.log_ms.clear()
        COST.feed = COST.probe = 0.0
        process = psutil.Process()
        cpu_before = process.cpu_times()
        wall_before = time.perf_counter()
        updates, lines = await feed(app, config, window, nodes_per_s, lines_per_s)
        await pilot.pause(0.2)
        wall = time.perf_counter() - wall_before
        cpu_after = process.cpu_times()
        used = cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system
        cpu = used / wall
        net = (used - COST.feed - COST.probe) / wall
        pane = app.main.query_one(LogPane)
        assert lines == 0 or pane.line_count == LOG_LINES, pane.line_count
        rss = process.memory_info().rss / 2**20
    return Result(name, cpu, net, updates / window, lines / window, list(REDRAWS.node_ms),
                  list(REDRAWS.log_ms), rss)


async def memory(config: ClusterConfig) -> list[tuple[str, int, float]]:
    """RSS as lines pour in as fast as the pane takes them."""
    app = make_app(config, live=False, log_lines=LOG_LINES)
    marks = [("buffer full (5,000 lines)", LOG_LINES),
             ("10x the buffer", 10 * LOG_LINES),
             ("1 minute at 5,000/s", 60 * LOG_RATE),
             ("10 minutes at 5,000/s", 600 * LOG_RATE)]
    found: list[tuple[str, int, float]] = []
    process = psutil.Process()
    async with app.run_test(size=SIZE) as pilot:
        for status in app.cluster.nodes.values():
            app.main.post_message(MainScreen.NodeUpdated(status))
        await pilot.pause(0.5)
        selected = config.nodes[0].name
        pushed = 0
        batch_size = 500
        for label, target in marks:
            while pushed < target:
                app.main.post_message(MainScreen.LogLines(
                    selected, [f"L{pushed + i} {PAYLOAD}" for i in range(batch_size)]))
                pushed += batch_size
                if pushed % (batch_size * 20) == 0:
                    await pilot.pause()  # the pane takes what was posted: no queue grows
            await pilot.pause(0.3)
            gc.collect()
            found.append((label, pushed, process.memory_info().rss / 2**20))
        assert app.main.query_one(LogPane).line_count == LOG_LINES
    return found


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def report(results: list[Result], mem: list[tuple[str, int, float]]) -> str:
    base = results[0].net
    rows = [("scenario", "updates/s", "lines/s", "CPU process", "CPU dashboard", "x idle",
             "table redraw ms p50/p95/max (n)", "log redraw ms p50/p95/max (n)", "RSS MB")]
    for r in results:
        def spread(ms: list[float]) -> str:
            if not ms:
                return "-"
            return (f"{statistics.median(ms):.0f}/{percentile(ms, 0.95):.0f}/{max(ms):.0f} "
                    f"({len(ms)})")

        rows.append((r.name, f"{r.node_rate:.0f}", f"{r.log_rate:.0f}", f"{r.cpu:.1%}",
                     f"{r.net:.1%}", f"{r.net / base:.1f}x" if base else "-", spread(r.node_ms),
                     spread(r.log_ms), f"{r.rss_mb:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    first = mem[0][2]
    lines.append("| log lines pushed | RSS MB | x buffer full |")
    lines.append("|---|---|---|")
    for label, pushed, rss in mem:
        lines.append(f"| {label}: {pushed:,} | {rss:.1f} | {rss / first:.2f}x |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=15.0, help="seconds per scenario")
    parser.add_argument("--sizes", default="64,256", help="node counts (64,256)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        configs = {n: synthetic_config(workdir, n) for n in sizes}
        results = [await scenario(f"idle, {sizes[0]} nodes (baseline)", configs[sizes[0]],
                                  args.window, 0, 0)]
        for n in sizes:
            results.append(await scenario(f"{n} nodes, no log lines", configs[n], args.window,
                                          n, 0))
            results.append(await scenario(f"{n} nodes + {LOG_RATE:,} lines/s", configs[n],
                                          args.window, n, LOG_RATE))
        mem = await memory(configs[sizes[0]])
    print(report(results, mem))
    target = next((r for r in results if r.name.startswith(f"{sizes[0]} nodes +")), None)
    if target is not None:
        redraw = max(percentile(target.node_ms, 0.95), percentile(target.log_ms, 0.95))
        growth = mem[-1][2] - mem[0][2]
        print(f"\ntargets at {sizes[0]} nodes: CPU {target.net:.1%} of one core for the "
              f"dashboard ({target.cpu:.1%} with the feed) (< 10%), redraw p95 "
              f"{redraw:.0f} ms (< 100 ms), RSS growth after buffers filled {growth:+.1f} MB "
              "(flat)")


if __name__ == "__main__":
    asyncio.run(main())
