"""What planning buys over llama.cpp's own split, on three loopback workers whose budgets differ
(per-node `max_memory_gb`: they share one machine, so every rpc-server reports the same free
RAM and llama.cpp cannot know the budgets). Two scenarios, each measured in one run:

1. budget: a model that fits only when placed by budget (the three budgets hold it, no two
   do). `torbiz-tui up` (the plan, policy pack, `coordinator_layers = false`: the
   coordinator's budget cannot be capped, and here it shares the workers' RAM) against
   `torbiz-tui up --force` (llama.cpp's default split: `-ngl 99`, no `-ts`, default `--fit`,
   all workers). The bytes each worker really received (weights + KV, from llama-server's
   load log, core/load_log.parse_load_log) are compared with its budget: the default split
   over-commits a node, the plan does not.
   Both still run here (the budgets are caps, the RAM is there): their tokens/s too.
2. fewer nodes: a model that fits on one of the three workers, against llama.cpp's default
   split over all three. Target: pack >= 1.2x faster. Two packs: torbiz-tui's defaults
   (`coordinator_layers = true`: the coordinator's own CPU, first in the ranking, takes the
   whole model and no RPC hop is left), and workers only (one worker, one RPC hop).

Every setup's llama-server gets `-t 1` ([coordinator] extra_args; --coordinator-threads):
measured here, llama-server's default (2 threads, OpenMP) ran the 6-block model on its own CPU
at 3-27 tok/s and with -t 1 at 85-156 tok/s, on this 2-core machine under its neighbours' load
(threads that wait for each other while another program holds a core). With all blocks on
workers the coordinator computes almost nothing, so this matters most for the default pack.

Each round starts every setup afresh (a freshly started process on this shared 2-core machine
can run 20 % faster or slower than an identical one for its whole life; see bench/overhead.py),
the order rotated; all setups of a round run at once (own ports, 127.0.0.1 only) and greedy
completions of --tokens tokens alternate between them (A B C, C B A, ...); tokens/s is
llama-server's own `timings.predicted_per_second`; ratios are geometric means of per-round
ratios (with --repeat a multiple of the number of setups, each is started last equally often).
Blocks are about 23 MiB of f16 weights (bench/harness.py).

    .venv/bin/python bench/placement.py [--repeat 6] [--requests 4] [--tokens 32]
                                        [--only budget,fewer] [--coordinator-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    TorbizCluster,
    alternate,
    median,
    stop_on_signals,
    write_model,
)

from core.planning.model_info import read_gguf_info  # noqa: E402
from core.planning.planner import layer_costs  # noqa: E402
from core.supervision.load_log import LoadReport  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
CONTEXT = 512
TARGET = 1.2
# Budgets in blocks (the largest also holds the output head): 2.5 + 4.5 + 6.5 blocks hold
# 12, no two of them do; 6 blocks fit on the largest alone.
BUDGET_BLOCKS = {"small": 2.5, "mid": 4.5, "large": 6.5}


@dataclass
class Setup:
    label: str
    cluster: TorbizCluster
    force: bool = False  # `up --force`: llama.cpp's own split over every worker
    report: LoadReport | None = None


def budgets_for(model: Path) -> dict[str, int]:
    info = read_gguf_info(model)
    block = max(layer_costs(info, CONTEXT))
    return {name: int(blocks * block) + (info.output_bytes if name == "large" else 0)
            for name, blocks in BUDGET_BLOCKS.items()}


def nodes_for(budgets: dict[str, int], threads: int | None) -> list[dict[str, Any]]:
    extra = {"threads": threads} if threads else {}
    return [{"name": name, "max_memory_gb": round(budget / GIB, 9), **extra}
            for name, budget in budgets.items()]


def run_scenario(root: Path, model: Path, setups: list[tuple[str, dict[str, Any], bool]],
                 budgets: dict[str, int], args: argparse.Namespace
                 ) -> tuple[list[list[Setup]], list[dict[str, list[float]]]]:
    """--repeat rounds; each brings every setup up afresh (the order rotated), measures them
    alternating, and takes them all down. Per round: the setups (with their load reports)
    and the rates."""
    rounds: list[list[Setup]] = []
    rates: list[dict[str, list[float]]] = []
    for attempt in range(args.repeat):
        made: list[Setup] = []
        shift = attempt % len(setups)
        try:
            for index, (label, plan, force) in enumerate(setups[shift:] + setups[:shift]):
                cluster = TorbizCluster(
                    root / f"r{attempt}c{index}", f"placement{index}", model,
                    nodes_for(budgets, args.threads), plan, CONTEXT,
                    ["-t", str(args.coordinator_threads)] if args.coordinator_threads else ())
                made.append(Setup(label, cluster, force))
                cluster.up(*(["--force"] if force else []))
                made[-1].report = cluster.load_report()
            made.sort(key=lambda s: [label for label, _, _ in setups].index(s.label))
            rates.append(alternate({s.label: s.cluster.url for s in made}, args.tokens,
                                   args.requests, args.warmup))
            rounds.append(made)
            print(f"round {attempt + 1}/{args.repeat}: " + ", ".join(
                f"{label} {median(values):.1f}" for label, values in rates[-1].items()),
                file=sys.stderr, flush=True)
        finally:
            for setup in reversed(made):
                setup.cluster.down()
    return rounds, rates


def _mib(value: int) -> str:
    return f"{value / MIB:.1f} MiB"


def overcommitted(setup: Setup, budgets: dict[str, int]) -> dict[str, tuple[int | None, int]]:
    """node -> (blocks, bytes of weights + KV) the load log shows it received, for every
    worker of this setup that was given more than its budget."""
    assert setup.report is not None
    found = {}
    for name, budget in budgets.items():
        device = setup.report.device(_endpoint(setup, name))
        if device is not None and device.model_bytes + device.kv_bytes > budget:
            found[name] = (device.layers, device.model_bytes + device.kv_bytes)
    return found


def _endpoint(setup: Setup, name: str) -> str:
    return next(f"127.0.0.1:{n['rpc_port']}" for n in setup.cluster.nodes if n["name"] == name)


def placement_table(setups: list[Setup], budgets: dict[str, int]) -> list[str]:
    """Per node and setup: blocks and bytes (weights + KV) really loaded, against the budget."""
    head = f"{'node':<6}  {'budget':>10}"
    for setup in setups:
        head += f"  | {setup.label[:34]:<34}"
    lines = [head]
    for name, budget in budgets.items():
        row = f"{name:<6}  {_mib(budget):>10}"
        for setup in setups:
            assert setup.report is not None
            device = setup.report.device(_endpoint(setup, name))
            if device is None:
                cell = "not used"
            else:
                used = device.model_bytes + device.kv_bytes
                verdict = "ok" if used <= budget else f"OVER +{_mib(used - budget)}"
                cell = f"{device.layers} blk {_mib(used)} {verdict}"
            row += f"  | {cell:<34}"
        lines.append(row)
    row = f"{'coord.':<6}  {'(no cap)':>10}"
    for setup in setups:
        assert setup.report is not None
        device = setup.report.device("CPU")
        cell = (f"{device.layers} blk {_mib(device.model_bytes + device.kv_bytes)} (CPU)"
                if device else "-")
        row += f"  | {cell:<34}"
    lines.append(row)
    return lines


def rate_lines(labels: list[str], default: str,
               rates: list[dict[str, list[float]]]) -> tuple[list[str], dict[str, float]]:
    """tok/s per setup (median over rounds of each round's median) and the ratio to the
    default split (geometric mean over rounds of the ratio within the round: the start order
    is balanced over the rounds, and the last one started tends to run fastest)."""
    lines = [f"{'setup':<34}  {'tok/s':>7}  {'rounds min-max':>14}  {'vs default':>10}  "
             "per-round ratios"]
    ratios: dict[str, float] = {}
    for label in labels:
        per_round = [median(r[label]) for r in rates]
        pairs = [median(r[label]) / median(r[default]) for r in rates]
        ratios[label] = statistics.geometric_mean(pairs)
        lines.append(f"{label:<34}  {median(per_round):>7.2f}  "
                     f"{min(per_round):>6.1f}-{max(per_round):<7.1f}  {ratios[label]:>9.2f}x  "
                     + " ".join(f"{p:.2f}" for p in pairs))
    return lines, ratios


def scenario_lines(rounds: list[list[Setup]], rates: list[dict[str, list[float]]],
                   budgets: dict[str, int], default: str) -> tuple[list[str], dict[str, Any]]:
    labels = [s.label for s in rounds[0]]
    lines = placement_table(rounds[0], budgets)
    over: dict[str, set[str]] = {label: set() for label in labels}
    for made in rounds:
        for setup in made:
            over[setup.label] |= set(overcommitted(setup, budgets))
    layouts = {label: {tuple(d.layers for d in s.report.devices) for made in rounds
                       for s in made if s.label == label and s.report} for label in labels}
    varied = [label for label, seen in layouts.items() if len(seen) > 1]
    lines.append("(blocks and bytes from round 1's load logs"
                 + (f"; the layout differed between rounds for: {', '.join(varied)})"
                    if varied else "; the same in every round)"))
    lines.append("")
    table, ratios = rate_lines(labels, default, rates)
    lines += table
    return lines, {"over": over, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6,
                        help="fresh bring-ups per scenario (default 6)")
    parser.add_argument("--requests", type=int, default=4,
                        help="measured requests per setup and round (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="requests each before measuring")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--only", default="budget,fewer", help="scenarios to run")
    parser.add_argument("--threads", type=int, help="worker threads (default: rpc-server's)")
    parser.add_argument("--coordinator-threads", type=int, default=1,
                        help="llama-server -t for every setup (default 1; 0: llama.cpp's own "
                             "default, all cores)")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    stop_on_signals()
    out: list[str] = []
    met: list[str] = []
    plan, default = "plan (torbiz-tui up, pack)", "llama.cpp default (up --force)"
    pack, coordinator = "pack, workers only", "pack (defaults: coordinator too)"
    workers_only = {"coordinator_layers": False}
    try:
        with tempfile.TemporaryDirectory(prefix="torbiz-bench-placement-") as tmp:
            root = Path(tmp)
            big = write_model(root / "m12.gguf", 12)
            budgets = budgets_for(big)
            if "budget" in wanted:
                rounds, rates = run_scenario(root / "budget", big, [
                    (plan, workers_only, False), (default, workers_only, True)], budgets, args)
                lines, result = scenario_lines(rounds, rates, budgets, default)
                out += [f"1. budget: 12-block model ({_mib(read_gguf_info(big).total_bytes)} "
                        f"of weights, context {CONTEXT}); worker budgets (max_memory_gb) of "
                        "2.5, 4.5 and 6.5 blocks: no two hold it. Weights + KV each worker "
                        "received, from the load log:", "", *lines, ""]
                plan_ok = not result["over"][plan]
                out.append(f"plan within every budget in every round: "
                           f"{'yes' if plan_ok else 'NO: ' + ', '.join(result['over'][plan])}"
                           f"; llama.cpp's default split over-commits: "
                           f"{', '.join(sorted(result['over'][default])) or 'nothing'}")
                out.append("")
                met.append(f"budget: plan within budgets {'yes' if plan_ok else 'NO'}, default "
                           f"over-commits {'yes' if result['over'][default] else 'NO'}, "
                           f"plan {result['ratios'][plan]:.2f}x the default's tok/s")
            if "fewer" in wanted:
                small = write_model(root / "m6.gguf", 6)
                rounds, rates = run_scenario(root / "fewer", small, [
                    (coordinator, {}, False), (pack, workers_only, False),
                    (default, workers_only, True)], budgets, args)
                lines, result = scenario_lines(rounds, rates, budgets, default)
                out += [f"2. fewer nodes: 6-block model ({_mib(read_gguf_info(small).total_bytes)}"
                        " of weights) that fits on one worker, the same three budgets:", "",
                        *lines, ""]
                for label, what in ((coordinator, "pack with torbiz-tui's defaults (all on "
                                     "the coordinator's CPU)"),
                                    (pack, "pack on 1 worker (coordinator_layers = false)")):
                    ratio = result["ratios"][label]
                    verdict = "met" if ratio >= TARGET else "NOT met"
                    out.append(f"{what} vs llama.cpp's default split over 3 workers: "
                               f"{ratio:.2f}x (target >= {TARGET}x: {verdict})")
                    met.append(f"{label} {ratio:.2f}x the default split ({verdict})")
                out.append("")
    except KeyboardInterrupt:
        print("bench: interrupted, cleaned up", file=sys.stderr)
        return 130
    print("\n".join(out))
    print(f"Each scenario: {args.repeat} rounds, every setup started afresh each round (the "
          f"order rotated), then {args.warmup} warm-ups and {args.requests} measured requests "
          f"of {args.tokens} tokens each, alternating between setups; tok/s is llama-server's "
          "own timings.predicted_per_second. Workers: 3 local rpc-servers on 127.0.0.1 "
          f"(rpc-server's default: 1 thread each here); coordinator: llama-server "
          + (f"-t {args.coordinator_threads}" if args.coordinator_threads else
             "with its default threads") + " in every setup.")
    print("verdict: " + "; ".join(met))
    return 0


if __name__ == "__main__":
    sys.exit(main())
