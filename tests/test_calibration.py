"""Calibration through real rpc-servers and llama-server (local nodes), the fastest policy on
what it measured, and the failures that must end in a sentence and a plan by memory."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.calibrate import calibration_dir
from tests.cluster_files import free_port, toml_text
from tests.latency_relay import LatencyRelay

pytestmark = pytest.mark.skipif(not (find_cached_binary("llama-server")
                                     and find_cached_binary("ggml-rpc-server")),
                                reason="llama.cpp not built (torbiz-tui build-llama)")


def cluster_file(tmp: Path, policy: str, fast_cap_gb: float | None = None,
                 slow_port: int | None = None, broken: bool = False) -> Path:
    model = tmp / "m.gguf"
    if not model.exists():
        write_demo_model(model, n_layer=8, n_embd=512, n_ff=1024)
    fast: dict[str, object] = {"name": "fast", "host": "127.0.0.1", "transport": "local",
                               "rpc_port": free_port(), "threads": 1}
    if fast_cap_gb is not None:
        fast["max_memory_gb"] = fast_cap_gb
    nodes = [fast]
    if slow_port is not None:  # its worker binds 127.0.0.2; this machine reaches it by a relay
        nodes.append({"name": "slow", "host": "127.0.0.1", "transport": "local",
                      "rpc_bind": "127.0.0.2", "rpc_host": "127.0.0.1", "rpc_port": slow_port,
                      "threads": 1})
    if broken:
        nodes.append({"name": "broken", "host": "127.0.0.1", "transport": "local",
                      "rpc_port": free_port(), "rpc_server": str(tmp / "no-such-rpc-server")})
    path = tmp / f"{policy}.toml"
    path.write_text(toml_text({"name": "cal", "state_dir": str(tmp / "state")}, nodes,
                              model={"gguf": str(model), "context": 512},
                              coordinator={"host": "127.0.0.1", "port": free_port()},
                              plan={"policy": policy, "coordinator_layers": False}))
    return path


async def _calibrate(path: Path, **kw: object) -> list[str]:
    cluster = Cluster(load_config(path))
    try:
        return await operations.calibrate(cluster, **kw)  # type: ignore[arg-type]
    finally:
        await operations.down(cluster)
        await cluster.close()


async def _plan(path: Path) -> str:
    cluster = Cluster(load_config(path))
    try:
        return (await operations.plan_preview(cluster)).text
    finally:
        await cluster.close()


def test_calibration_is_cached_and_reused_until_forced(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, "pack")
    first = asyncio.run(_calibrate(path))
    assert any(line.startswith("fast: ") and "measured in" in line for line in first), first
    stored = calibration_dir(load_config(path)) / "fast.json"
    mtime = stored.stat().st_mtime_ns
    again = asyncio.run(_calibrate(path))
    assert all(line.endswith("; cached") for line in again), again
    assert stored.stat().st_mtime_ns == mtime  # not measured again
    forced = asyncio.run(_calibrate(path, force=True))
    assert any("measured in" in line for line in forced)
    assert "predicted" in asyncio.run(_plan(path))


def test_fastest_leaves_a_slow_link_out_when_memory_allows_and_keeps_it_when_needed(
        tmp_path: Path) -> None:
    async def scenario() -> tuple[str, str]:
        port = free_port()
        relay = LatencyRelay("127.0.0.2", port, delay_s=0.010, listen_port=port)
        await relay.start()
        try:
            roomy = cluster_file(tmp_path, "fastest", slow_port=port)
            lines = await _calibrate(roomy)
            assert any(ln.startswith("slow: ") and "link 2" in ln for ln in lines), lines
            left_out = await _plan(roomy)
            tight = cluster_file(tmp_path, "fastest", fast_cap_gb=0.03, slow_port=port)
            kept = await _plan(tight)
            return left_out, kept
        finally:
            await relay.stop()

    left_out, kept = asyncio.run(scenario())
    assert "not used: slow" in left_out
    assert re.search(r"slow: 2\d ms link would cost \d+% of each token; left out", left_out)
    assert "slow: kept, the model does not fit without it; it costs" in kept
    assert "predicted" in kept


def test_a_node_that_cannot_be_calibrated_gets_a_sentence_and_a_plan_by_memory(
        tmp_path: Path) -> None:
    path = cluster_file(tmp_path, "fastest", broken=True)
    lines = asyncio.run(_calibrate(path))
    assert any(ln.startswith("broken cannot be calibrated: its worker is not ready")
               for ln in lines), lines
    text = asyncio.run(_plan(path))
    assert "fastest: broken not calibrated (torbiz-tui calibrate broken): placed by memory" \
        in text


def test_a_link_that_drops_during_calibration_gets_a_sentence(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        port = free_port()
        relay = LatencyRelay("127.0.0.2", port, delay_s=0.005, listen_port=port)
        await relay.start()
        path = cluster_file(tmp_path, "fastest", slow_port=port)

        async def cut_when_loading() -> None:
            while relay.connections < 3:  # HELLO, the round trips, then llama-server's load
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            relay.cut()

        cutter = asyncio.create_task(cut_when_loading())
        try:
            return await _calibrate(path, names=["slow"])
        finally:
            cutter.cancel()
            await relay.stop()

    lines = asyncio.run(scenario())
    assert any(ln.startswith("slow cannot be calibrated: ") for ln in lines), lines
    text = asyncio.run(_plan(cluster_file(tmp_path, "fastest", slow_port=free_port())))
    assert "placed by memory" in text
