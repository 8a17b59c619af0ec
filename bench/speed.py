"""Predicted vs measured tokens/s (generation and prompt processing) for several plans, same
run, rotated order (as root).

Three sshd nodes, each in network + PID namespaces of its own (tests/netns_nodes.py, fenced by
an unreachable route); node3 ("the slow node") is reached through tests/latency_relay.py adding
--delay-ms each way on this machine (its worker binds its namespace's address; the coordinator
connects to the relay on 127.0.0.1), and it has the most free memory: node1 and node2 are
capped (max_memory_gb) so that together they hold the model but neither alone. Plans: pack
(memory only: the fewest nodes, the roomiest: node3 alone), spread (every node), fastest (by
calibration). First `calibrate`, then per round and plan (the order rotated every round): the
prediction `plan` prints, `up`, then `generate` (the calibration's prompt, --tokens tokens):
llama-server's own timings, median of --runs after a warm-up. Targets: predicted/measured
within 0.75-1.25 for every plan; fastest >= 1.5x pack (generation).

Every node shares this machine's 2 cores here (a real cluster has a CPU per node): the model
(core/planning/perf.py) assumes the nodes compute one after the other, which is what
llama.cpp's pipeline does for one request's decode, so each busy worker has a core to itself
except for other work on the machine; calibration times every node on the same shared CPU the
bench runs on. The coordinator's llama-server runs with 1 thread (as the README advises for a
busy 2-core coordinator: two threads fight the workers for the cores)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
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
from core.engines.llama_rpc.calibrate import CAL_PROMPT  # noqa: E402
from tests.cluster_files import free_port, ssh_cluster_file  # noqa: E402
from tests.latency_relay import ThreadedRelay  # noqa: E402
from tests.netns_nodes import NamespacedNodes  # noqa: E402

POLICIES = ("pack", "spread", "fastest")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def cluster_file(workdir: Path, nodes: NamespacedNodes, model: Path, policy: str,
                 ports: dict[str, int], cap_gb: float) -> Path:
    d = workdir / policy
    d.mkdir(exist_ok=True)
    slow = nodes.names[-1]
    overrides: dict[str, dict[str, object]] = {
        name: {"rpc_port": ports[name], "max_memory_gb": cap_gb} for name in nodes.names[:-1]}
    overrides[slow] = {"rpc_port": ports[slow], "rpc_bind": nodes.hosts[-1],
                       "rpc_host": "127.0.0.1"}
    path = ssh_cluster_file(d, nodes, model, name="speed", node_overrides=overrides)
    text = path.read_text().replace('policy = "spread"', f'policy = "{policy}"')
    text = text.replace(f'state_dir = "{d / "state"}"', f'state_dir = "{workdir / "state"}"')
    text = text.replace("[coordinator]\n", "[coordinator]\nthreads = 1\n")
    path.write_text(text)
    return path


class Measured:
    def __init__(self) -> None:
        self.predicted: list[float] = []
        self.predicted_pp: list[float] = []
        self.rates: list[float] = []
        self.pp_rates: list[float] = []
        self.summary = ""


async def measure(path: Path, runs: int, tokens: int, into: Measured) -> str:
    cluster = Cluster(load_config(path))
    try:
        view = await operations.plan_preview(cluster)
        speed = view.json.get("speed") or {}
        into.summary = view.summary.split(": ", 1)[-1]
        if not into.predicted:  # what `plan` says of it, once
            lines = view.text.splitlines()
            start = next((i for i, ln in enumerate(lines) if ln.startswith("speed:")), len(lines))
            shown = lines[start:start + 1] + list(itertools.takewhile(
                lambda ln: ln.startswith("  "), lines[start + 1:]))
            notes = [ln for ln in lines if "left out" in ln or "kept," in ln]
            print("\n".join([*notes, *shown]), flush=True)
        into.predicted.append(float(speed.get("tokens_per_s", 0.0)))
        into.predicted_pp.append(float((speed.get("prompt") or {}).get("tokens_per_s", 0.0)))
        await operations.up(cluster)
        done = [await operations.generate(cluster, prompt=CAL_PROMPT, tokens=tokens)
                for _ in range(runs + 1)][1:]
        into.rates.extend(d.tokens_per_s for d in done)
        into.pp_rates.extend(d.prompt_tokens_per_s for d in done)
        return (f"predicted {into.predicted[-1]:.1f} gen / {into.predicted_pp[-1]:.0f} pp, "
                f"measured {', '.join(f'{d.tokens_per_s:.1f}' for d in done)} gen / "
                f"{', '.join(f'{d.prompt_tokens_per_s:.0f}' for d in done)} pp tok/s "
                f"({done[0].prompt_tokens}-token prompt)")
    finally:
        await operations.down(cluster)
        await cluster.close()


async def calibrate(path: Path) -> None:
    cluster = Cluster(load_config(path))
    try:
        for line in await operations.calibrate(cluster, force=True):
            print("calibrate:", line, flush=True)
        await operations.down(cluster)
    finally:
        await cluster.close()
    print(f"calibrated; {load()}", flush=True)


def table(results: dict[str, Measured]) -> dict[str, float]:
    print("| plan | nodes | predicted gen tok/s | measured gen tok/s (median; min-max) | "
          "predicted/measured | predicted pp tok/s | measured pp tok/s (median; min-max) | "
          "predicted/measured |")
    print("|---|---|---|---|---|---|---|---|")
    medians = {}
    for policy, found in results.items():
        gen, pp = statistics.median(found.rates), statistics.median(found.pp_rates)
        pred, pred_pp = statistics.median(found.predicted), statistics.median(found.predicted_pp)
        medians[policy] = gen
        print(f"| {policy} | {found.summary} | {pred:.1f} | {gen:.1f} ({min(found.rates):.1f}-"
              f"{max(found.rates):.1f}) | {pred / gen:.2f} | {pred_pp:.0f} | {pp:.0f} "
              f"({min(found.pp_rates):.0f}-{max(found.pp_rates):.0f}) | {pred_pp / pp:.2f} |")
        medians[policy + " pp"] = pp
    return medians


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="torbiz-speed-"))
    model = write_demo_model(workdir / "m.gguf", seed=5, n_layer=8, n_embd=1024, n_head=8,
                             n_head_kv=8, n_ff=4096, n_vocab=2048)
    print(f"model: {model.stat().st_size / 2**20:.0f} MiB, 8 blocks; {load()}", flush=True)
    nodes = NamespacedNodes(workdir / "nodes", 3)
    nodes.start()
    ports = {name: free_port() for name in nodes.names}
    slow = nodes.names[-1]
    relay = ThreadedRelay("127.0.0.1", (nodes.hosts[-1], ports[slow]),
                          delay_ms=args.delay_ms, listen_port=ports[slow]).start()
    try:
        files = {p: cluster_file(workdir, nodes, model, p, ports, args.cap_gb) for p in POLICIES}
        results = {p: Measured() for p in POLICIES}
        for round_ in range(args.rounds):
            await calibrate(files["pack"])
            order = POLICIES[round_ % 3:] + POLICIES[:round_ % 3]
            for policy in order:
                line = await measure(files[policy], args.runs, args.tokens, results[policy])
                print(f"round {round_ + 1} {policy}: {line}; {load()}", flush=True)
        print()
        medians = table(results)
        print(f"\nfastest / pack (memory only): {medians['fastest'] / medians['pack']:.2f}x "
              f"generation, {medians['fastest pp'] / medians['pack pp']:.2f}x prompt; "
              f"{load()}")
    finally:
        relay.stop()
        nodes.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="added each way to the slow node's link (10: a 20 ms round trip)")
    parser.add_argument("--cap-gb", type=float, default=0.18)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
