"""`torbiz-tui calibrate`: measure (or read from the cache) this machine's CPU and each named
node; what the plan's speed figures come from. The method is calibrate.py's docstring."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from core.engines.llama_rpc import calibrate as cal
from core.engines.llama_rpc import link_rate
from core.engines.llama_rpc.calibrate import Calibration, CalibrationError
from core.engines.llama_rpc.coordinator import CoordinatorError, find_coordinator_binary
from core.engines.llama_rpc.rpc import HelloError, hello
from core.planning.fit import model_inputs
from core.planning.model_info import ModelInfo
from core.planning.perf import LinkSpeed, ModelShape, NodeSpeed
from core.planning.placement import PlacementError, node_budget, read_model
from core.planning.planner import layer_costs
from core.reach.probe import NodeProbe
from core.status import NodeState, NodeStatus

if TYPE_CHECKING:
    from core.config import ClusterConfig
    from core.engines.llama_rpc.serving import CoordinatorRunner


class CalibratingEngine(Protocol):
    """What a calibration needs of the llama.cpp engine (the engine itself, structurally)."""

    @property
    def config(self) -> ClusterConfig: ...

    @property
    def runner(self) -> CoordinatorRunner: ...


def _binary_key(path: str) -> dict[str, Any]:
    from pathlib import Path

    st = Path(path).stat()
    return {"llama_server": path, "llama_server_mtime_ns": st.st_mtime_ns}


async def run(engine: CalibratingEngine, names: Sequence[str], force: bool,
              progress: Callable[[str], None], statuses: Mapping[str, NodeStatus],
              probes: Mapping[str, NodeProbe]) -> list[str]:
    """One sentence per part measured or read: this machine's CPU first, then each node.
    A node that cannot be measured gets a sentence saying why and what to do."""
    config = engine.config
    try:
        model = await read_model(config)
        binary = find_coordinator_binary(config)
    except (PlacementError, CoordinatorError) as exc:
        return [f"cannot calibrate: {exc}"]
    assert config.model.gguf is not None
    base = {**cal.model_identity(config.model.gguf), **_binary_key(binary),
            "context": config.model.context, "method": cal.METHOD,
            "coordinator_threads": config.coordinator.threads,
            "coordinator_args": list(config.coordinator.extra_args)}
    lines: list[str] = []
    local = None if force else cal.load_cached(config, cal.LOCAL, base)
    if local is None:
        progress(f"{cal.LOCAL}: timing {cal.CAL_TOKENS} tokens with every block on this CPU")
        try:
            local = await cal.calibrate_local(config, binary, model, base)
        except CalibrationError as exc:
            return [f"{cal.LOCAL} (this machine's CPU) cannot be calibrated: {exc}"]
        cal.store(config, local)
    lines.append(cal.describe(local))
    for name in names:
        node = config.node(name)
        try:
            found = await _one(engine, node.name, force, progress, statuses, probes, model,
                               binary, base)
        except CalibrationError as exc:
            lines.append(f"{name} cannot be calibrated: {exc}; plans leave its speed out "
                         "(placed by memory)")
            continue
        lines.append(cal.describe(found))
        lines.append(await link_rate.calibrate_link(config, node, engine.runner, force))
    return lines


async def _one(engine: CalibratingEngine, name: str, force: bool,
               progress: Callable[[str], None], statuses: Mapping[str, NodeStatus],
               probes: Mapping[str, NodeProbe], model: Any, binary: str,
               base: dict[str, Any]) -> Calibration:
    config = engine.config
    node = config.node(name)
    status = statuses.get(name)
    if status is None or status.state != NodeState.READY:
        why = f" ({status.state}{': ' + status.error if status.error else ''})" \
            if status is not None else ""
        raise CalibrationError(f"its worker is not ready{why}: torbiz-tui doctor, then start it")
    try:
        (endpoint,) = await engine.runner.endpoints([node])
    except Exception as exc:  # noqa: BLE001 - EngineError or a tunnel's failure: a sentence
        raise CalibrationError(f"no way to its worker: {exc}") from None
    host, _, port = endpoint.rpartition(":")
    try:
        version = await hello(host, int(port), timeout=3.0)
    except HelloError as exc:
        text = str(exc)
        if text == "busy":
            raise CalibrationError("its worker is busy with another client (rpc-server serves "
                                   "one at a time): torbiz-tui down, then calibrate") from None
        raise CalibrationError(f"its worker at {endpoint} does not answer ({text})") from None
    key = {**base, "worker": f"rpc {version} {node.rpc_server or 'rpc-server'} "
                             f"threads={node.threads} at {node.host}:{node.rpc_port}"}
    if not force:
        cached = cal.load_cached(config, name, key)
        if cached is not None:
            return cached
    blocks = _blocks_that_fit(config, node, probes.get(name), model)
    counts = cal.block_counts(blocks)
    progress(f"{name}: timing {cal.CAL_TOKENS} tokens with {'/'.join(map(str, counts))} of "
             f"{model.n_layers} blocks on its worker, and all on this CPU, "
             f"{cal.CAL_ROUNDS} rounds")
    ssh = status.probe_ms / 1000 if status.probe_ms is not None else None
    found = await cal.calibrate_worker(config, node, binary, model, endpoint, blocks, key, ssh)
    cal.store(config, found)
    return found


def _blocks_that_fit(config: Any, node: Any, probe: NodeProbe | None, model: ModelInfo) -> int:
    """Every block when the node's budget holds them, else as many of the last ones as fit
    (at least one)."""
    costs = layer_costs(model, config.model.context, config.plan.cache_type)
    if probe is None:
        return model.n_layers
    budget = node_budget(config, node, probe)[0].budget_bytes - model.output_bytes
    held, total = 0, 0
    for cost in reversed(costs):
        if total + cost > budget:
            break
        total += cost
        held += 1
    return max(1, held)


def measured(config: Any, names: Sequence[str]) -> tuple[dict[str, NodeSpeed],
                                                         dict[str, LinkSpeed]]:
    """The speeds and links of this model from the cached runs (any worker key: the plan reads
    what was last measured; `calibrate` checks the key), through core/planning/fit.py. Empty
    when this machine's CPU is not calibrated (every figure is against it)."""
    local = cal.load_cached(config, cal.LOCAL)
    if local is None:
        return {}, {}
    found = [c for c in (cal.load_cached(config, name) for name in names if name != cal.LOCAL)
             if c is not None]
    blocks, embd, share = local.model
    return model_inputs(local.node_runs(), [c.node_runs() for c in found],
                        ModelShape(blocks, embd), share)
