"""What llama-server really did while loading: devices, layers and buffer bytes per worker, read
from its log at `-lv 4` (llama.cpp from the llama-cpp-python 0.3.36 sdist).

The lines this relies on (quoted from the real binary):

    llama_prepare_model_devices: using device RPC0 (127.0.0.1:51301) (unknown id) - 24105 MiB free
    load_tensors: offloaded 9/9 layers to GPU
    load_tensors:   CPU_Mapped model buffer size =     0.25 MiB
    load_tensors: RPC0[127.0.0.1:51301] model buffer size =     5.63 MiB
    llama_kv_cache: RPC0[127.0.0.1:51301] KV buffer size =     1.25 MiB
    llama_kv_cache: size =    2.00 MiB (   512 cells,   8 layers,  4/1 seqs), K (f16): ...
    sched_reserve: RPC0[127.0.0.1:51301] compute buffer size =     8.04 MiB
    common_memory_breakdown_print: |   - RPC0 (127.0.0.1:51301) | 24105 = 24105 + (  14 =  5 + ...
    llama_server: model loaded

Buffers are named `RPC<i>[endpoint]` where <i> is the device index inside that worker, so
they are keyed (and summed) by endpoint. On CPUs that repack weights (Intel AMX, AVX2 or NEON
with some quantized types) the coordinator's CPU shows an extra buffer beside the mapped file,
`load_tensors: AMX model buffer size =` (or CPU_REPACK, ...) and an `AMX` row in the memory
table: it is the same CPU, holding a second copy, so it is folded into "CPU" and counted.
`--fit on` first measures with dry runs; at `-lv 4` those only print memory-breakdown tables,
at `-lv 5` they print whole blocks of 0.00 MiB buffers: everything between "fitting params to
device memory" and "fitting params to free memory took" is a dry run, and a new block of device
lines after buffers starts over, so the report always describes the last (real) load.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.planning.repack import is_cpu_extra_buffer

MIB = 1024 * 1024
HOST = "CPU"  # the coordinator's own host buffers (CPU, CPU_Mapped, CPU_REPACK, AMX, CUDA_Host)


@dataclass(frozen=True)
class DeviceLoad:
    endpoint: str  # "host:port" of a worker, a local device name ("CUDA0"), or "CPU"
    model_bytes: int = 0
    kv_bytes: int = 0
    compute_bytes: int = 0
    layers: int | None = None  # repeating layers (blocks) held; the output head is not one
    free_bytes: int | None = None  # what the device reported when llama.cpp picked it
    holds_output: bool | None = None  # known only from `-lv 5` per-layer lines
    repacked_bytes: int = 0  # of model_bytes: the CPU's repacked copy (AMX, CPU_REPACK, ...)


@dataclass(frozen=True)
class MemoryRow:
    """One row of llama.cpp's memory-breakdown table (whole MiB, truncated by llama.cpp)."""

    endpoint: str
    total_mib: int | None
    free_mib: int | None
    model_mib: int
    context_mib: int
    compute_mib: int


@dataclass(frozen=True)
class LoadReport:
    devices: tuple[DeviceLoad, ...] = ()
    offloaded: tuple[int, int] | None = None  # N/M where M = blocks + 1 (the output layer)
    finished: bool = False
    error: str = ""
    stage: str = ""  # see STAGES; "" when the log says nothing about loading yet
    memory: tuple[MemoryRow, ...] = ()  # the last breakdown table (a projection during --fit)
    kv_bytes_per_layer: int | None = None  # the value the layer counts were derived from

    def device(self, endpoint: str) -> DeviceLoad | None:
        return next((d for d in self.devices if d.endpoint == endpoint), None)


