"""What `rpc_bind = "loopback"` (workers on the node's 127.0.0.1, coordinator through SSH
tunnels) costs in generation speed against workers reached directly, on loopback sshd nodes,
measured in one run.

    .venv/bin/python bench/tunnel_cost.py [--nodes 2] [--tokens 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import operations
from core.cluster import Cluster  # noqa: E402
from core.config import load_config  # noqa: E402
from core.demo_model import write_demo_model  # noqa: E402
from tests.cluster_files import free_port, ssh_cluster_file  # noqa: E402
from tests.sshd_cluster import SshdCluster  # noqa: E402


async def tokens_per_second(config_path: Path, tokens: int, repeat: int) -> float:
    cluster = Cluster(load_config(config_path))
    try:
        await operations.up(cluster, force=True)
        rates = []
        async with httpx.AsyncClient(timeout=300) as client:
            for _ in range(repeat + 1):
                reply = await client.post(
                    f"{cluster.coordinator.url}/v1/completions",
                    json={"prompt": "hello world", "max_tokens": tokens, "temperature": 0,
                          "ignore_eos": True})
                reply.raise_for_status()
                rates.append(float(reply.json()["timings"]["predicted_per_second"]))
        return statistics.median(rates[1:])  # the first request warms up
    finally:
        await cluster.down()
        await cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="torbiz-bench-") as tmp:
        root = Path(tmp)
        model = write_demo_model(root / "m.gguf", n_layer=8, n_embd=512, n_head=8, n_head_kv=4,
                                 n_ff=1536, n_vocab=2048)
        sshd = SshdCluster(root / "sshd", args.nodes, first_octet=31)
        sshd.start()
        try:
            results = {}
            for mode in ("direct", "loopback"):
                work = root / mode
                work.mkdir()
                overrides = {n.name: {"rpc_port": free_port(), "rpc_bind": (
                    "loopback" if mode == "loopback" else "auto")} for n in sshd.nodes}
                cfg = ssh_cluster_file(work, sshd, model, node_overrides=overrides)
                results[mode] = asyncio.run(tokens_per_second(cfg, args.tokens, args.repeat))
        finally:
            sshd.stop()
    direct, tunnel = results["direct"], results["loopback"]
    print(f"{'workers reached':<28}  {'gen tok/s':>9}  {'vs direct':>9}")
    print(f"{'directly (rpc_bind=auto)':<28}  {direct:>9.1f}  {1.0:>8.2f}x")
    print(f"{'SSH tunnel (rpc_bind=loopback)':<28}  {tunnel:>9.1f}  {tunnel / direct:>8.2f}x")
    print(f"\n{args.nodes} workers on loopback sshd nodes, {args.tokens} tokens, median of "
          f"{args.repeat} requests after a warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
