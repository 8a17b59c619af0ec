"""Wall time of `up` (workers ready and coordinator healthy) for 1, 4 and 8 SSH nodes on
loopback, started in parallel and one after another, as a table with ratios.

Real sshd per node (tests/sshd_cluster.py), real rpc-server and llama-server, the demo model.
Target: 8 nodes in parallel within 1.5x the time of 1 node.

    .venv/bin/python bench/bringup.py [--sizes 1,4,8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.cluster import Cluster  # noqa: E402
from core.config import load_config  # noqa: E402
from core.demo_model import ensure_demo_model  # noqa: E402
from core.reach.transport import make_transport  # noqa: E402
from tests.cluster_files import ssh_cluster_file  # noqa: E402
from tests.sshd_cluster import SshdCluster  # noqa: E402


async def session_floor(config_path: Path) -> float:
    """Seconds for one SSH connection per node plus one trivial command on each, all in
    parallel: the part of `up` that no orchestration can remove on this machine."""
    config = load_config(config_path)
    transports = [make_transport(n) for n in config.nodes]
    try:
        started = time.monotonic()
        await asyncio.gather(*(t.run("true") for t in transports))
        return time.monotonic() - started
    finally:
        await asyncio.gather(*(t.close() for t in transports))


async def bring_up(config_path: Path, parallel: bool) -> tuple[float, float]:
    """(seconds until every worker is ready, seconds until the coordinator is healthy)."""
    cluster = Cluster(load_config(config_path))
    try:
        started = time.monotonic()
        if parallel:
            workers = await cluster.start_workers()
        else:
            workers = [await cluster.start_node(n.name) for n in cluster.config.nodes]
        workers_ready = time.monotonic() - started
        bad = [w for w in workers if w.state != "ready"]
        if bad:
            raise SystemExit(f"bench: {bad[0].name}: {bad[0].error}")
        coordinator = await cluster.start_coordinator()
        if coordinator.state != "ready":
            raise SystemExit(f"bench: coordinator: {coordinator.error}")
        return workers_ready, time.monotonic() - started
    finally:
        await cluster.down()
        await cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    floors: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="torbiz-bench-") as tmp:
        root = Path(tmp)
        model = ensure_demo_model(root / "demo.gguf")
        for index, size in enumerate(sizes):
            sshd = SshdCluster(root / f"sshd{size}", size, first_octet=11 + 20 * index)
            sshd.start()
            try:
                (root / f"floor{size}").mkdir()
                floor_cfg = ssh_cluster_file(root / f"floor{size}", sshd, model)
                floors[size] = statistics.median(
                    asyncio.run(session_floor(floor_cfg)) for _ in range(args.repeat + 1))
                for mode in ("parallel", "sequential"):
                    workers, total = [], []
                    for attempt in range(args.repeat):
                        work = root / f"n{size}-{mode}-{attempt}"
                        work.mkdir()
                        cfg = ssh_cluster_file(work, sshd, model)
                        w, t = asyncio.run(bring_up(cfg, mode == "parallel"))
                        workers.append(w)
                        total.append(t)
                    rows.append((size, mode, statistics.median(workers),
                                 statistics.median(total)))
            finally:
                sshd.stop()
    base = next(r for r in rows if r[0] == sizes[0] and r[1] == "parallel")
    print(f"{'nodes':>5}  {'mode':<10}  {'workers ready':>13}  {'up (healthy)':>12}  "
          f"{'vs 1 node':>9}  {'ssh floor':>9}")
    for size, mode, w, t in rows:
        print(f"{size:>5}  {mode:<10}  {w:>11.2f} s  {t:>10.2f} s  {t / base[3]:>8.2f}x  "
              f"{floors[size]:>7.2f} s")
    first = sizes[0]
    print("\nssh floor: one connection and one `true` per node, all in parallel, on this "
          "machine's cores")
    for size in sizes:
        print(f"  {size} nodes: {floors[size]:.2f} s = {floors[size] / floors[first]:.2f}x "
              f"the floor of {first} node")
    largest = max(sizes)
    par = next(r for r in rows if r[0] == largest and r[1] == "parallel")
    seq = next(r for r in rows if r[0] == largest and r[1] == "sequential")
    ratio = par[3] / base[3]
    print(f"\n{largest} nodes in parallel: {ratio:.2f}x the time of {sizes[0]} node "
          f"(target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")
    print(f"{largest} nodes, workers ready: parallel {par[2]:.2f} s vs sequential "
          f"{seq[2]:.2f} s ({seq[2] / par[2]:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