# Coarse stages in the order llama-server goes through them, with the share of loading time
# each one starts at. The weights upload (RPC: every byte over the network) has no progress
# signal of its own at -lv 4, so it spans most of the range.
STAGES: tuple[tuple[str, float], ...] = (
    ("starting", 0.0),
    ("fitting", 0.02),
    ("reading model", 0.05),
    ("placing layers", 0.08),
    ("uploading weights", 0.10),
    ("creating context", 0.85),
    ("allocating KV cache", 0.88),
    ("reserving compute", 0.92),
    ("warming up", 0.95),
    ("ready", 1.0),
)
_STAGE_AT = dict(STAGES)
_STAGE_RANK = {name: i for i, (name, _) in enumerate(STAGES)}

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")
# "0.00.062.252 I " (time since start, level) then an optional 2-5 letter module tag.
_PREFIX = re.compile(r"^\s*(?:\d+(?:\.\d+){1,4}\s+)?(?:([DIWET])\s+)?")
_TAG = re.compile(r"^[a-z]{2,5}\s+(?=[\w~.]+:\s)")
_NUM = r"([0-9]+(?:\.[0-9]+)?)"

_USING_DEVICE = re.compile(
    r"using device (\S+) \((.*)\) \((?:[^()]*)\) - (\d+) MiB free")
_BUFFER = re.compile(
    rf"(?:^|:\s)\s*(\S+?)\s+(model|KV|compute) buffer size =\s*{_NUM} MiB")
_RPC_BUFFER = re.compile(r"^RPC\d+\[(.+)\]$")
_RPC_DEVICE = re.compile(r"^RPC\d+$")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers")
_KV_SIZE = re.compile(rf"llama_kv_cache: size =\s*{_NUM} MiB \(\s*\d+ cells,\s*(\d+) layers")
_N_LAYER = re.compile(r"print_info: n_layer\s+=\s*(\d+)")
_LAYER_ASSIGNED = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")
_KV_LAYER = re.compile(r"llama_kv_cache: layer\s+(\d+): dev = (\S+)")
_BREAKDOWN_ROW = re.compile(
    r"\|\s+- (\S+)(?: \((.*?)\))?\s*\|\s*(?:(\d+) = (\d+) \+ )?\(?\s*(\d+) =\s*(\d+) \+\s*(\d+)"
    r" \+\s*(\d+)\)?")
_BREAKDOWN_HEAD = "memory breakdown [MiB]"
_FIT_START = "fitting params to device memory"
_FIT_END = "fitting params to free memory took"
_NEW_LOAD = ("llama_server: initializing", "load_model: loading model '")
_FINISHED = re.compile(r"\bmodel loaded\b|server is listening|listening on http")
_ABORT = re.compile(r"^\S+\.(?:c|cc|cpp|cu|h|m|mm):\d+: (.+)$")
_WHAT = re.compile(r"what\(\):\s*(.+)$")
_ERROR_PHRASES = ("error loading model", "failed to load model", "failed to allocate",
                  "exiting due to", "GGML_ASSERT", "out of memory")

_STAGE_MARKS: tuple[tuple[str, str], ...] = (
    ("load_model: loading model", "starting"),
    (_FIT_START, "fitting"),
    ("llama_model_loader: loaded meta data", "reading model"),
    ("llama_prepare_model_devices: using device", "placing layers"),
    ("load_tensors: loading model tensors", "placing layers"),
    (" model buffer size =", "uploading weights"),
    ("llama_context: constructing llama_context", "creating context"),
    (" KV buffer size =", "allocating KV cache"),
    ("sched_reserve:", "reserving compute"),
    ("warming up the model", "warming up"),
)


