"""The `torbiz-tui` entry: no subcommand opens the dashboard; subcommands run the core headless."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import core
from core import operations
from core.cluster import Cluster
from core.config import ClusterConfig, ConfigError, load_config
from core.log_lines import Repeats
from core.operations import SMOKE_PROMPT, OperationError
from core.status import NodeState
from tui.cache_cli import add_cache_parser, run_cache
from tui.cli_calibrate import add_calibrate_parser, run_calibrate
from tui.cli_format import format_doctor, format_status, print_event, print_problems
from tui.text import sanitize

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


async def _doctor(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        report = await operations.doctor(cluster)
    finally:
        await cluster.close()
    print(json.dumps(report.to_json(), indent=2) if as_json else format_doctor(report))
    return 1 if report.failed else 0


async def _plan(config: ClusterConfig, as_json: bool) -> int:
    cluster = Cluster(config)
    try:
        planned = await operations.plan_preview(cluster)
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
    print(json.dumps(planned.json, indent=2) if as_json else planned.text)
    return 0


async def _up(config: ClusterConfig, force: bool) -> int:
    cluster = Cluster(config)
    cluster.subscribe(print_event)
    try:
        result = await operations.up(cluster, force=force)
        if result.plan is not None:
            print(result.plan.text, file=sys.stderr, flush=True)
        where = (result.status.coordinator.url if cluster.capabilities.has_coordinator
                 else result.plan.summary if result.plan else "")
        print(f"cluster {config.name} is up: {where}")
        return 0
    except OperationError as exc:
        print_problems(exc.problems)
        if exc.started_nothing:
            print("preflight failed: nothing was started (`up --force` skips it)"
                  if exc.stage == "preflight" else
                  "nothing was started" + ("" if cluster.capabilities.node_start_needs_plan
                                           else " (`up --force` lets llama.cpp split by the "
                                           "free memory workers report)"), file=sys.stderr)
            return 1
        running = operations.running_workers(cluster)
        if running:
            label = cluster.capabilities.worker_label
            print(f"{label}s still running: {', '.join(running)} "
                  "(`torbiz-tui down` stops them)", file=sys.stderr)
        return 1
    finally:
        await cluster.close()


async def _down(config: ClusterConfig) -> int:
    cluster = Cluster(config)
    cluster.subscribe(print_event)
    try:
        await operations.down(cluster)
        print(f"cluster {config.name} is down: nothing left running")
        return 0
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()


async def _rebalance(config: ClusterConfig) -> int:
    cluster = Cluster(config)
    cluster.subscribe(print_event)
    try:
        result = await operations.rebalance(cluster)
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
    print(f"rebalanced: coordinator {result.coordinator.state} at {result.coordinator.url}")
    return 0


async def _generate(config: ClusterConfig, prompt: str, tokens: int) -> int:
    cluster = Cluster(config)
    try:
        result = await operations.generate(cluster, prompt, tokens)
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
    print(sanitize(result.text))
    print(f"{result.tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} "
          "tokens/s", file=sys.stderr)
    return 0


async def _status(config: ClusterConfig, as_json: bool) -> int:
    from core.supervision.recovery_record import format_recovery

    cluster = Cluster(config)
    try:
        report = await operations.status(cluster, detail=True)
    finally:
        await cluster.close()
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_status(report.status))
        if report.recovery is not None:
            print(f"last recovery: {sanitize(format_recovery(report.recovery))}")
    return 0 if report.healthy else 3


async def _watch(config: ClusterConfig, interval: float, recover: bool) -> int:
    """Print every fault the supervisor notices, and every recovery, one line each, until
    interrupted."""
    from core.supervision.recovery_record import RecoveryResult, format_recovery
    from core.supervision.supervisor import Detection, Supervisor

    cluster = Cluster(config)
    supervisor = Supervisor(cluster, interval=interval, recover=recover and config.recover)

    def report(item: Detection | RecoveryResult) -> None:
        if isinstance(item, RecoveryResult):
            print(f"recovery: {sanitize(format_recovery(item.to_json()))}", flush=True)
        else:
            print(f"{item.part}: {item.state}: {sanitize(item.reason)}", flush=True)

    try:
        first = await cluster.status()
        print(f"watching cluster {config.name}: "
              f"{sum(n.state == NodeState.READY for n in first.nodes)}/{len(first.nodes)} "
              f"workers ready, coordinator {first.coordinator.state}; recovery "
              f"{'on' if supervisor.recoverer else 'off'}", flush=True)
        await supervisor.run(report)
        return 0
    finally:
        await cluster.close()


async def _logs(config: ClusterConfig, node: str, follow: bool, lines: int,
                raw: bool = False) -> int:
    show = (lambda line: line) if raw else sanitize  # --raw: the bytes as logged, for pipes
    cluster = Cluster(config)
    try:
        if follow:
            repeats = Repeats()  # a run of one line prints once, then `line (xN)` as it ends
            try:
                async for line in operations.follow_log(cluster, node, lines, raw=raw):
                    if repeats.feed(show(line)) > 1:
                        continue
                    summary = repeats.ended()
                    if summary is not None:
                        print(summary, flush=True)
                    print(show(line), flush=True)
            finally:
                pending = repeats.pending()
                if pending is not None:
                    print(pending, flush=True)
        else:
            tail = await operations.log_tail(cluster, node, lines, raw=raw)
            print("\n".join(show(line) for line in tail))
        return 0
    except OperationError as exc:
        print_problems(exc.problems)
        return 2
    finally:
        await cluster.close()


async def _provision(config: ClusterConfig, name: str, petals: bool) -> int:
    if not petals:
        print("error: say what to provision: --petals (the only environment so far)",
              file=sys.stderr)
        return 2
    config.node(name)
    cluster = Cluster(config)
    try:
        venv, info = await operations.provision_petals(
            cluster, name, lambda line: print(sanitize(line), flush=True))
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
    print(f"{name}: Petals environment ready in {venv}: {info}")
    return 0


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
    sub.add_parser("rebalance", help="plan again over every node (one back after a fault "
                                     "included) and restart the coordinator over it")
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
    p.add_argument("--raw", action="store_true", help="print the log's lines as they are, "
                   "escape sequences included (for pipes and files, never a terminal)")
    p = sub.add_parser("web", help="serve the dashboard to a browser on 127.0.0.1 "
                       "(textual-serve; one dashboard per tab)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (8765)")
    p = sub.add_parser("metrics", help="serve torbiz's figures (node state, RTT, tokens/s, "
                       "blocks, recoveries) as Prometheus text on /metrics")
    p.add_argument("--port", type=int, default=9464, help="port (9464)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--interval", type=float, default=5.0,
                   help="seconds between status rounds (5)")
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
    add_cache_parser(sub)
    add_calibrate_parser(sub)
    p = sub.add_parser("make-demo-model", help="write the tiny random-weight demo GGUF")
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    for name in ("up", "down", "rebalance", "status", "logs", "watch", "doctor", "plan", "web",
                 "petals-generate", "generate", "provision"):
        sub.choices[name].add_argument("-c", "--config", dest="sub_config",
                                       help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_arg = getattr(args, "sub_config", None) or args.config
    try:
        if args.command == "build-llama":
            try:
                bin_dir = operations.build_llama(portable=args.portable, progress=print)
            except OperationError as exc:
                print_problems(exc.problems)
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
            return asyncio.run(_provision(config, args.node, args.petals))
        if args.command in ("generate", "petals-generate"):
            return asyncio.run(_generate(config, args.prompt, args.new_tokens))
        if args.command == "up":
            return asyncio.run(_up(config, args.force))
        if args.command == "down":
            return asyncio.run(_down(config))
        if args.command == "rebalance":
            return asyncio.run(_rebalance(config))
        if args.command == "plan":
            return asyncio.run(_plan(config, args.json))
        if args.command == "calibrate":
            return asyncio.run(run_calibrate(config, args))
        if args.command == "cache":
            return asyncio.run(run_cache(config, args))
        if args.command == "doctor":
            return asyncio.run(_doctor(config, args.json))
        if args.command == "status":
            return asyncio.run(_status(config, args.json))
        if args.command == "watch":
            return asyncio.run(_watch(config, args.interval, not args.no_recover))
        if args.command == "logs":
            return asyncio.run(_logs(config, args.node, args.follow, args.lines, args.raw))
        if args.command == "metrics":
            from tui.cli_metrics import serve_metrics

            return asyncio.run(serve_metrics(config, args.host, args.port, args.interval))
        if args.command == "web":
            from tui.web import serve_dashboard

            path, _ = resolve_config_path(config_arg)
            print(f"serving the dashboard of cluster {config.name} on 127.0.0.1 port {args.port} "
                  "(Ctrl-C stops the server; the cluster keeps running)", file=sys.stderr)
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
