"""The running bottleneck for the llama.cpp RPC engine: one measurement takes each planned
worker's main-thread CPU (a status check of its node), samples the coordinator's decode loop
for SAMPLE_S (wait_sampler.py), takes the CPU again, and hands it all with the decode rate to
core/supervision/bottleneck.py. The last figures are kept while the cluster is idle (with
their age) and written beside the coordinator's pidfile, so a one-shot `status` shows them;
figures of another plan (after a recovery or a rebalance) are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.config import ClusterConfig
from core.engines.llama_rpc import wait_sampler
from core.engines.llama_rpc.serving import placement_file
from core.planning.layer_map import COORDINATOR
from core.state_file import read_json, write_json
from core.supervision.bottleneck import Bottleneck, split, token_seconds
from core.supervision.throughput import ThroughputSample

BOTTLENECK_FILE = "bottleneck.json"
SAMPLE_S = 1.0  # the decode loop is sampled this long per measurement
MIN_BUSY_SAMPLES = 25  # fewer busy samples than this (a request that just ended) say nothing

Workers = list[tuple[str, int]]
Probe = Callable[[Sequence[str]], Awaitable[object]]


def _workers(plan: dict[str, Any]) -> Workers:
    found = []
    for name, span in plan.items():
        if name == COORDINATOR or not isinstance(span, list) or len(span) != 2:
            continue
        if isinstance(span[1], int) and span[1] > 0:
            found.append((name, span[1]))
    return found


async def predicted_tps(config: ClusterConfig) -> float | None:
    """The speed model's generation tok/s for the running plan (placement.json's spans) from
    the calibration cache; None when anything in it is not calibrated or nothing runs."""
    from core.engines.llama_rpc import calibrate_run
    from core.planning.perf import ModelShape, predict
    from core.planning.placement import PlacementError, read_model

    placement = await asyncio.to_thread(read_json, placement_file(config)) or {}
    spans = [(name, span[1]) for name, span in (placement.get("plan") or {}).items()
             if isinstance(span, list) and len(span) == 2 and isinstance(span[1], int)]
    if not spans:
        return None
    try:
        model = await read_model(config)
    except PlacementError:
        return None
    speeds, links = await asyncio.to_thread(calibrate_run.measured, config,
                                            [name for name, _ in spans])
    found = predict(spans, speeds, links, ModelShape(model.n_layers, model.n_embd),
                    coordinator=COORDINATOR)
    return found.tokens_per_s or None


def _same_plan(found: Bottleneck, workers: Workers) -> bool:
    return [(p.node, p.blocks) for p in found.parts if p.node != COORDINATOR] == workers


class RunningShares:
    """Measures and keeps the running bottleneck of one cluster."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._cpu: dict[str, tuple[float, float]] = {}  # node -> (when, main-thread CPU s)
        self.last: Bottleneck | None = None
        self._last_at = 0.0
        self._pid: int | None = None  # the coordinator sampled, and its decode thread
        self._tid: int | None = None

    def node_cpu(self, name: str, cpu_s: float | None) -> None:
        """A status check's reading of the node's worker (None: not running, or cannot tell)."""
        if cpu_s is None:
            self._cpu.pop(name, None)
        else:
            self._cpu[name] = (time.monotonic(), cpu_s)

    def _file(self) -> Path:
        return placement_file(self.config).with_name(BOTTLENECK_FILE)

    async def update(self, sample: ThroughputSample | None, coordinator_pid: int | None,
                     probe: Probe) -> Bottleneck | None:
        """A new measurement while requests run, else the last one of the running plan with its
        age (None: never measured, or the decode loop cannot be sampled here)."""
        placement = await asyncio.to_thread(read_json, placement_file(self.config)) or {}
        workers = _workers(placement.get("plan") or {})
        token = None if sample is None or sample.running_tps <= 0 else token_seconds(
            sample.running_tps, sample.slots_decoding, sample.last_tps)
        if token is not None and workers and coordinator_pid:
            found = await self._measure(token, workers, placement.get("endpoints") or {},
                                        coordinator_pid, probe)
            if found is not None:
                self.last, self._last_at = found, time.monotonic()
                await asyncio.to_thread(self._save, found)
                return found
        if self.last is not None and _same_plan(self.last, workers):
            return replace(self.last, age_s=time.monotonic() - self._last_at)
        saved = await asyncio.to_thread(self._load)
        return saved if saved is not None and _same_plan(saved, workers) else None

    async def _measure(self, token: tuple[float, str], workers: Workers,
                       endpoints: dict[str, str], pid: int, probe: Probe) -> Bottleneck | None:
        names = [name for name, _ in workers]
        owner: dict[tuple[str, int], str] = {}
        for name in names:
            for address in await asyncio.to_thread(wait_sampler.endpoint_addresses,
                                                   endpoints.get(name, "")):
                owner[address] = name
        await probe(names)
        before = {name: self._cpu.get(name) for name in names}
        profile = await asyncio.to_thread(wait_sampler.sample, pid, SAMPLE_S, set(owner),
                                          tid=self._tid if self._pid == pid else None)
        await probe(names)
        self._pid, self._tid = pid, profile.tid if profile is not None else None
        if profile is None or profile.busy < MIN_BUSY_SAMPLES:
            return None
        waited: dict[str, int] = {}
        for address, count in profile.waiting.items():
            if address in owner:
                waited[owner[address]] = waited.get(owner[address], 0) + count
        rates: dict[str, float | None] = {}
        for name in names:
            first, last = before.get(name), self._cpu.get(name)
            rates[name] = None if first is None or last is None or last[0] <= first[0] \
                else (last[1] - first[1]) / (last[0] - first[0])
        return split(token, workers, {n: c / profile.busy for n, c in waited.items()},
                     profile.running / profile.busy,
                     profile.busy / (profile.busy + profile.other), rates)

    def _save(self, found: Bottleneck) -> None:
        # A view: when it cannot be written the dashboard still shows it, a later `status`
        # just does not.
        with contextlib.suppress(OSError):
            write_json(self._file(), {**found.to_json(), "at": time.time()})

    def _load(self) -> Bottleneck | None:
        data = read_json(self._file())
        if data is None or not isinstance(data.get("at"), (int, float)):
            return None
        return Bottleneck.from_json(data, time.time() - data["at"])
