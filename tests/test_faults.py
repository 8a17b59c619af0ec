"""Fault injection on a real loopback cluster: real sshd nodes, real rpc-servers, a real
llama-server with the demo model, supervised by core.supervision.supervisor with recovery on.

Each test asserts when the fault was noticed, how it ended (recovered, or a clear degraded
state), that no process is duplicated or orphaned, and that the nodes' logs are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import operations
from core.cluster import Cluster
from core.config import ClusterConfig, load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.recovery import last_recovery
from core.planning.placement import make_placement
from core.reach.probe import probe_node
from core.status import Notice
from core.supervision.recovery_record import DEGRADED, RECOVERED, RecoveryResult
from core.supervision.supervisor import BACKOFF_MAX, Detection, Supervisor
from tests.cluster_files import llama_processes_with, ssh_cluster_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


# ---- a supervised cluster ---------------------------------------------------------------------


class Supervised:
    """A cluster brought up as planned, with a supervisor running in the background that
    records every detection, recovery and notice with its time."""

    def __init__(self, cluster: Cluster, sshd: Any) -> None:
        self.cluster = cluster
        self.sshd = sshd
        self.supervisor = Supervisor(cluster, interval=0.5)
        self.detections: list[Detection] = []
        self.recoveries: list[RecoveryResult] = []
        self.notices: list[Notice] = []
        cluster.subscribe(lambda e: self.notices.append(e) if isinstance(e, Notice) else None)
        self._task: asyncio.Task[None] | None = None

    def _report(self, item: Detection | RecoveryResult) -> None:
        (self.recoveries if isinstance(item, RecoveryResult) else self.detections).append(item)

    def start(self) -> None:
        self._task = asyncio.create_task(self.supervisor.run(self._report))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def url(self) -> str:
        return self.cluster.coordinator.url

    def worker_markers(self) -> dict[str, str]:
        return {n.name: f"-H {n.host} -p {n.rpc_port}" for n in self.cluster.config.nodes}

    def state_dir(self, name: str) -> Path:
        return Path(self.cluster.node_state_dir(self.cluster.config.node(name)))


async def plan_and_up(cluster: Cluster) -> tuple[tuple[str, int, int], ...]:
    names = [n.name for n in cluster.config.nodes]
    probes = await asyncio.gather(*(probe_node(cluster.transport(n)) for n in names))
    placement = await make_placement(cluster.config, dict(zip(names, probes, strict=True)))
    spans = placement.plan.rpc_spans()
    await operations.up(cluster, spans=spans)
    return spans


async def _config(workdir: Path, sshd: Any, cap_fraction: float | None) -> ClusterConfig:
    """The harness's nodes as a cluster file; with `cap_fraction`, every node may hold at
    most that fraction of what the planned model needs (max_memory_gb)."""
    workdir.mkdir()
    model = ensure_demo_model(workdir.parent / "demo.gguf")
    config = load_config(ssh_cluster_file(workdir, sshd, model, name="faults"))
    if cap_fraction is None:
        return config
    names = [n.name for n in config.nodes]
    probe_cluster = Cluster(config)
    try:
        probes = await asyncio.gather(*(probe_node(probe_cluster.transport(n)) for n in names))
    finally:
        await probe_cluster.close()
    plan = (await make_placement(config, dict(zip(names, probes, strict=True)))).plan
    total = sum(a.total_bytes for a in plan.assignments)
    cap = cap_fraction * total
    assert cap > max(a.total_bytes for a in plan.assignments), "the cap must fit the plan"
    overrides = {n: {"max_memory_gb": round(cap / (1 << 30), 9)} for n in names}
    return load_config(ssh_cluster_file(workdir, sshd, model, name="faults",
                                        node_overrides=overrides))


@pytest.fixture
async def supervised(tmp_path: Path, sshd_cluster: Callable[..., Any]
                     ) -> AsyncIterator[Callable[..., Any]]:
    made: list[Supervised] = []

    async def make(count: int = 3, cap_fraction: float | None = None) -> Supervised:
        sshd = sshd_cluster(count=count)
        cluster = Cluster(await _config(tmp_path / f"c{len(made)}", sshd, cap_fraction))
        s = Supervised(cluster, sshd)
        made.append(s)
        await plan_and_up(cluster)
        return s

    try:
        yield make
    finally:
        for s in made:
            await s.stop()
            for node in s.sshd.nodes:  # `down` needs every node's SSH
                s.sshd.start_node(node.name)
            await s.cluster.close()
            await s.cluster.down()
            await s.cluster.close()
            markers = [*s.worker_markers().values(), f"--port {s.cluster.config.coordinator.port}"]
            assert llama_processes_with(markers) == [], "orphan llama.cpp processes"


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


async def _completion(url: str, tokens: int = 8) -> str:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        response = await client.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens})
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])


async def _stream(url: str, first: asyncio.Event) -> str:
    """A long streaming completion; returns how it ended: `done`, `cut` or `error: ...`."""
    body = {"messages": [{"role": "user", "content": "tell me everything"}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client, \
                client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    first.set()
                if line.strip() == "data: [DONE]":
                    return "done"
        return "cut"
    except httpx.HTTPError as exc:
        return f"error: {exc.__class__.__name__}"


def _one_each(s: Supervised, alive: list[str]) -> None:
    """Exactly one rpc-server per live worker, none for the others, one llama-server."""
    for name, marker in s.worker_markers().items():
        found = llama_processes_with([marker])
        assert len(found) == (1 if name in alive else 0), (name, [p.pid for p in found])
    port = s.cluster.config.coordinator.port
    assert len(llama_processes_with([f"--port {port}"])) == 1


# ---- the faults -------------------------------------------------------------------------------


async def test_worker_killed_during_generation_recovers_over_the_rest(supervised) -> None:
    s = await supervised(3)
    cluster = s.cluster
    old_coordinator = cluster.coordinator.pid
    before = {sh.node: (sh.planned_first, sh.planned_layers)
              for sh in await cluster.engine.layer_shares()}
    s.supervisor.interval = 0.5
    s.start()
    first = asyncio.Event()
    stream = asyncio.create_task(_stream(s.url, first))
    await asyncio.wait_for(first.wait(), 30)
    victim = cluster.nodes["node2"].pid
    assert victim
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    await _until(lambda: any(d.part == "node2" for d in s.detections), 5, "detection")
    detected = next(d for d in s.detections if d.part == "node2")
    assert detected.at - killed < 3.0
    assert "worker process is gone" in detected.reason

    await _until(lambda: bool(s.recoveries), 60, "recovery")
    result = s.recoveries[0]
    assert result.outcome == RECOVERED, result.reason
    assert result.lost == ("node2",)
    assert set(result.workers) == {"node1", "node3"}
    assert result.recovered_after is not None and result.recovered_after < 30
    spans = {name: (first_block, count) for name, first_block, count in result.spans}
    assert sum(count for _, count in spans.values()) == 8  # every block placed again
    for name, (first_block, count) in before.items():  # survivors keep their blocks (caches)
        if name != "node2":
            assert spans[name][0] <= first_block
            assert spans[name][0] + spans[name][1] >= first_block + count
    assert cluster.coordinator.state == "ready" and cluster.coordinator.pid != old_coordinator
    ended = await asyncio.wait_for(stream, 30)
    assert ended != "done"  # the request in flight was lost, and said so
    assert await _completion(s.url)  # a new one works
    _one_each(s, ["node1", "node3"])
    # The dead worker's log stays on its node; the notice and status tell the recovery.
    log = (s.state_dir("node2") / "log").read_text()
    assert "torbiz-start" in log
    assert any(n.extra.get("recovery", {}).get("outcome") == RECOVERED for n in s.notices)
    assert any(n.text.startswith("coordinator recovered in ") for n in s.notices)
    record = last_recovery(cluster)
    assert record is not None and record["outcome"] == RECOVERED
    # The placement was written for the new coordinator: the next checks see nothing to do.
    await asyncio.sleep(1.5)
    assert len(s.recoveries) == 1


async def test_rest_too_small_stays_degraded_and_says_what_is_missing(supervised) -> None:
    # Each node may hold 45% of the model: three nodes fit it, two do not.
    s = await supervised(3, cap_fraction=0.45)
    s.start()
    pid = s.cluster.coordinator.pid
    os.kill(s.cluster.nodes["node1"].pid or 0, signal.SIGKILL)
    await _until(lambda: bool(s.recoveries), 20, "a recovery decision")
    result = s.recoveries[0]
    assert result.outcome == DEGRADED, result.reason
    assert "missing" in result.reason and result.missing_bytes > 0
    assert "stays degraded" in result.reason
    assert s.cluster.coordinator.pid == pid  # nothing restarted
    assert any(d.part == "coordinator" and d.state == "degraded" for d in s.detections)
    await asyncio.sleep(1.5)
    assert len(s.recoveries) == 1  # not retried on every check


async def test_lost_sshd_keeps_the_worker_and_reconnects_with_backoff(supervised) -> None:
    s = await supervised(2)
    cluster = s.cluster
    s.start()
    pid = cluster.nodes["node1"].pid
    coordinator = cluster.coordinator.pid
    s.sshd.stop_node("node1", drop_connections=True)
    stopped = time.monotonic()
    await _until(lambda: cluster.nodes["node1"].state == "unreachable", 5, "unreachable")
    assert time.monotonic() - stopped < 3.0
    assert "cannot connect" in cluster.nodes["node1"].error
    await asyncio.sleep(4)  # backoff: fewer attempts than checks
    assert s.supervisor._backoff["node1"] >= 2.0
    assert pid is not None
    os.kill(pid, 0)  # the worker still runs: losing SSH never stops it
    assert await _completion(s.url)  # and still serves the coordinator
    assert s.recoveries == [] and cluster.coordinator.pid == coordinator
    s.sshd.start_node("node1")
    back = time.monotonic()
    await _until(lambda: cluster.nodes["node1"].state == "ready", BACKOFF_MAX + 5,
                 "reconnected")
    assert time.monotonic() - back <= BACKOFF_MAX + 5
    assert cluster.nodes["node1"].pid == pid  # reattached, no duplicate
    _one_each(s, ["node1", "node2"])
    assert s.recoveries == []


async def test_killed_coordinator_is_explained_and_restarted(supervised) -> None:
    s = await supervised(2)
    cluster = s.cluster
    s.start()
    old = cluster.coordinator.pid
    assert old
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    await _until(lambda: any(d.part == "coordinator" for d in s.detections), 5, "detection")
    detection = next(d for d in s.detections if d.part == "coordinator")
    assert detection.at - killed < 3.0 and detection.state == "failed"
    assert detection.reason.startswith("exited")  # the last words of its log
    await _until(lambda: bool(s.recoveries), 60, "restart")
    result = s.recoveries[0]
    assert result.outcome == RECOVERED and result.lost == (), result.reason
    assert set(result.workers) == {"node1", "node2"}
    assert cluster.coordinator.state == "ready" and cluster.coordinator.pid != old
    assert await _completion(s.url)
    _one_each(s, ["node1", "node2"])
    assert "torbiz-start" in (Path(cluster.config.state_dir) / "faults" / "_coordinator"
                              / "log").read_text()
    # An operator's stop is not a fault: no recovery follows it, not even when the coordinator
    # then aborts on its next request for lack of that worker.
    await cluster.stop_node("node2")
    with contextlib.suppress(httpx.HTTPError):
        await _completion(s.url)
    await asyncio.sleep(2.5)
    assert len(s.recoveries) == 1
    assert cluster.nodes["node2"].state == "stopped"
    assert cluster.coordinator.state == "failed", cluster.coordinator


async def test_second_dashboard_reattaches_without_duplicates(supervised) -> None:
    s = await supervised(2)
    cluster = s.cluster
    s.start()
    pids = {name: st.pid for name, st in cluster.nodes.items()}
    source = str(cluster.config.source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "tui.cli", "-c", source]
    status = subprocess.run([*cli, "status", "--json"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=REPO)
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert {n["name"]: n["pid"] for n in seen["nodes"]} == pids
    assert seen["coordinator"]["pid"] == cluster.coordinator.pid
    # A second supervisor (`watch`) runs beside the first, then quits: nothing restarts.
    watch = subprocess.Popen([*cli, "watch", "--interval", "0.5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                             start_new_session=True)
    try:
        await asyncio.sleep(4)
    finally:
        os.killpg(watch.pid, signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    assert "2/2 workers ready, coordinator ready; recovery on" in out, out + err
    assert "recovery:" not in out
    # A fresh Cluster (a restarted dashboard) bringing the cluster up again reattaches.
    again = Cluster(load_config(source))
    try:
        await plan_and_up(again)
        assert {name: st.pid for name, st in again.nodes.items()} == pids
        assert again.coordinator.pid == cluster.coordinator.pid
    finally:
        await again.close()
    _one_each(s, ["node1", "node2"])
    assert s.recoveries == [] and s.detections == []


async def test_two_supervisors_recover_once(supervised) -> None:
    # A dashboard and a `watch` both supervise the cluster: one recovery, one coordinator.
    s = await supervised(3)
    assert s.cluster.config.source is not None
    other_cluster = Cluster(load_config(s.cluster.config.source))
    other = Supervisor(other_cluster, interval=0.5)
    other_results: list[RecoveryResult] = []
    other_task = asyncio.create_task(other.run(
        lambda item: other_results.append(item) if isinstance(item, RecoveryResult) else None))
    s.start()
    try:
        await asyncio.sleep(1.5)  # both saw the coordinator serve
        os.kill(s.cluster.nodes["node3"].pid or 0, signal.SIGKILL)
        await _until(lambda: bool(s.recoveries or other_results), 60, "recovery")
        await asyncio.sleep(3)  # the other one had every chance to try as well
        results = s.recoveries + other_results
        assert [r.outcome for r in results] == [RECOVERED], [r.reason for r in results]
        _one_each(s, ["node1", "node2"])
    finally:
        other_task.cancel()
        await asyncio.gather(other_task, return_exceptions=True)
        await other_cluster.close()


async def test_crashed_node_unreachable_and_silent_is_recovered_without(supervised) -> None:
    # The whole node is gone: its sshd and its worker. SSH says unreachable, the worker's port
    # does not answer from here: the node is lost.
    s = await supervised(3)
    cluster = s.cluster
    s.start()
    await asyncio.sleep(1)
    pid = cluster.nodes["node1"].pid
    assert pid
    s.sshd.stop_node("node1", drop_connections=True)
    os.kill(pid, signal.SIGKILL)
    await _until(lambda: bool(s.recoveries), 60, "recovery")
    result = s.recoveries[0]
    assert result.outcome == RECOVERED and result.lost == ("node1",), result.reason
    assert cluster.nodes["node1"].state == "unreachable"
    assert set(result.workers) == {"node2", "node3"}
    assert await _completion(s.url)
    _one_each(s, ["node2", "node3"])
