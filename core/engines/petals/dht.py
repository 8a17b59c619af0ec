"""The swarm's DHT as this machine sees it: a monitor process (dht_monitor.py in the Petals
venv) printing snapshots, and the block map and per-node share read from them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from core.config import ClusterConfig, NodeConfig
from core.engines.petals import commands as backend
from core.engines.petals.local import (
    SIDE,
    PetalsError,
    check_python,
    local_python,
    open_log,
    private_socket_dir,
    remove_socket_dir,
    side_env,
)
from core.engines.petals.swarm_file import read_swarm, swarm_dir, swarm_peers
from core.status import BlockInfo, BlockServer, LayerShare
from core.units import MIB


@dataclass(frozen=True)
class Snapshot:
    """One poll of the DHT: for every block, the servers announcing it."""

    at: float  # time.monotonic() when read
    blocks: tuple[tuple[dict[str, Any], ...], ...]
    error: str = ""


class DhtWatch:
    """A running dht_monitor.py (Petals venv python) and the latest snapshot it printed."""

    def __init__(self, python: str, peers: Sequence[str], prefix: str, n_blocks: int, *,
                 interval: float = 1.0, log: Path | None = None) -> None:
        self.args = [python, str(SIDE / "dht_monitor.py"), "--peers", json.dumps(list(peers)),
                     "--prefix", prefix, "--blocks", str(n_blocks), "--interval", str(interval),
                     "--startup-timeout", "3600"]
        self.sock_dir: str | None = None
        self.peers = tuple(peers)
        self.log = log
        self.latest: Snapshot | None = None
        self.error = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        check_python(self.args[0])
        self.sock_dir = private_socket_dir()
        stderr: Any = asyncio.subprocess.DEVNULL
        if self.log is not None:
            stderr = open_log(self.log)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.args, "--sock-dir", self.sock_dir, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=stderr, env=side_env(), limit=16 * MIB,
                start_new_session=True)
        finally:
            if stderr is not asyncio.subprocess.DEVNULL:
                stderr.close()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                break
            text = line.decode(errors="replace")
            if not text.startswith(backend.JSON_MARK):
                continue
            try:
                data = json.loads(text[len(backend.JSON_MARK):])
            except ValueError:
                continue
            if "error" in data:
                self.error = str(data["error"])[:300]
            elif isinstance(data.get("blocks"), list):
                self.error = ""
                self.latest = Snapshot(time.monotonic(), tuple(
                    tuple(s for s in b.get("servers", []) if isinstance(s, dict))
                    for b in data["blocks"] if isinstance(b, dict)))
            self._changed.set()
        await self._proc.wait()
        self.error = self.error or f"the DHT monitor exited (status {self._proc.returncode})"
        self._changed.set()

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """Wait for the next poll (or the monitor's end); None on timeout."""
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        return self.latest

    async def fresh(self, timeout: float, newer_than: float) -> Snapshot | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            if self.latest is not None and self.latest.at > newer_than:
                return self.latest
            await self.next_snapshot(max(0.05, deadline - time.monotonic()))
        return self.latest if self.latest is not None and self.latest.at > newer_than else None

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        # torch's torch_shm_manager leaves the monitor's group (setsid): note every descendant
        # now, to KILL what outlives the group below (psutil refuses a pid reused meanwhile).
        descendants: list[psutil.Process] = []
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(proc.pid).children(recursive=True)
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the monitor exits when its stdin closes
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        if proc is not None:
            # Its DHT process and p2pd are in its process group (its own session).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        remove_socket_dir(self.sock_dir)  # whatever hivemind left there, p2pd killed above
        self.sock_dir = None


_watches: dict[int, DhtWatch] = {}  # id(cluster) -> its watch; closed by close_watch()
_watch_locks: dict[int, asyncio.Lock] = {}  # parallel probes of several nodes start one watch



def block_map(config: ClusterConfig, swarm: dict[str, Any],
              snapshot: Snapshot | None) -> tuple[tuple[BlockInfo, ...], tuple[int, ...]]:
    """Every block with its servers (named by node when the peer id is one of ours), and the
    blocks that no live ONLINE server serves."""
    names = {peer: node for node, peer in swarm.get("peer_ids", {}).items()}
    n_blocks = int(swarm.get("n_blocks") or 0)
    blocks: list[BlockInfo] = []
    for index in range(n_blocks):
        servers = snapshot.blocks[index] if snapshot and index < len(snapshot.blocks) else ()
        blocks.append(BlockInfo(index, tuple(
            BlockServer(peer_id=str(s.get("peer_id", "")),
                        node=names.get(str(s.get("peer_id", "")), ""),
                        state=str(s.get("state", "")), alive=bool(s.get("alive")),
                        throughput=_float(s.get("throughput")), version=str(s.get("version") or ""))
            for s in servers)))
    return tuple(blocks), tuple(b.index for b in blocks if not b.served)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def node_share(config: ClusterConfig, swarm: dict[str, Any], blocks: Sequence[BlockInfo],
               node: NodeConfig) -> LayerShare:
    peer = swarm.get("peer_ids", {}).get(node.name, "")
    planned = swarm.get("plan", {}).get(node.name)
    mine = [(b.index, s) for b in blocks for s in b.servers if peer and s.peer_id == peer]
    first = min((i for i, _ in mine), default=None)
    states = {("dead" if s.state != "OFFLINE" and not s.alive else s.state) for _, s in mine}
    state = ("ONLINE" if states == {"ONLINE"} else "dead" if "dead" in states
             else "JOINING" if "JOINING" in states else "OFFLINE" if states else "")
    server = mine[0][1] if mine else None
    endpoint = ":".join(map(str, backend.listen_address(node)))
    return LayerShare(node.name, endpoint,
                      planned[0] if planned else None, planned[1] if planned else None,
                      len(mine) if mine else None, first_layer=first, state=state, peer_id=peer,
                      throughput=server.throughput if server else None,
                      version=server.version if server else "",
                      predicted_bytes=int(swarm.get("predicted", {}).get(node.name, 0)))


_view_errors: dict[int, str] = {}  # id(cluster) -> why the DHT could not be read last time




class SwarmView:
    """One cluster's view of its swarm's DHT: a watch (re)started when the swarm's peers
    change, the latest snapshot, and why it could not be read last time."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.error = ""
        self._watch: DhtWatch | None = None
        self._lock = asyncio.Lock()  # parallel probes of several nodes start one watch

    async def watch(self) -> DhtWatch | None:
        """The DHT watch; None when no peer is known yet (nothing was ever started)."""
        swarm = read_swarm(self.config)
        peers = swarm_peers(self.config, swarm)
        n_blocks = int(swarm.get("n_blocks") or 0)
        if not peers or n_blocks < 1:
            return None
        async with self._lock:
            watch = self._watch
            # A running client finds new servers through the DHT: restart it only when it
            # died or knows none of the swarm's peers (each start costs seconds of imports).
            if watch is not None and (not watch.running or not set(watch.peers) & set(peers)):
                await watch.aclose()
                watch = self._watch = None
            if watch is None:
                watch = DhtWatch(local_python(self.config), peers, str(swarm.get("prefix")),
                                 n_blocks, log=swarm_dir(self.config) / "monitor.log")
                await watch.start()
                self._watch = watch
            return watch

    async def view(self, *, wait: float = 30.0,
                   fresh: bool = False) -> tuple[dict[str, Any], Snapshot | None]:
        """The swarm file and the latest DHT snapshot; waits up to `wait` s for a first one
        (or, with `fresh`, for one read after this call)."""
        swarm = read_swarm(self.config)
        try:
            watch = await self.watch()
        except PetalsError as exc:
            self.error = str(exc)
            return swarm, None
        if watch is None:
            return swarm, None
        snapshot = watch.latest
        if snapshot is None or fresh:
            snapshot = await watch.fresh(wait, time.monotonic() if fresh else -1.0)
        self.error = watch.error
        return swarm, snapshot

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        self.error = ""
        if watch is not None:
            await watch.aclose()
