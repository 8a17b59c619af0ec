"""Predicted vs measured tokens/s for several plans, same run, rotated order (as root).

Three sshd nodes, each in network + PID namespaces of its own (tests/netns_nodes.py); node3
("the slow node") is reached through tests/latency_relay.py adding --delay-ms each way on this
machine (its worker binds its namespace's address; the coordinator connects to the relay on
127.0.0.1), and it has the most free memory: node1 and node2 are capped (max_memory_gb) so
that together they hold the model but neither alone. Plans: pack (memory only: the fewest
nodes, the roomiest: node3 alone), spread (every node), fastest (by calibration). For each:
the prediction `plan` prints, then `generate` tokens/s (llama-server's own timing), median of
--runs, over --rounds rotated rounds. Targets: |predicted/measured - 1| <= 25%; fastest >= 1.5x
pack. 2 shared cores: the spread of the runs is printed."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import operations  # noqa: E402
from core.cluster import Cluster  # noqa: E402
from core.config import load_config  # noqa: E402
from core.demo_model import write_demo_model  # noqa: E402
from tests.cluster_files import free_port, ssh_cluster_file  # noqa: E402
from tests.latency_relay import LatencyRelay  # noqa: E402
from tests.netns_nodes import NamespacedNodes  # noqa: E402

POLICIES = ("pack", "spread", "fastest")


def cluster_file(workdir: Path, nodes: NamespacedNodes, model: Path, policy: str,
                 ports: dict[str, int], cap_gb: float) -> Path:
    d = workdir / policy
    d.mkdir(exist_ok=True)
    slow = nodes.names[-1]
    overrides = {name: {"rpc_port": ports[name], "max_memory_gb": cap_gb}
                 for name in nodes.names[:-1]}
    overrides[slow] = {"rpc_port": ports[slow], "rpc_bind": nodes.hosts[-1],
                       "rpc_host": "127.0.0.1"}
    path = ssh_cluster_file(d, nodes, model, name="speed", node_overrides=overrides)
    text = path.read_text().replace('policy = "spread"', f'policy = "{policy}"')
    text = text.replace(f'state_dir = "{d / "state"}"', f'state_dir = "{workdir / "state"}"')
    path.write_text(text)
    return path


async def measure(path: Path, runs: int, tokens: int) -> tuple[float, list[float], str]:
    cluster = Cluster(load_config(path))
    try:
        view = await operations.plan_preview(cluster)
        speed = view.json.get("speed") or {}
        predicted = float(speed.get("tokens_per_s", 0.0))
        await operations.up(cluster)
        rates = []
        for _ in range(runs + 1):
            done = await operations.generate(cluster, tokens=tokens)
            rates.append(done.tokens / done.seconds)
        return predicted, rates[1:], view.summary
    finally:
        await operations.down(cluster)
        await cluster.close()


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="torbiz-speed-"))
    model = write_demo_model(workdir / "m.gguf", seed=5, n_layer=8, n_embd=1024, n_head=8,
                             n_head_kv=8, n_ff=4096, n_vocab=2048)
    print(f"model: {model.stat().st_size / 2**20:.0f} MiB, 8 blocks", flush=True)
    nodes = NamespacedNodes(workdir / "nodes", 3)
    nodes.start()
    ports = {name: free_port() for name in nodes.names}
    relay = LatencyRelay(nodes.hosts[-1], ports[nodes.names[-1]], delay_s=args.delay_ms / 1000,
                         listen_port=ports[nodes.names[-1]])
    await relay.start()
    try:
        files = {p: cluster_file(workdir, nodes, model, p, ports, args.cap_gb) for p in POLICIES}
        cluster = Cluster(load_config(files["pack"]))
        try:
            for line in await operations.calibrate(cluster, progress=print):
                print("calibrate:", line, flush=True)
            await operations.down(cluster)
        finally:
            await cluster.close()
        results: dict[str, tuple[list[float], list[float], str]] = {
            p: ([], [], "") for p in POLICIES}
        for round_ in range(args.rounds):
            order = POLICIES[round_ % 3:] + POLICIES[:round_ % 3]
            for policy in order:
                predicted, rates, summary = await measure(files[policy], args.runs,
                                                          args.tokens)
                results[policy][0].append(predicted)
                results[policy][1].extend(rates)
                results[policy] = (results[policy][0], results[policy][1], summary)
                print(f"round {round_ + 1} {policy}: predicted {predicted:.1f}, measured "
                      f"{', '.join(f'{r:.1f}' for r in rates)} tok/s", flush=True)
        print()
        print("| plan | nodes | predicted tok/s | measured tok/s (median; min-max) | "
              "predicted/measured |")
        print("|---|---|---|---|---|")
        medians = {}
        for policy in POLICIES:
            predicted, rates, summary = results[policy]
            medians[policy] = statistics.median(rates)
            pred = statistics.median(predicted)
            print(f"| {policy} | {summary.split(': ', 1)[-1]} | {pred:.1f} | "
                  f"{medians[policy]:.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
                  f"{pred / medians[policy]:.2f} |")
        print(f"\nfastest / pack (memory only): {medians['fastest'] / medians['pack']:.2f}x")
    finally:
        await relay.stop()
        nodes.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="added each way to the slow node's link (10: a 20 ms round trip)")
    parser.add_argument("--cap-gb", type=float, default=0.18)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
