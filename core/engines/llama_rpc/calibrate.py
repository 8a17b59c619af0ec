"""Calibration: each node's compute speed for this model's blocks and each link's round trip
and transfer rate, measured through the real engine, cached per node and model.

The method (its cost is printed by `torbiz-tui calibrate`; the arithmetic is
core/planning/fit.py's):
- link: one TCP connection to the node's worker port, an RPC HELLO, then 20 DEVICE_COUNT
  requests (9 bytes out, 12 back): the median is the round trip. rpc-server serves one client
  at a time, so this runs only while no coordinator holds the workers.
- a run: a short-lived llama-server started as `up` starts the coordinator (coordinator_argv:
  its threads, extra_args, slots; a free loopback port) with the last k blocks on one worker
  (k 0: every block on this CPU) answers 1 + CAL_RUNS requests of a CAL_PROMPT_TOKENS-token
  prompt and CAL_TOKENS generated tokens; the medians of the last CAL_RUNS requests' own
  timings (llama-server's predicted_ms / predicted_n, prompt_ms) are the run's time per token
  and per prompt.
- this machine's CPU: CAL_ROUNDS runs with every block on it.
- each node: runs at several block counts (1, half, and every block its budget holds), in
  CAL_ROUNDS rounds, each round with a run of every block on this CPU (forward, then backward,
  so a machine that slows down meanwhile weighs on both sides alike). The transfer rate is
  the slope of the load time against the bytes its blocks hold (left out with rpc-server's -c
  cache: the weights need not cross).
A result is cached in <state_dir>/<cluster>/_calibration/<node>.json under the model file's
identity (path, size, mtime), llama-server's, the coordinator's threads and extra_args, and the
worker's (its RPC version, rpc_server, threads, host and port); a changed key, or --force,
measures again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc.coordinator import (
    COORDINATOR_DIR,
    CoordinatorError,
    coordinator_argv,
    placement_args,
)
from core.engines.llama_rpc.rpc import RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, _rst_close
from core.planning.fit import NOISY, NodeRuns, Run, derive, disagreement, fit_line
from core.planning.layer_map import COORDINATOR
from core.planning.model_info import ModelInfo
from core.state_file import read_json, write_json

CAL_TOKENS = 32
CAL_PROMPT_TOKENS = 64
RTT_ROUNDS = 20
CAL_RUNS = 3  # measured requests after the warm-up, per run: their median
CAL_ROUNDS = 2  # rounds of runs per node (a run is a llama-server load)
METHOD = 2  # in the cache key: results of an older method are measured again
RPC_CMD_DEVICE_COUNT = 15
LOCAL = COORDINATOR  # this machine's CPU
CAL_PROMPT = " ".join(["the"] * CAL_PROMPT_TOKENS)  # the prompt every run times (and the bench)


class CalibrationError(Exception):
    """A sentence naming the node and what to do."""


@dataclass(frozen=True)
class Calibration:
    node: str
    key: dict[str, Any]
    runs: tuple[Run, ...]  # blocks on its worker (0: all on this CPU), its times
    prompt_tokens: int  # the prompt's length as llama-server counted it
    rtt_seconds: float  # 0 for this machine
    bytes_per_second: float  # 0: not measured
    cost_seconds: float  # what the measurement took
    measured_at: float  # time.time()
    ssh_rtt_seconds: float | None = None
    model: tuple[int, int, float] = (0, 0, 0.0)  # blocks, n_embd, output_share(): for fit.py
    cached: bool = False

    def node_runs(self) -> NodeRuns:
        return NodeRuns(self.node, self.runs, self.rtt_seconds, self.bytes_per_second,
                        self.prompt_tokens)


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
        runs = tuple(Run(**run) for run in data.pop("runs"))
        blocks, embd, share = data.pop("model")
        found = Calibration(**{**data, "runs": runs, "model": (int(blocks), int(embd),
                                                              float(share)), "cached": True})
    except (TypeError, KeyError, AttributeError, ValueError):
        return None  # another method's result: measured again
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
    prompt_seconds: float
    prompt_tokens: int
    load_seconds: float


async def timed_decode(binary: str, model: Path, context: int, endpoint: str | None,
                       blocks: int, *, timeout: float = 120.0, threads: int | None = None
                       ) -> Decode:
    """A bare llama-server (bench/round_trips.py) with `blocks` (the last ones) on the worker at
    `endpoint` (none: all on this CPU): its own time per generated token, and how long it took
    to load."""
    port = _free_port()
    argv = [binary, "-m", str(model), "-c", str(context), "--host", "127.0.0.1",
            "--port", str(port), "-np", "1", *placement_args([blocks] if endpoint else [])]
    if endpoint:
        argv += ["--rpc", endpoint]
    if threads:
        argv += ["-t", str(threads)]
    return await timed_run(argv, port, timeout)


async def timed_coordinator(config: ClusterConfig, binary: str, endpoint: str | None,
                            blocks: int, timeout: float = 120.0) -> Decode:
    """The same with llama-server's command line exactly as `up` starts it (coordinator_argv:
    the cluster's threads, extra_args, slots), on a free loopback port."""
    port = _free_port()
    here = replace(config, coordinator=replace(config.coordinator, host="127.0.0.1", port=port))
    try:
        argv = coordinator_argv(here, binary, [endpoint] if endpoint else [],
                                layers=[blocks] if endpoint else [])
    except CoordinatorError as exc:
        raise CalibrationError(str(exc)) from None
    return await timed_run(argv, port, timeout)