def clean_line(raw: object) -> str:
    """A log line as text without colour codes or control characters."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return _ANSI.sub("", str(raw)).rstrip("\r\n")


def _split_prefix(line: str) -> tuple[str, str]:
    """(level letter or "", message) of a cleaned line."""
    match = _PREFIX.match(line)
    level = (match.group(1) or "") if match else ""
    message = line[match.end():] if match else line
    return level, _TAG.sub("", message, count=1)


def _host_key(name: str) -> str:
    rpc = _RPC_BUFFER.match(name)
    if rpc:
        return rpc.group(1)
    if (name == "CPU" or name.startswith("CPU_") or name.endswith("_Host")
            or is_cpu_extra_buffer(name)):
        return HOST
    return name


def _mib(text: str) -> int:
    return int(round(float(text) * MIB))


@dataclass
class _Block:
    """Everything seen since the current load began (a dry run is thrown away)."""

    order: list[str] = field(default_factory=list)
    device_names: dict[str, str] = field(default_factory=dict)  # "RPC1" -> endpoint
    free: dict[str, int] = field(default_factory=dict)  # device name -> bytes
    model: dict[str, int] = field(default_factory=dict)  # buffer name -> bytes
    kv: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    offloaded: tuple[int, int] | None = None
    kv_sizes: list[tuple[int, int]] = field(default_factory=list)  # (bytes, layers)
    kv_layers: dict[str, set[int]] = field(default_factory=dict)
    assigned: dict[int, str] = field(default_factory=dict)  # layer index -> endpoint
    n_layer: int | None = None
    saw_buffers: bool = False

    def key_for_device(self, name: str) -> str:
        if name in self.device_names:
            return self.device_names[name]
        if name == "CPU":
            return HOST
        return _host_key(name)

    def note(self, key: str) -> None:
        if key not in self.order:
            self.order.append(key)


@dataclass
class _Parse:
    block: _Block = field(default_factory=_Block)
    in_fit: bool = False
    finished: bool = False
    errors: list[str] = field(default_factory=list)
    stage: str = ""
    memory: list[MemoryRow] = field(default_factory=list)
    table: list[MemoryRow] | None = None

    fit_errors: list[str] = field(default_factory=list)

    def restart(self) -> None:
        self.block = _Block()
        self.in_fit = self.finished = False
        self.errors, self.fit_errors, self.stage = [], [], ""

    def advance(self, stage: str) -> None:
        if not self.stage or _STAGE_RANK[stage] > _STAGE_RANK[self.stage]:
            self.stage = stage


def _feed(state: _Parse, raw: object) -> None:
    line = clean_line(raw)
    if not line.strip():
        return
    level, message = _split_prefix(line)

    if _BREAKDOWN_HEAD in message:
        state.table = []
        return
    if state.table is not None:
        row = _BREAKDOWN_ROW.search(message)
        if row and "common_memory_breakdown_print" in message:
            name, desc = row.group(1), row.group(2)
            endpoint = desc if desc and _RPC_DEVICE.match(name) else (
                HOST if name == "Host" or is_cpu_extra_buffer(name) else name)
            _add_row(state.table, MemoryRow(
                endpoint=endpoint,
                total_mib=int(row.group(3)) if row.group(3) else None,
                free_mib=int(row.group(4)) if row.group(4) else None,
                model_mib=int(row.group(6)), context_mib=int(row.group(7)),
                compute_mib=int(row.group(8))))
            state.memory = list(state.table)
            return
        state.table = None

    if any(mark in message for mark in _NEW_LOAD):  # a restarted or re-loading server
        state.restart()
    for mark, stage in _STAGE_MARKS:
        if mark in message and not (state.in_fit and stage != "fitting"):
            state.advance(stage)
    if _FIT_START in message:
        state.in_fit = True
        return
    if _FIT_END in message:
        state.in_fit = False
        state.block = _Block()  # whatever the dry runs printed was not the real load
        state.fit_errors = []  # a failed dry run repeats its error in the real load
        return
    if state.finished:
        return  # the server at work, not the load
    if state.in_fit:
        _feed_error(state.fit_errors, level, message)  # they count only if the fit never ends
        return

    if _FINISHED.search(message):
        state.finished = True
        state.stage = "ready"
        return
    _feed_error(state.errors, level, message)
    _feed_block(state, message)


def _add_row(table: list[MemoryRow], row: MemoryRow) -> None:
    """A row, summed into the one for the same endpoint (the CPU's repacked-copy row, AMX,
    goes with Host)."""
    for index, seen in enumerate(table):
        if seen.endpoint == row.endpoint:
            table[index] = MemoryRow(
                row.endpoint, seen.total_mib if seen.total_mib is not None else row.total_mib,
                seen.free_mib if seen.free_mib is not None else row.free_mib,
                seen.model_mib + row.model_mib, seen.context_mib + row.context_mib,
                seen.compute_mib + row.compute_mib)
            return
    table.append(row)


def _feed_error(errors: list[str], level: str, message: str) -> None:
    if len(errors) >= 50:
        return
    text = message.strip()
    abort = _ABORT.match(text)
    what = _WHAT.search(text)
    if abort:
        errors.append(abort.group(1).strip())
    elif what:
        errors.append(what.group(1).strip())
    elif level == "E" or (not level and any(p in text for p in _ERROR_PHRASES)):
        errors.append(text)


def _feed_block(state: _Parse, message: str) -> None:
    block = state.block
    using = _USING_DEVICE.search(message)
    if using:
        if block.saw_buffers:  # a second load (dry run in another version): start over
            block = state.block = _Block()
        name, desc, free_mib = using.group(1), using.group(2), int(using.group(3))
        key = desc if _RPC_DEVICE.match(name) else name
        block.device_names[name] = key
        block.free[name] = free_mib * MIB  # by device: a worker may serve several
        block.note(key)
        return
    buffer = _BUFFER.search(message)
    if buffer and " output buffer" not in message:
        block.saw_buffers = True
        name = buffer.group(1)
        key = _host_key(name)
        target = {"model": block.model, "KV": block.kv, "compute": block.compute}[buffer.group(2)]
        # A name can repeat within one load (a model split in chunks, the two KV caches of a
        # sliding-window model), and a worker with two devices has RPC0[ep] and RPC1[ep].
        target[name] = target.get(name, 0) + _mib(buffer.group(3))
        block.note(key)
        return
    offloaded = _OFFLOADED.search(message)
    if offloaded:
        block.offloaded = (int(offloaded.group(1)), int(offloaded.group(2)))
        return
    kv_size = _KV_SIZE.search(message)
    if kv_size:
        block.kv_sizes.append((_mib(kv_size.group(1)), int(kv_size.group(2))))
        return
    n_layer = _N_LAYER.search(message)
    if n_layer:
        block.n_layer = int(n_layer.group(1))
        return
    assigned = _LAYER_ASSIGNED.search(message)
    if assigned:
        block.assigned[int(assigned.group(1))] = block.key_for_device(assigned.group(2))
        return
    kv_layer = _KV_LAYER.search(message)
    if kv_layer:
        key = block.key_for_device(kv_layer.group(2))
        block.kv_layers.setdefault(key, set()).add(int(kv_layer.group(1)))


def _per_layer_kv(block: _Block, given: int | None) -> int | None:
    """KV bytes of one layer: from the log's own total when it states one (ground truth),
    else what the caller computed from the model (a partial log stops before the total)."""
    sizes = [(b, n) for b, n in block.kv_sizes if n > 0 and b > 0]
    if sizes:
        per = {round(b / n) for b, n in sizes}
        if len(per) == 1:
            return per.pop()
        return None  # several caches of different layer sizes (SWA): shares are ambiguous
    return given if given and given > 0 else None


def _report(state: _Parse, kv_bytes_per_layer: int | None) -> LoadReport:
    block = state.block
    per_layer = _per_layer_kv(block, kv_bytes_per_layer)
    counted = bool(block.kv_layers)
    output_at = block.assigned.get(block.n_layer) if block.n_layer is not None else None

    def total(buffers: dict[str, int], key: str) -> int:
        return sum(size for name, size in buffers.items() if _host_key(name) == key)

    free: dict[str, int] = {}
    for name, size in block.free.items():
        free[block.device_names[name]] = free.get(block.device_names[name], 0) + size
    devices = []
    for key in block.order:
        kv = total(block.kv, key)
        layers: int | None
        if counted:
            layers = len(block.kv_layers.get(key, ()))
        elif per_layer:
            layers = int(round(kv / per_layer))
        else:
            layers = None
        devices.append(DeviceLoad(
            endpoint=key, model_bytes=total(block.model, key), kv_bytes=kv,
            compute_bytes=total(block.compute, key), layers=layers,
            free_bytes=free.get(key),
            holds_output=(output_at == key) if output_at is not None else None,
            repacked_bytes=sum(size for name, size in block.model.items()
                               if is_cpu_extra_buffer(name) and _host_key(name) == key)))
    # Keep --rpc order; the coordinator's host buffers last.
    devices.sort(key=lambda d: d.endpoint == HOST)
    error = "" if state.finished else _error_sentence(state.errors or state.fit_errors)
    stage = state.stage
    if error:
        stage = "failed"
    return LoadReport(devices=tuple(devices), offloaded=block.offloaded,
                      finished=state.finished, error=error, stage=stage,
                      memory=tuple(state.memory), kv_bytes_per_layer=per_layer)


def _error_sentence(errors: list[str]) -> str:
    if not errors:
        return ""
    first = errors[0]
    cause = next((e for e in errors if "error loading model:" in e
                  or "failed to initialize the context:" in e), "")
    text = first if not cause or cause == first else f"{first} ({cause})"
    return text[:300]


def parse_load_log(lines: Iterable[object], kv_bytes_per_layer: int | None = None) -> LoadReport:
    """What the last load in this log did. Any text is accepted: partial logs (still loading)
    give what is known so far, garbage lines are skipped. `kv_bytes_per_layer` (from the model
    at the context in use) turns KV shares into layer counts when the log does not state the
    KV cache's total size itself."""
    state = _Parse()
    for raw in lines:
        _feed(state, raw)
    return _report(state, kv_bytes_per_layer)


