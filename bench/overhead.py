"""What torbiz-tui costs in generation speed: tokens/s through a cluster started by
`torbiz-tui up` against the same binaries and model started by hand with the same flags,
measured in one run, alternating, as a ratio. Target: >= 0.97.

The cluster: local-transport workers on 127.0.0.1 (`transport = "local"`, policy spread, so
every worker holds blocks and every token crosses every RPC hop) and a ~300 MB random-weight
llama (bench/harness.py). `torbiz-tui up` starts it; the exact argv of each of its processes
is read from /proc/<pid>/cmdline and started again by hand (plain subprocesses in their own
process groups: no setsid/stdbuf/pidfiles; the same LLAMA_CACHE), only the ports changed.
Greedy completions of --tokens tokens alternate between the running clusters (A B, B A, ...);
tokens/s is llama-server's own `timings.predicted_per_second`.

Each of --repeat rounds starts everything afresh, in an order rotated every round. Measured
here: of several identical clusters running at once, the one started last is faster, by 5 to
50 %, for as long as it runs (three identical by-hand clusters, every rotation; not a
function of the measuring order; cause unknown). So the start order is balanced over the
rounds (--repeat a multiple of the number of setups), and the verdict is the geometric mean
of the per-round ratios. A control, a second by-hand copy, shows what two identical setups
give in the same run: its ratio is the resolution of this measurement on this machine.

    .venv/bin/python bench/overhead.py [--repeat 6] [--requests 6] [--tokens 32] [--nodes 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    ProcessGroups,
    TorbizCluster,
    alternate,
    cmdline,
    free_port,
    median,
    quartiles,
    stop_on_signals,
    wait_healthy,
    wait_port,
    write_model,
)

TARGET = 0.97
geometric_mean = statistics.geometric_mean
TORBIZ, HAND, CONTROL = "torbiz-tui up", "by hand", "by hand, again"
SHORT = {TORBIZ: "T", HAND: "H", CONTROL: "A"}


@dataclass(frozen=True)
class Argvs:
    """What `torbiz-tui up` ran: each worker's argv in --rpc order, then the coordinator's."""

    workers: tuple[tuple[str, ...], ...]
    coordinator: tuple[str, ...]

    def without_ports(self) -> Argvs:
        return Argvs(tuple(_replace_value(w, "-p", "PORT") for w in self.workers),
                     _replace_value(_replace_value(self.coordinator, "--port", "PORT"),
                                    "--rpc", "ENDPOINTS"))


def _replace_value(argv: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    index = argv.index(flag)
    return (*argv[:index + 1], value, *argv[index + 2:])


def read_argvs(cluster: TorbizCluster) -> Argvs:
    status = cluster.status()
    by_endpoint = {n["endpoint"]: tuple(cmdline(int(n["pid"]))) for n in status["nodes"]
                   if n["pid"] is not None}
    coordinator = tuple(cmdline(int(status["coordinator"]["pid"])))
    rpc = coordinator[coordinator.index("--rpc") + 1].split(",")
    return Argvs(tuple(by_endpoint[ep] for ep in rpc), coordinator)


def start_by_hand(argvs: Argvs, hand: ProcessGroups, work: Path) -> str:
    """The same argv as torbiz-tui's, on ports of its own; returns the coordinator's URL."""
    endpoints = []
    for index, argv in enumerate(argvs.workers):
        port = free_port()
        proc = hand.start(_replace_value(argv, "-p", str(port)), work / f"w{index}.log",
                          work / f"w{index}", env={"LLAMA_CACHE": "cache"})  # as torbiz-tui
        wait_port(port, proc)
        endpoints.append(f"127.0.0.1:{port}")
    port = free_port()
    argv = _replace_value(_replace_value(argvs.coordinator, "--port", str(port)),
                          "--rpc", ",".join(endpoints))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, hand.start(argv, work / "coordinator.log", work / "coordinator"))
    return url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=6, help="fresh bring-ups (default 6)")
    parser.add_argument("--requests", type=int, default=6,
                        help="measured requests per setup and bring-up (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="requests each before measuring")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--nodes", type=int, default=2, help="local workers (default 2)")
    parser.add_argument("--layers", type=int, default=12, help="model blocks (~23 MiB each)")
    parser.add_argument("--threads", type=int, help="worker threads (default: rpc-server's)")
    parser.add_argument("--no-control", action="store_true", help="skip the second by-hand copy")
    args = parser.parse_args()
    stop_on_signals()
    template: Argvs | None = None
    rounds: list[tuple[str, dict[str, list[float]]]] = []
    with tempfile.TemporaryDirectory(prefix="torbiz-bench-overhead-") as tmp:
        root = Path(tmp)
        model = write_model(root / "m.gguf", args.layers)
        extra = {"threads": args.threads} if args.threads else {}
        setups = [TORBIZ, HAND] + ([] if args.no_control else [CONTROL])
        for attempt in range(args.repeat):
            groups = {HAND: ProcessGroups(), CONTROL: ProcessGroups()}
            cluster = TorbizCluster(
                root / f"torbiz{attempt}", f"overhead{attempt}", model,
                [{"name": f"w{i + 1}", **extra} for i in range(args.nodes)],
                {"policy": "spread", "coordinator_layers": False}, context=512)
            shift = attempt % len(setups)  # round 0 starts torbiz-tui first: its argv is read
            order = setups[shift:] + setups[:shift]
            try:
                urls = {}
                for name in order:
                    if name == TORBIZ:
                        cluster.up()
                        argvs = read_argvs(cluster)
                        template = template or argvs
                        if argvs.without_ports() != template.without_ports():
                            raise SystemExit(f"bench: torbiz-tui ran another command line in "
                                             f"round {attempt + 1}: {argvs} vs {template}")
                        urls[TORBIZ] = cluster.url
                    else:
                        assert template is not None
                        urls[name] = start_by_hand(template, groups[name],
                                                   root / f"{SHORT[name]}{attempt}")
                rates = alternate({name: urls[name] for name in setups}, args.tokens,
                                  args.requests, args.warmup)
                rounds.append((" ".join(SHORT[name] for name in order), rates))
                print(f"round {attempt + 1}/{args.repeat}: " + ", ".join(
                    f"{name} {median(values):.1f}" for name, values in rates.items()),
                    file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                print("bench: interrupted, cleaning up", file=sys.stderr)
                return 130
            finally:
                groups[CONTROL].stop()
                groups[HAND].stop()
                cluster.down()
    assert template is not None
    names = [TORBIZ, HAND] + ([] if args.no_control else [CONTROL])
    head = f"{'round':>5}  {'start order':<11}" + "".join(f"  {n:>15}" for n in names)
    head += f"  {'torbiz/hand':>11}" + ("" if args.no_control else f"  {'again/hand':>10}")
    print(head)
    ratios: list[float] = []
    controls: list[float] = []
    for index, (first, rates) in enumerate(rounds):
        med = {name: median(rates[name]) for name in names}
        ratios.append(med[TORBIZ] / med[HAND])
        row = f"{index + 1:>5}  {first:<11}" + "".join(f"  {med[n]:>11.1f} t/s" for n in names)
        row += f"  {ratios[-1]:>10.3f}x"
        if not args.no_control:
            controls.append(med[CONTROL] / med[HAND])
            row += f"  {controls[-1]:>9.3f}x"
        print(row)
    low, high = quartiles(ratios)
    ratio = geometric_mean(ratios)
    print(f"\ntorbiz-tui up / by hand: {ratio:.3f}x (geometric mean of {len(ratios)} rounds; "
          f"median {median(ratios):.3f}, interquartile {low:.3f}-{high:.3f}); target >= "
          f"{TARGET}: {'met' if ratio >= TARGET else 'NOT met'}")
    if controls:
        c_low, c_high = quartiles(controls)
        print(f"control, two identical by-hand clusters: {geometric_mean(controls):.3f}x "
              f"(median {median(controls):.3f}, interquartile {c_low:.3f}-{c_high:.3f}): how "
              "far apart two identical setups land here")
    if len(rounds) % len(setups):
        print(f"(the start order is balanced only when --repeat is a multiple of "
              f"{len(setups)})")
    print("start order: T torbiz-tui up, H by hand, A by hand again (the last one started "
          "tends to run fastest)")
    print(f"\n{args.nodes} local workers (spread, no blocks on the coordinator), "
          f"{args.layers}-block model, {args.tokens} tokens per request; per round and setup "
          f"the median of {args.requests} requests after {args.warmup} warm-ups, alternating "
          "between the setups (order reversed every other request round)")
    print("command lines (the by-hand ones differ only in ports):")
    for index, argv in enumerate(template.workers):
        print(f"  worker {index}: {' '.join(argv)}")
    print(f"  coordinator: {' '.join(template.coordinator)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
