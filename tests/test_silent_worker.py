"""A worker that is deadlocked but still running, on real parts: two rpc-servers and
llama-server on this machine, supervised with recovery on; one worker is reached through a
relay (tests/latency_relay.py) switched mid-stream to swallow everything (nothing forwarded
either way, both sockets kept open): its process runs and its port listens, so the status
check says `ready`, and only the stalled decode, sampled from /proc, tells which worker the
coordinator waits on. A decode whose steps are slower than the stall threshold but keep
coming is never blamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.cluster import Cluster
from core.config import load_config
from core.demo_model import write_demo_model
from core.engines.llama_rpc import wait_sampler
from core.engines.llama_rpc.build import find_cached_binary
from core.status import NOT_RESPONDING, READY
from core.supervision.recovery_record import RECOVERED
from tests.cluster_files import free_port, toml_text
from tests.latency_relay import LatencyRelay
from tests.test_faults import Supervised, _completion, _stream, _until, plan_and_up

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    find_cached_binary("ggml-rpc-server") is None or find_cached_binary("llama-server") is None,
    reason="llama.cpp not built: run `torbiz-tui build-llama`")]


def _cluster_file(tmp: Path, relayed_port: int) -> Path:
    model = tmp / "m.gguf"
    write_demo_model(model, n_layer=4, n_embd=256, n_ff=512)
    nodes = [{"name": "fast", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), "threads": 1},
             {"name": "slow", "host": "127.0.0.1", "transport": "local",
              "rpc_bind": "127.0.0.2", "rpc_host": "127.0.0.1", "rpc_port": relayed_port,
              "threads": 1}]
    path = tmp / "cluster.toml"
    path.write_text(toml_text({"name": "silent", "state_dir": str(tmp / "state")}, nodes,
                              model={"gguf": str(model), "context": 1024},
                              coordinator={"host": "127.0.0.1", "port": free_port()},
                              plan={"policy": "spread", "coordinator_layers": False}))
    return path


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """make(delay_s) -> (supervised cluster, the relay in front of worker `slow`)."""
    made: list[tuple[Supervised, LatencyRelay]] = []

    async def make(delay_s: float = 0.0) -> tuple[Supervised, LatencyRelay]:
        port = free_port()
        relay = LatencyRelay("127.0.0.2", port, delay_s=delay_s, listen_port=port)
        await relay.start()
        cluster = Cluster(load_config(_cluster_file(tmp_path, port)))
        s = Supervised(cluster, None)
        made.append((s, relay))
        await plan_and_up(cluster)
        return s, relay

    try:
        yield make
    finally:
        for s, relay in made:
            await s.stop()
            relay.cut()
            await relay.stop()
            await s.cluster.down()
            await s.cluster.close()


def _can_sample(pid: int) -> bool:
    return wait_sampler.sample(pid, 0.01, set()) is not None or bool(
        wait_sampler.socket_peers(pid))


async def test_running_but_silent_worker_is_not_responding_and_left_out(relayed) -> None:
    s, relay = await relayed(delay_s=0.02)  # ~25 tokens/s: the stream outlasts the test
    cluster = s.cluster
    coordinator_pid = cluster.coordinator.pid
    assert coordinator_pid and cluster.nodes["slow"].pid
    if not _can_sample(coordinator_pid):
        pytest.skip("cannot read llama-server's /proc here (ptrace rights)")
    worker = psutil.Process(cluster.nodes["slow"].pid)
    s.start()
    first = asyncio.Event()
    stream = asyncio.create_task(_stream(s.url, first))
    await asyncio.wait_for(first.wait(), 30)
    await asyncio.sleep(2)  # a few steps seen: the slot's pace is known
    silenced = time.monotonic()
    relay.swallow = True

    await _until(lambda: any(d.part == "slow" and d.at >= silenced for d in s.detections),
                 10, "the silent worker detected")
    detection = next(d for d in s.detections if d.part == "slow" and d.at >= silenced)
    print(f"slow detected after {detection.at - silenced:.2f} s: {detection.reason}")
    assert detection.state == NOT_RESPONDING
    assert detection.at - silenced <= 6.0
    assert "runs but does not answer" in detection.reason and "request" in detection.reason
    assert "has decoded nothing for" in detection.reason
    assert worker.status() != psutil.STATUS_STOPPED and worker.is_running()
    assert cluster.nodes["fast"].state == READY

    ended = await asyncio.wait_for(stream, 15)  # never hangs on the silent worker
    assert ended != "done", ended
    await _until(lambda: bool(s.recoveries), 20, "recovery")
    result = s.recoveries[0]
    assert result.outcome == RECOVERED, result.reason
    assert "slow" in result.lost and "slow" not in result.workers
    print(f"recovered after {result.recovered_after:.2f} s (from the detection)")
    assert await _completion(s.url)
    # Still running, still silent (its port does not answer a HELLO): still not responding.
    await asyncio.sleep(2)
    assert cluster.nodes["slow"].state == NOT_RESPONDING, cluster.nodes["slow"]
    assert worker.is_running() and worker.status() != psutil.STATUS_STOPPED


async def test_slow_steps_that_keep_coming_are_never_blamed(relayed) -> None:
    """The slow worker's link adds 0.6 s each way: a step takes a round trip or two, over
    the 2 s stall threshold, yet every step arrives; nobody is blamed and the request
    completes."""
    s, relay = await relayed()
    cluster = s.cluster
    relay.delay_s = 0.6  # after `up`: its HELLO check has a 2 s deadline
    s.start()
    try:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            answer = await client.post(f"{s.url}/completion", json={
                "prompt": "The", "n_predict": 5, "ignore_eos": True, "temperature": 0})
        answer.raise_for_status()
    except httpx.HTTPError as exc:
        raise AssertionError([n.text for n in s.notices]) from exc
    assert answer.json()["tokens_predicted"] == 5
    assert not [d for d in s.detections if d.part in ("slow", "fast")], s.detections
    assert {st.state for st in cluster.nodes.values()} == {READY}
    assert not s.recoveries