async def timed_run(argv: Sequence[str], port: int, timeout: float) -> Decode:
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
            runs: list[tuple[float, float, int]] = []
            for _ in range(1 + CAL_RUNS):  # the first warms up; the median of the rest counts
                try:
                    reply = await client.post(f"{url}/completion", json={
                        "prompt": CAL_PROMPT, "n_predict": CAL_TOKENS, "temperature": 0,
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
                runs.append((float(timings["predicted_ms"]) / 1000 / count,
                             float(timings.get("prompt_ms", 0.0)) / 1000,
                             int(timings.get("prompt_n", 0))))
            timed = runs[1:]
            return Decode(statistics.median(r[0] for r in timed),
                          statistics.median(r[1] for r in timed),
                          min(r[2] for r in timed), loaded)
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

def model_facts(model: ModelInfo) -> tuple[int, int, float]:
    """Blocks, n_embd and the output layer's share of the weights a token reads
    (core/planning/fit.py): what a plan's prediction needs of the model, kept with the runs."""
    total = model.weight_bytes + model.output_bytes
    return model.n_layers, model.n_embd, model.output_bytes / total if total else 0.0


def block_counts(most: int) -> list[int]:
    """The block counts a node is timed at: 1, about half, and `most`."""
    return sorted({1, (most + 1) // 2, most})


def _run(found: Decode, blocks: int) -> Run:
    return Run(blocks, found.token_seconds,
               found.prompt_seconds if found.prompt_tokens > 0 else None)


async def calibrate_local(config: ClusterConfig, binary: str, model: ModelInfo,
                          key: dict[str, Any]) -> Calibration:
    assert config.model.gguf is not None
    started = time.monotonic()
    decodes = [await timed_coordinator(config, binary, None, 0) for _ in range(CAL_ROUNDS)]
    # Its load time goes with the key: a worker's transfer rate is measured against it.
    return Calibration(LOCAL, {**key, "load_seconds": min(d.load_seconds for d in decodes)},
                       tuple(_run(d, 0) for d in decodes),
                       min(d.prompt_tokens for d in decodes), 0.0, 0.0,
                       time.monotonic() - started, time.time(), None, model_facts(model))


async def calibrate_worker(config: ClusterConfig, node: NodeConfig, binary: str,
                           model: ModelInfo, endpoint: str, most: int, key: dict[str, Any],
                           ssh_rtt: float | None) -> Calibration:
    """Runs at block_counts(most), CAL_ROUNDS rounds (forward, then backward), each round with
    a run of every block on this CPU."""
    assert config.model.gguf is not None
    started = time.monotonic()
    host, _, port = endpoint.rpartition(":")
    rtt = await rpc_round_trip(host, int(port))
    n = model.n_layers
    runs: list[Run] = []
    loads: list[tuple[float, float]] = []  # (bytes sent, load seconds)
    prompt_tokens: list[int] = []
    for round_ in range(CAL_ROUNDS):
        order = [0, *block_counts(most)]
        for blocks in order if round_ % 2 == 0 else reversed(order):
            try:
                run = await timed_coordinator(config, binary, endpoint if blocks else None,
                                              blocks)
            except CalibrationError as exc:
                where = f"with {blocks} blocks on it" if blocks else "on this CPU alone"
                raise CalibrationError(f"its timed run {where} failed: {exc}") from None
            runs.append(_run(run, blocks))
            prompt_tokens.append(run.prompt_tokens)
            if blocks:
                sent = sum(model.layer_bytes[n - blocks:]) + model.output_bytes
                loads.append((float(sent), run.load_seconds))
    rate = 0.0
    if not node.cache and len({b for b, _ in loads}) > 1:
        per_byte = fit_line(loads).slope
        rate = 1 / per_byte if per_byte > 0 else 0.0
    return Calibration(node.name, key, tuple(runs), min(prompt_tokens), rtt, rate,
                       time.monotonic() - started, time.time(), ssh_rtt, model_facts(model))


def describe(found: Calibration) -> str:
    where = "cached" if found.cached else f"measured in {found.cost_seconds:.1f} s"
    prompt = f"a {found.prompt_tokens}-token prompt"
    if found.node == LOCAL:
        tokens = statistics.median(r.token_seconds for r in found.runs)
        prompts = [r.prompt_seconds for r in found.runs if r.prompt_seconds is not None]
        pp = (f", {statistics.median(prompts) * 1000:.1f} ms for {prompt}" if prompts else "")
        return (f"{found.node} (this machine's CPU): {tokens * 1000:.1f} ms a token with every "
                f"block on it{pp} (median of {len(found.runs)} runs); {where}")
    # The transfer rate, when measured, is the load link's line (link_rate.py), printed next.
    rate = f", {found.bytes_per_second / 1e6:.1f} MB/s" if found.bytes_per_second else ""
    ssh = (f", SSH {found.ssh_rtt_seconds * 1000:.1f} ms"
           if found.ssh_rtt_seconds is not None else "")
    counts = sorted({r.blocks for r in found.runs if r.blocks})
    times = "/".join(
        f"{statistics.median(r.token_seconds for r in found.runs if r.blocks == k) * 1000:.1f}"
        for k in counts)
    try:
        d = derive(found.node_runs())
    except ValueError:
        return f"{found.node}: its stored runs cannot be read: torbiz-tui calibrate --force"
    text = (f"{found.node}: {'/'.join(map(str, counts))} blocks on its worker: {times} ms a "
            f"token, this CPU alone {d.base * 1000:.1f}: {d.per_block * 1000:+.2f} ms per block "
            f"against this CPU, {d.link * 1000:.1f} ms a token for its link and RPC")
    if d.prompt_per_block is not None and d.prompt_link is not None:
        text += (f"; {prompt}: {d.prompt_per_block * 1000:+.1f} ms per block, "
                 f"{d.prompt_link * 1000:.1f} ms link")
    noisy = disagreement(found.node_runs())
    warn = (f"; NOISY: its runs disagree (up to {noisy:.0%} off a line; something else ran on "
            "this machine or the node meanwhile): predictions from it are unreliable; run "
            "`torbiz-tui calibrate --force` when the machines are quiet") if noisy > NOISY else ""
    return (f"{text}; link {found.rtt_seconds * 1000:.2f} ms round trip{rate}{ssh}; "
            f"{where}{warn}")


Progress = Callable[[str], None]