def load_progress(lines: Iterable[object]) -> float | None:
    """A coarse fraction of loading done, from the stage the log has reached (llama-server
    prints no per-tensor progress at -lv 4: its progress callback only feeds the router mode,
    and the dots of llama.cpp's default callback are replaced by it), or None when the log shows
    no loading at all. 1.0 once the model is loaded; the value never goes back."""
    report = parse_load_log(lines)
    if report.finished:
        return 1.0
    if not report.stage or report.stage == "failed":
        return None
    return _STAGE_AT[report.stage]


def llama_layer_split(n_layer: int, tensor_split: Sequence[float],
                      n_gpu_layers: int | None = None) -> tuple[int, tuple[int, ...], int | None]:
    """Where llama.cpp (this version, `--fit off`) puts the layers for `-ngl`/`-ts`, modelled
    on llama_model::load_tensors: (blocks kept on the coordinator's CPU, blocks per device in
    --rpc order, index of the device that gets the output layer or None when the CPU keeps it).

    The split is over n_layer + 1 units, the output layer being the last unit, so `-ts 1,3` over
    8 blocks gives 3 and 5 blocks (plus the output on the second), not 2 and 6. The first
    n_layer + 1 - ngl units stay on the CPU. Weights all zero mean "by free memory", which is
    not modelled here: pass the free bytes as weights. Float32 arithmetic as in llama.cpp."""
    if n_layer < 0 or not tensor_split:
        raise ValueError("need n_layer >= 0 and one weight per device")
    ngl = n_layer + 1 if n_gpu_layers is None else max(0, n_gpu_layers)
    gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    weights = np.asarray([max(0.0, float(w)) for w in tensor_split], dtype=np.float32)
    total = np.float32(0.0)
    cumulative = []
    for weight in weights:
        total = np.float32(total + weight)
        cumulative.append(total)
    if total <= 0:
        raise ValueError("tensor split weights are all zero: llama.cpp then splits by free "
                         "memory; pass those numbers as weights")
    splits = [np.float32(c / total) for c in cumulative]
    cpu_layers = 0
    per_device = [0] * len(splits)
    output: int | None = None
    for layer in range(n_layer + 1):
        if layer < gpu_start or layer - gpu_start >= act:
            device: int | None = None
        else:
            value = np.float32(np.float32(layer - gpu_start) / np.float32(act))
            device = min(bisect.bisect_right(splits, value), len(splits) - 1)
        if layer == n_layer:
            output = device
        elif device is None:
            cpu_layers += 1
        else:
            per_device[device] += 1
    return cpu_layers, tuple(per_device), output


def tensor_split_for(layers: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(-ngl, -ts) that make llama.cpp (`--fit off`) place exactly `layers[i]` blocks on device
    i (in --rpc order), the output layer going with the last device; the model's remaining
    blocks (n_layer - sum) stay on the coordinator's CPU, and they are the first ones. Integer
    weights, so the float32 boundaries fall exactly between blocks."""
    if not layers or any(n < 0 for n in layers):
        raise ValueError("need one non-negative block count per device")
    weights = (*layers[:-1], layers[-1] + 1)
    return sum(weights), weights
