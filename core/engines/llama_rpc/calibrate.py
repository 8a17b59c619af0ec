"""Calibration: each node's compute speed for this model's blocks and each link's round trip
and transfer rate, measured through the real engine, cached per node and model.

The method (its cost is printed by `torbiz-tui calibrate`):
- link: one TCP connection to the node's worker port, an RPC HELLO, then 20 DEVICE_COUNT
  requests (9 bytes out, 12 back): the median is the round trip. rpc-server serves one client
  at a time, so this runs only while no coordinator holds the workers.
- this machine's CPU: a short-lived llama-server with every block on it (-ngl 0) decodes
  CAL_TOKENS tokens after a CAL_PROMPT_TOKENS-token prompt, 1 + CAL_RUNS times; the median of
  the last CAL_RUNS predicted_ms / predicted_n (llama-server's own timing) is its time per
  token, T_local.
- each node: the same with its worker holding k blocks (every block when its budget allows,
  else as many as fit; the first n - k stay on this CPU): T_k. Its seconds per block per
  token are (T_k - T_local (n-k)/n - link) / k, where link is the round trips and
  activations perf.link_seconds counts. The transfer rate is the bytes of its k blocks over
  the extra load time against the local run's (a lower bound: it includes the worker's
  allocation; with rpc-server's -c cache the weights do not cross and the rate is left out).
A result is cached in <state_dir>/<cluster>/_calibration/<node>.json under the model file's
identity (path, size, mtime) and the worker's (its RPC version, rpc_server, threads, host and
port); a changed key, or --force, measures again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc.coordinator import COORDINATOR_DIR, placement_args
from core.engines.llama_rpc.rpc import RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, _rst_close
from core.planning.model_info import ModelInfo
from core.planning.perf import LinkSpeed, ModelShape, NodeSpeed, link_seconds
from core.state_file import read_json, write_json

CAL_TOKENS = 24
CAL_PROMPT_TOKENS = 32
RTT_ROUNDS = 20
CAL_RUNS = 3  # measured runs after the warm-up: their median (2 shared cores are noisy)
RPC_CMD_DEVICE_COUNT = 15
LOCAL = "coordinator"  # this machine's CPU (layer_map.COORDINATOR)
_PROMPT = " ".join(["the"] * CAL_PROMPT_TOKENS)


class CalibrationError(Exception):
    """A sentence naming the node and what to do."""


@dataclass(frozen=True)
class Calibration:
    node: str
    key: dict[str, Any]
    block_seconds: float  # per block per generated token
    blocks: int  # blocks it held while measured
    token_seconds: float  # the measured run's time per token
    rtt_seconds: float  # 0 for this machine
    bytes_per_second: float  # 0: not measured
    cost_seconds: float  # what the measurement took
    measured_at: float  # time.time()
    ssh_rtt_seconds: float | None = None
    cached: bool = False

    def speed(self) -> NodeSpeed:
        return NodeSpeed(self.node, self.block_seconds)

    def link(self) -> LinkSpeed:
        return LinkSpeed(self.node, self.rtt_seconds, self.bytes_per_second)


def calibration_dir(config: ClusterConfig) -> Path:
    return Path(config.state_dir).expanduser() / config.name / COORDINATOR_DIR / "calibration"


def model_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"model": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_cached(config: ClusterConfig, name: str, key: dict[str, Any] | None = None
                ) -> Calibration | None:
    """The node's stored calibration (for this key when given), or None."""
    data = read_json(calibration_dir(config) / f"{name}.json")
    if not data:
        return None
    try:
        found = Calibration(**{**data, "cached": True})
    except TypeError:
        return None
    if key is not None and any(found.key.get(k) != v for k, v in key.items()):
        return None
    if key is None and config.model.gguf is not None:
        with contextlib.suppress(OSError):
            if {k: found.key.get(k) for k in ("model", "size", "mtime_ns")} != \
                    model_identity(config.model.gguf):
                return None
    return found


def store(config: ClusterConfig, found: Calibration) -> None:
    write_json(calibration_dir(config) / f"{found.node}.json",
               {k: v for k, v in asdict(found).items() if k != "cached"})


# ---- the link ------------------------------------------------------------------------------

