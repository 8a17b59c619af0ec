"""The `torbiz-tui` entry: no subcommand opens the dashboard; subcommands run the core headless."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import core
from core.bringup import NothingStarted, plan_now, preflight_and_plan
from core.cluster import Cluster, ClusterError
from core.config import ClusterConfig, ConfigError, load_config
from core.doctor import DoctorReport, run_doctor
from core.engines.petals.swarm import is_petals_cluster
from core.planning.placement import PlacementError, PlanRefused, format_placement
from core.smoke import SMOKE_PROMPT, SmokeError, smoke_generate
from core.status import READY, ClusterStatus, Event, NodeChanged, Notice

DEMO_CONFIG = Path(core.__file__).resolve().parent / "demo" / "demo.toml"


def resolve_config_path(explicit: str | None) -> tuple[Path, bool]:
    """-c, then $TORBIZ_CONFIG, then ./torbiz.toml, then the built-in demo; (path, is_demo)."""
    if explicit:
        return Path(explicit), False
    env = os.environ.get("TORBIZ_CONFIG")
    if env:
        return Path(env), False
    local = Path("torbiz.toml")
    if local.is_file():
        return local, False
    return DEMO_CONFIG, True


def load_cluster_config(explicit: str | None) -> ClusterConfig:
    path, is_demo = resolve_config_path(explicit)
    config = load_config(path)
    if is_demo or path.resolve() == DEMO_CONFIG:
        from core.demo_model import ensure_demo_model

        assert config.model.gguf is not None
        if not config.model.gguf.exists():
            print(f"writing the demo model to {config.model.gguf} ...", file=sys.stderr)
        ensure_demo_model(config.model.gguf)
    return config


def _print_event(event: Event) -> None:
    if isinstance(event, Notice):
        if event.level == "error":
            return  # the command's own error lines say it once
        prefix = {"error": "error: ", "warning": "warning: "}.get(event.level, "")
        print(f"{prefix}{event.text}", file=sys.stderr, flush=True)
    elif isinstance(event, NodeChanged) and event.status.state == "starting" \
            and event.status.pid is None:
        print(f"{event.status.name}: starting worker on {event.status.endpoint}",
              file=sys.stderr, flush=True)


def format_status(status: ClusterStatus) -> str:
    rows = [("NODE", "HOST", "BACKEND", "STATE", "PID", "ENDPOINT", "ERROR")]
    for n in status.nodes:
        rows.append((n.name, n.host, n.backend, n.state, str(n.pid or "-"), n.endpoint,
                     n.error))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6]
             for r in rows]
    c = status.coordinator
    lines.append("")
    lines.append(f"coordinator: {c.state}  {c.url}  pid {c.pid or '-'}"
                 + (f"  {c.error}" if c.error else ""))
    return "\n".join(line.rstrip() for line in lines)


def format_doctor(report: DoctorReport) -> str:
    marks = {"ok": "ok  ", "warning": "WARN", "failed": "FAIL"}
    lines = [f"{marks[c.level]}  {c.part:<14} {c.name:<8} {c.message}" for c in report.checks]
    failed = len(report.failed)
    lines.append("")
    lines.append("all checks passed" if not failed else
                 f"{failed} check{'s' if failed > 1 else ''} failed: fix them, or "
                 "`up --force` to start anyway")
    return "\n".join(lines)


async def _doctor(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        report = await run_doctor(cluster)
    finally:
        await cluster.close()
    print(json.dumps(report.to_json(), indent=2) if as_json else format_doctor(report))
    return 1 if report.failed else 0


async def _plan(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        placement = await plan_now(cluster)
    except (PlacementError, PlanRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await cluster.close()
    if as_json:
        print(json.dumps({"plan": asdict(placement.plan),
                          "budgets": [asdict(b) for b in placement.budgets],
                          "devices": placement.devices,
                          "spans": placement.plan.rpc_spans()}, indent=2))
    else:
        print(format_placement(placement))
    return 0


async def _with_cluster(config: ClusterConfig, verbose: bool, action: str,
                        force: bool = False) -> int:
    cluster = Cluster(config)
    if verbose:
        cluster.subscribe(_print_event)
    try:
        spans = None
        if action == "up" and not force:
            try:
                placement = await preflight_and_plan(cluster)
            except NothingStarted as exc:
                for problem in exc.problems:
                    print(f"error: {problem}", file=sys.stderr)
                print("preflight failed: nothing was started (`up --force` skips it)"
                      if exc.stage == "preflight" else
                      "nothing was started (`up --force` lets llama.cpp split by the free "
                      "memory workers report)", file=sys.stderr)
                return 1
            assert placement is not None  # Petals clusters go to tui/petals_commands.py
            spans = placement.plan.rpc_spans()
            print(format_placement(placement), file=sys.stderr, flush=True)
        if action == "up":
            status = await cluster.up(spans)
            print(f"cluster {config.name} is up: {status.coordinator.url}")
        elif action == "down":
            await cluster.down()
            print(f"cluster {config.name} is down: nothing left running")
        return 0
    except ClusterError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        running = [n.name for n in cluster.nodes.values() if n.state == READY]
        if action == "up" and running:
            print(f"workers still running: {', '.join(running)} "
                  "(`torbiz-tui down` stops them)", file=sys.stderr)
        return 1
    finally:
        await cluster.close()


async def _generate(config: ClusterConfig, prompt: str, tokens: int) -> int:
    try:
        result = await smoke_generate(config, tokens, prompt)
    except SmokeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.text)
    print(f"{result.tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} "
          "tokens/s", file=sys.stderr)
    return 0


async def _status(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        status = await cluster.status(detail=as_json)
    finally:
        await cluster.close()
    from core.engines.llama_rpc.recovery import format_recovery, last_recovery

    recovery = last_recovery(cluster)
    if as_json:
        print(json.dumps({**status.to_json(), "recovery": recovery}, indent=2))
    else:
        print(format_status(status))
        if recovery is not None:
            print(f"last recovery: {format_recovery(recovery)}")
    healthy = all(n.state == READY for n in status.nodes) and status.coordinator.state == READY
    return 0 if healthy else 3


async def _watch(config: ClusterConfig, interval: float, recover: bool) -> int:
    """Print every fault the supervisor notices, and every recovery, one line each, until
    interrupted."""
    from core.engines.llama_rpc.recovery import RecoveryResult, format_recovery
    from core.supervision.supervisor import Detection, Supervisor

    cluster = Cluster(config)
    supervisor = Supervisor(cluster, interval=interval, recover=recover and config.recover)

    def report(item: Detection | RecoveryResult) -> None:
        if isinstance(item, RecoveryResult):
            print(f"recovery: {format_recovery(item.to_json())}", flush=True)
        else:
            print(f"{item.part}: {item.state}: {item.reason}", flush=True)

    try:
        first = await cluster.status()
        print(f"watching cluster {config.name}: "
              f"{sum(n.state == READY for n in first.nodes)}/{len(first.nodes)} workers ready, "
              f"coordinator {first.coordinator.state}; recovery "
              f"{'on' if supervisor.recoverer else 'off'}", flush=True)
        await supervisor.run(report)
        return 0
    finally:
        await cluster.close()


async def _logs(config: ClusterConfig, node: str, follow: bool, lines: int) -> int:
    cluster = Cluster(config)
    try:
        if node != "coordinator":
            config.node(node)  # a clear error for an unknown name
        if follow:
            source = (cluster.follow_coordinator_log(lines) if node == "coordinator"
                      else cluster.follow_log(node, lines))
            async for line in source:
                print(line, flush=True)
        else:
            from core.engines.llama_rpc.coordinator import coordinator_state_dir, local_transport
            from core.reach import detached

            if node == "coordinator":
                tail = await detached.log_tail(local_transport(),
                                               coordinator_state_dir(config), lines)
            else:
                tail = await detached.log_tail(cluster.transport(node),
                                               cluster.node_state_dir(config.node(node)), lines)
            print("\n".join(tail))
        return 0
    finally:
        await cluster.close()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torbiz-tui",
        description="Control room for LLM clusters: llama.cpp RPC workers over SSH. "
                    "With no command, opens the dashboard.")
    parser.add_argument("-c", "--config", help="cluster file (default: $TORBIZ_CONFIG, "
                        "./torbiz.toml, then the built-in demo cluster)")
    parser.add_argument("--read-only", action="store_true",
                        help="dashboard: hide every action that changes the cluster")
    parser.add_argument("--log-lines", type=_positive_int, default=5_000, metavar="N",
                        help="dashboard: lines kept per log pane (5000)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("up", help="preflight, then every worker in parallel, then the "
                       "coordinator")
    p.add_argument("--force", action="store_true", help="start even if the preflight fails")
    p = sub.add_parser("plan", help="which blocks go where, from the model file and each "
                       "node's measured free memory; starts nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("doctor", help="preflight every node: SSH and host key, worker binary, "
                       "clock, port, bind address; coordinator binary and model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("down", help="stop the coordinator and every worker")
    p = sub.add_parser("status", help="state of every node and the coordinator")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("watch", help="print every fault as it is noticed (dead worker, lost "
                       "SSH, coordinator exit) until interrupted")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between checks (1)")
    p.add_argument("--no-recover", action="store_true", help="only report faults: never "
                   "restart the coordinator (as [cluster] recover = false)")
    p = sub.add_parser("logs", help="a node's worker log (or 'coordinator')")
    p.add_argument("node")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=int, default=100, help="lines of history (100)")
    p = sub.add_parser("web", help="serve the dashboard to a browser on 127.0.0.1 "
                       "(textual-serve; one dashboard per tab)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (8765)")
    p = sub.add_parser("build-llama", help="build rpc-server and llama-server into the cache")
    p.add_argument("--portable", action="store_true",
                   help="no -march=native: binaries that run on other nodes' CPUs")
    p = sub.add_parser("petals-generate", help="generate through the cluster's Petals swarm "
                       "(greedy, Petals' own client) and report tokens/s")
    p.add_argument("prompt")
    p.add_argument("-n", "--new-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens to generate (16)")
    p = sub.add_parser("generate", help="a short generation through the running cluster "
                       "(the coordinator, or the Petals swarm): its text, and tokens/s")
    p.add_argument("prompt", nargs="?", default=SMOKE_PROMPT)
    p.add_argument("-n", "--new-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens to generate (16; EOS is ignored so rates compare)")
    p = sub.add_parser("provision", help="build a node's environment over SSH: --petals "
                       "runs scripts/petals-env.sh there with the hivemind wheel built here")
    p.add_argument("node")
    p.add_argument("--petals", action="store_true", help="the Petals venv (the node's python "
                   "key, default ~/.cache/torbiz/petals-venv)")
    p = sub.add_parser("make-demo-model", help="write the tiny random-weight demo GGUF")
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    for name in ("up", "down", "status", "logs", "watch", "doctor", "plan", "web",
                 "petals-generate", "generate", "provision"):
        sub.choices[name].add_argument("-c", "--config", dest="sub_config",
                                       help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_arg = getattr(args, "sub_config", None) or args.config
    try:
        if args.command == "build-llama":
            from core.engines.llama_rpc.build import LlamaBuildError, build_llama

            try:
                bin_dir = build_llama(portable=args.portable, progress=print)
            except LlamaBuildError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"binaries in {bin_dir}")
            return 0
        if args.command == "make-demo-model":
            from core.demo_model import write_demo_model

            path = write_demo_model(args.path, seed=args.seed)
            print(f"wrote {path}")
            return 0
        config = load_cluster_config(config_arg)
        if args.command == "provision":
            from tui import petals_commands

            return asyncio.run(petals_commands.provision(config, args.node, args.petals))
        if args.command == "generate":
            return asyncio.run(_generate(config, args.prompt, args.new_tokens))
        if args.command == "petals-generate":
            from tui import petals_commands

            return asyncio.run(petals_commands.generate(config, args.prompt, args.new_tokens))
        if args.command in ("up", "plan", "status") and is_petals_cluster(config):
            from tui import petals_commands

            return petals_commands.run(args.command, config, getattr(args, "json", False),
                                       getattr(args, "force", False))
        if args.command in ("up", "down"):
            return asyncio.run(_with_cluster(config, True, args.command,
                                             getattr(args, "force", False)))
        if args.command == "plan":
            return asyncio.run(_plan(config, args.json))
        if args.command == "doctor":
            return asyncio.run(_doctor(config, args.json))
        if args.command == "status":
            return asyncio.run(_status(config, args.json))
        if args.command == "watch":
            return asyncio.run(_watch(config, args.interval, not args.no_recover))
        if args.command == "logs":
            return asyncio.run(_logs(config, args.node, args.follow, args.lines))
        if args.command == "web":
            from tui.web import serve_dashboard

            path, _ = resolve_config_path(config_arg)
            print(f"serving the dashboard of cluster {config.name} on "
                  f"http://127.0.0.1:{args.port} (Ctrl-C stops the server; the cluster keeps "
                  "running)", file=sys.stderr)
            return serve_dashboard(path, config.name, port=args.port,
                                   read_only=args.read_only, log_lines=args.log_lines)
        from tui.app import run_dashboard

        return run_dashboard(config, read_only=args.read_only, log_lines=args.log_lines)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
