"""bench/cold_start.py's rounds through torbiz itself, on sshd nodes each in network + PID
namespaces of their own (tests/netns_nodes.py) behind tbf links: `up` cold, the pre-warm pushed
over SSH to both workers in parallel then `up`, `up` warm, a warm coordinator restart, and a
recovery after killing a worker onto a pre-warmed standby vs onto a cold one.

Every time runs from its start (the `cache warm`/`up` call, or the kill) to the first token."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from core import operations  # noqa: E402
from core.cluster import Cluster  # noqa: E402
from core.config import load_config  # noqa: E402
from core.supervision.recovery_record import RECOVERED, format_steps  # noqa: E402
from core.supervision.supervisor import Supervisor  # noqa: E402
from tests.cluster_files import ssh_cluster_file  # noqa: E402
from tests.netns_nodes import NamespacedNodes  # noqa: E402


@dataclass
class SshdRow:
    label: str
    took: float
    prewarm_s: float
    crossed: dict[str, int]  # node -> bytes received over its link
    note: str = ""


def _rx(nodes: NamespacedNodes, name: str) -> int:
    far = nodes.veths[name][1]
    out = subprocess.run(["ip", "netns", "exec", nodes.namespaces[name], "cat",
                          f"/sys/class/net/{far}/statistics/rx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def _first_token(url: str, deadline: float = 300.0) -> None:
    started = time.monotonic()
    while True:
        try:
            reply = httpx.post(f"{url}/completion", json={"prompt": "hello", "n_predict": 1},
                               timeout=120, trust_env=False)
            if reply.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > deadline:
            raise SystemExit(f"bench: no first token from {url}")
        time.sleep(0.05)


async def sshd_rounds(model: Path, rate: str, workdir: Path,
                      recovery_only: bool = False) -> list[SshdRow]:
    nodes = NamespacedNodes(workdir / "nodes", 3)
    rows: list[SshdRow] = []
    nodes.start()
    try:
        for name in nodes.names:
            nodes.shape(name, rate)
        # No node has its own copy of the model: a pre-warm pushes over SSH.
        cfg = ssh_cluster_file(workdir, nodes, model, node_overrides={
            n: {"model_path": str(workdir / "no-copy.gguf")} for n in nodes.names})
        cfg.write_text(cfg.read_text().replace("[plan]\n", '[plan]\nstandby = ["node3"]\n'))
        state = workdir / "state" / "t"
        workers = ["node1", "node2"]

        def fresh(names: list[str]) -> None:
            for n in names:
                shutil.rmtree(state / n / "cache", ignore_errors=True)

        def crossed_since(before: dict[str, int]) -> dict[str, int]:
            return {n: _rx(nodes, n) - b for n, b in before.items()}

        async def timed_up(label: str, prewarm: bool) -> None:
            cluster = Cluster(load_config(cfg))
            try:
                rx0 = {n: _rx(nodes, n) for n in workers}
                started = time.monotonic()
                warm_s = 0.0
                if prewarm:
                    results = await operations.cache_warm(cluster, workers)
                    bad = [r.error for r in results if r.error]
                    if bad:
                        raise SystemExit(f"bench: pre-warm failed: {bad}")
                    warm_s = time.monotonic() - started
                await operations.up(cluster)
                await asyncio.to_thread(_first_token, cluster.coordinator.url)
                rows.append(SshdRow(label, time.monotonic() - started, warm_s,
                                    crossed_since(rx0), predicted if not prewarm
                                    and "cold" in label else ""))
                print(f"  {label}: {rows[-1].took:.2f} s", file=sys.stderr, flush=True)
            finally:
                await cluster.down()
                await cluster.close()

        fresh(nodes.names)
        predicted = await predicted_load(cfg, workers)
        await timed_up("(a') torbiz up, cold", prewarm=False)
        if not recovery_only:
            fresh(nodes.names)
            await timed_up("(b) pre-warm pushed over SSH + up", prewarm=True)
            await timed_up("(d') torbiz up, all warm", prewarm=False)

        async def recovery(label: str, standby_warm: bool) -> None:
            fresh(["node3"])
            cluster = Cluster(load_config(cfg))
            supervisor = Supervisor(cluster, interval=0.5)
            results: list[object] = []
            task: asyncio.Task[None] | None = None
            try:
                if standby_warm:
                    await operations.cache_warm(cluster, ["node3"])
                await operations.up(cluster)
                await asyncio.to_thread(_first_token, cluster.coordinator.url)
                # A warm restart of the coordinator (stop, start, first token), the recovery's
                # yardstick: the workers stay, every cache is warm.
                async def restart(label: str) -> None:
                    started = time.monotonic()
                    await cluster.stop_coordinator()
                    stopped = time.monotonic() - started
                    spans = tuple((n, f, c) for n, (f, c) in _planned(cluster).items())
                    await cluster.start_coordinator(spans=spans)
                    ready = time.monotonic() - started
                    await asyncio.to_thread(_first_token, cluster.coordinator.url)
                    took = time.monotonic() - started
                    if standby_warm:
                        rows.append(SshdRow(label, took, 0.0, {}, f"stopped +{stopped:.2f} s, "
                                            f"started (health 200) +{ready - stopped:.2f} s, "
                                            f"first token +{took - ready:.2f} s"))

                await restart("warm restart (coordinator stop + start)")
                task = asyncio.create_task(supervisor.run(results.append))
                while cluster.coordinator.state != "ready":
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.5)
                # The same while the supervisor checks every node (as under the dashboard).
                await restart("warm restart, supervised")
                await asyncio.sleep(1.5)
                rx0 = {n: _rx(nodes, n) for n in ["node1", "node3"]}
                victim = nodes.host_pid("node2", cluster.nodes["node2"].pid or 0)
                killed, killed_wall = time.monotonic(), time.time()
                os.kill(victim, signal.SIGKILL)
                while not any(getattr(r, "outcome", None) for r in results):
                    if time.monotonic() - killed > 300:
                        raise SystemExit("bench: no recovery within 300 s")
                    await asyncio.sleep(0.05)
                outcome = next(r for r in results if getattr(r, "outcome", None))
                if getattr(outcome, "outcome", None) != RECOVERED:
                    raise SystemExit(f"bench: recovery failed: {getattr(outcome, 'reason', '')}")
                await asyncio.to_thread(_first_token, cluster.coordinator.url)
                took = time.monotonic() - killed
                # the record's clock: it ended at `at`, `recovered_after` after the detection
                detected = (float(getattr(outcome, "at", 0.0))
                            - float(getattr(outcome, "recovered_after", 0.0) or 0.0)
                            - killed_wall)
                steps = format_steps(getattr(outcome, "steps", ()))
                rows.append(SshdRow(label, took, 0.0, crossed_since(rx0),
                                    f"{getattr(outcome, 'reason', '')}; detected +{detected:.2f}"
                                    f" s after the kill, then {steps}"))
                print(f"  {label}: {rows[-1].took:.2f} s ({rows[-1].note})", file=sys.stderr,
                      flush=True)
            finally:
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                await cluster.close()
                await cluster.down()
                await cluster.close()

        await recovery("recovery onto a pre-warmed standby", standby_warm=True)
        await recovery("recovery onto a cold standby", standby_warm=False)
    finally:
        nodes.stop()
    return rows


async def predicted_load(cfg: Path, workers: list[str]) -> str:
    """What `plan` predicts for a cold load: each worker's load link measured as `calibrate`
    does (link_rate.py), the bytes a load would send over it."""
    from core.engines.llama_rpc import link_rate
    from core.weight_cache_view import plan_lines

    cluster = Cluster(load_config(cfg))
    try:
        await cluster.start_workers(workers)
        said = [await link_rate.calibrate_link(cluster.config, cluster.config.node(n),
                                               cluster.engine.runner,  # type: ignore[attr-defined]
                                               force=True) for n in workers]
        report, _ = await operations.cache_report(cluster)
        return "; ".join(said + [ln.strip() for ln in plan_lines(report)
                                 if ln.strip().startswith(("the load", *workers))])
    finally:
        await cluster.down()
        await cluster.close()


def _planned(cluster: Cluster) -> dict[str, tuple[int, int]]:
    from core.engines.llama_rpc.coordinator import coordinator_state_dir
    from core.engines.llama_rpc.serving import PLACEMENT_FILE
    from core.state_file import read_json

    placement = read_json(Path(coordinator_state_dir(cluster.config)).expanduser()
                          / PLACEMENT_FILE) or {}
    return {str(k): (int(v[0]), int(v[1])) for k, v in placement.get("plan", {}).items()}