async def rpc_round_trip(host: str, port: int, rounds: int = RTT_ROUNDS,
                         timeout: float = 3.0) -> float:
    """The median time of a 9-byte request and its 12-byte reply on one connection to a
    worker; raises CalibrationError when it does not answer (busy: a coordinator holds it)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise CalibrationError(f"cannot connect to its worker at {host}:{port} "
                               f"({exc.__class__.__name__})") from None
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE)
                     + bytes(RPC_CONN_CAPS_SIZE))
        await writer.drain()
        (size,) = struct.unpack("<Q", await asyncio.wait_for(reader.readexactly(8), timeout))
        await asyncio.wait_for(reader.readexactly(size), timeout)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            writer.write(bytes([RPC_CMD_DEVICE_COUNT]) + struct.pack("<Q", 0))
            await writer.drain()
            (size,) = struct.unpack("<Q", await asyncio.wait_for(reader.readexactly(8),
                                                                 timeout))
            await asyncio.wait_for(reader.readexactly(size), timeout)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    except asyncio.TimeoutError:
        raise CalibrationError(f"its worker at {host}:{port} accepts but does not answer: a "
                               "coordinator holds it (rpc-server serves one client at a "
                               "time); torbiz-tui down, then calibrate") from None
    except (OSError, asyncio.IncompleteReadError):
        raise CalibrationError(f"the link to its worker at {host}:{port} dropped while "
                               "measuring") from None
    finally:
        _rst_close(writer)


# ---- a timed decode through a short-lived llama-server -------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Decode:
    token_seconds: float
    load_seconds: float


async def timed_decode(binary: str, model: Path, context: int, endpoint: str | None,
                       blocks: int, *, timeout: float = 120.0, threads: int | None = None
                       ) -> Decode:
    """llama-server with `blocks` (the last ones) on the worker at `endpoint` (none: all on this
    CPU): its own time per generated token, and how long it took to load."""
    port = _free_port()
    argv = [binary, "-m", str(model), "-c", str(context), "--host", "127.0.0.1",
            "--port", str(port), "-np", "1", *placement_args([blocks] if endpoint else [])]
    if endpoint:
        argv += ["--rpc", endpoint]
    if threads:
        argv += ["-t", str(threads)]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    tail: list[bytes] = []

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            tail.append(line)
            del tail[:-20]

    reading = asyncio.create_task(drain())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            while True:
                if proc.returncode is not None:
                    raise CalibrationError("llama-server exited while loading: "
                                           + _last_error(tail))
                if time.monotonic() - started > timeout:
                    raise CalibrationError(f"llama-server did not load within {timeout:.0f} s")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            loaded = time.monotonic() - started
            runs: list[float] = []
            for _ in range(1 + CAL_RUNS):  # the first warms up; the median of the rest counts
                try:
                    reply = await client.post(f"{url}/completion", json={
                        "prompt": _PROMPT, "n_predict": CAL_TOKENS, "temperature": 0,
                        "ignore_eos": True, "cache_prompt": False})
                except httpx.HTTPError as exc:
                    raise CalibrationError(f"llama-server stopped answering mid-run "
                                           f"({exc.__class__.__name__}): "
                                           + _last_error(tail)) from None
                if reply.status_code != 200:
                    raise CalibrationError(f"llama-server answered HTTP {reply.status_code}: "
                                           + _last_error(tail))
                timings = reply.json().get("timings", {})
                count = int(timings.get("predicted_n", 0))
                if count < 2:
                    raise CalibrationError("llama-server generated no tokens: "
                                           + _last_error(tail))
                runs.append(float(timings["predicted_ms"]) / 1000 / count)
            return Decode(statistics.median(runs[1:]), loaded)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


def _last_error(tail: Sequence[bytes]) -> str:
    lines = [ln.decode(errors="replace").strip() for ln in tail]
    hits = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    text = (hits or lines or ["no message"])[-1]
    return text[:200]


# ---- one node ------------------------------------------------------------------------------

def shape_of(model: ModelInfo) -> ModelShape:
    return ModelShape(model.n_layers, model.n_embd)


async def calibrate_local(config: ClusterConfig, binary: str, model: ModelInfo,
                          key: dict[str, Any]) -> Calibration:
    assert config.model.gguf is not None
    started = time.monotonic()
    run = await timed_decode(binary, config.model.gguf, config.model.context, None, 0,
                             threads=config.coordinator.threads)
    return _local(key, model, run, started)


def _local(key: dict[str, Any], model: ModelInfo, run: Decode, started: float) -> Calibration:
    # Its load time goes with the key: a worker's transfer rate is measured against it.
    return Calibration(LOCAL, {**key, "load_seconds": run.load_seconds},
                       run.token_seconds / model.n_layers, model.n_layers, run.token_seconds,
                       0.0, 0.0, time.monotonic() - started, time.time())


async def calibrate_worker(config: ClusterConfig, node: NodeConfig, binary: str,
                           model: ModelInfo, endpoint: str, blocks: int, local: Calibration,
                           key: dict[str, Any], round_trips: float,
                           ssh_rtt: float | None) -> Calibration:
    assert config.model.gguf is not None
    started = time.monotonic()
    host, _, port = endpoint.rpartition(":")
    rtt = await rpc_round_trip(host, int(port))
    try:
        run = await timed_decode(binary, config.model.gguf, config.model.context, endpoint,
                                 blocks, threads=config.coordinator.threads)
    except CalibrationError as exc:
        raise CalibrationError(f"its timed run failed: {exc}") from None
    n = model.n_layers
    sent = sum(model.layer_bytes[n - blocks:]) + model.output_bytes
    extra_load = run.load_seconds - float(local.key.get("load_seconds", 0.0))
    rate = sent / extra_load if extra_load > 0.05 and not node.cache else 0.0
    wire = link_seconds(LinkSpeed(node.name, rtt, rate), shape_of(model), round_trips)
    own = run.token_seconds - local.token_seconds * (n - blocks) / n - wire
    per_block = max(own / blocks, local.block_seconds * 0.05)
    return Calibration(node.name, key, per_block, blocks, run.token_seconds, rtt, rate,
                       time.monotonic() - started, time.time(), ssh_rtt)


def describe(found: Calibration) -> str:
    where = "cached" if found.cached else f"measured in {found.cost_seconds:.1f} s"
    if found.node == LOCAL:
        return (f"{found.node} (this machine's CPU): {found.block_seconds * 1000:.2f} ms per "
                f"block per token ({found.token_seconds * 1000:.1f} ms a token with all "
                f"{found.blocks} blocks); {where}")
    rate = (f"{found.bytes_per_second / 1e6:.1f} MB/s" if found.bytes_per_second
            else "rate not measured")
    ssh = (f", SSH {found.ssh_rtt_seconds * 1000:.1f} ms"
           if found.ssh_rtt_seconds is not None else "")
    return (f"{found.node}: {found.block_seconds * 1000:.2f} ms per block per token "
            f"(held {found.blocks} blocks: {found.token_seconds * 1000:.1f} ms a token); link "
            f"{found.rtt_seconds * 1000:.2f} ms round trip, {rate}{ssh}; {where}")


Progress = Callable[[str], None]
