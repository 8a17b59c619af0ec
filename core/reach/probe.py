"""What a node has: cores, RAM, GPUs (from the vendors' tools only), its clock and its worker
binary, read in ONE round trip.

The probe is one sh script that prints sections (`@@<marker> name` lines, the marker random per
probe so no tool output can fake a section) and hex-encodes all of it on the node with `od`:
asyncssh drops a command's whole output when it is not UTF-8, and remote output is untrusted, so
every byte comes back and is decoded here with replacement. Parsers never raise on content: a
problem becomes a sentence in `errors` (without the node's name; the caller prefixes it). Only
TransportError (node unreachable, timeout) propagates.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from core.reach.shell import quote
from core.reach.transport import Transport
from core.text import terminal_safe

MIB = 1024 * 1024
MAX_RAM_BYTES = 1 << 50  # 1 PiB: anything above is garbage, not a machine
MAX_GPU_BYTES = 1 << 44  # 16 TiB
MAX_CORES = 1 << 16
MAX_GPU_INDEX = 4096
TOOL_TIMEOUT_S = 15  # a wedged driver can hang nvidia-smi for minutes
_SECTION_CAP = 65536  # bytes kept from one tool's output on the node
_TOTAL_CAP = 262144  # bytes of the whole answer before hex (the transport keeps 1 MiB)

NVIDIA_QUERY = ("--query-gpu=index,name,uuid,memory.total,memory.free",
                "--format=csv,noheader,nounits")
ROCM_QUERY = ("--showmeminfo", "vram", "--showproductname", "--json")
# Where the tools live when a non-login SSH session's PATH does not name them.
_NVIDIA_PLACES = ("/usr/lib/wsl/lib/nvidia-smi", "/usr/local/nvidia/bin/nvidia-smi")
_ROCM_PLACES = ("/opt/rocm/bin/rocm-smi",)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vendor: str  # "nvidia" | "amd"
    total_bytes: int
    free_bytes: int
    uuid: str = ""


@dataclass(frozen=True)
class NodeProbe:
    node: str
    os: str  # `uname -s`: "Linux", "Darwin", ...; "" when unread
    arch: str  # `uname -m`: "x86_64", "arm64", ...
    cores: int  # online processors; 0 when unread
    ram_total_bytes: int  # a cgroup memory limit lower than the RAM wins (see ram_source)
    ram_available_bytes: int
    gpus: tuple[Gpu, ...]
    clock_offset_s: float  # node clock minus dashboard clock, corrected for half the round trip
    rtt_s: float  # the probe's round trip minus the time its script ran on the node
    worker_binary: str | None
    # None: rpc-server prints its protocol version only in the banner of a started server
    # (`--help` shows none); llama_rpc.hello() reads it from a running worker.
    worker_version: str | None
    errors: tuple[str, ...]  # partial failures, each a sentence
    clock_resolution_s: float = 1e-9  # 1.0 when the node's date has no sub-second field
    ram_source: str = ""  # "meminfo", "cgroup v2", "cgroup v1", "sysctl", or "" when unread

    @property
    def gpu_free_bytes(self) -> int:
        return sum(g.free_bytes for g in self.gpus)


@dataclass(frozen=True)
class DarwinMemory:
    cores: int
    ram_total_bytes: int
    ram_available_bytes: int


@dataclass(frozen=True)
class CgroupMemory:
    version: str  # "v1" | "v2"
    limit_bytes: int | None  # None: unlimited
    usage_bytes: int
    inactive_file_bytes: int  # page cache the kernel reclaims before the limit bites


# ---- text from the node ------------------------------------------------------------------------

def _clean(text: str, limit: int = 128) -> str:
    """A remote field as inert text: escape sequences (whole), control and format characters
    dropped, length capped."""
    kept = "".join(ch for ch in terminal_safe(text) if unicodedata.category(ch)[0] != "C")
    return kept.strip()[:limit]


def _snippet(text: str) -> str:
    lines = [ln for ln in (_clean(raw, 160) for raw in text.splitlines()) if ln]
    return repr(lines[0]) if lines else "nothing"


def _int(text: object) -> int | None:
    """A plain non-negative decimal integer, or None ([N/A], [Not Supported], garbage...)."""
    if not isinstance(text, str):
        return None
    word = text.strip()
    if not word.isascii() or not word.isdigit() or len(word) > 20:
        return None
    return int(word)


def _note(errors: list[str] | None, sentence: str) -> None:
    if errors is not None:
        errors.append(sentence)


# ---- parsers (public: other modules and tests feed them recorded outputs) --------------------

def parse_meminfo(text: str, errors: list[str] | None = None) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; kernels before 3.14 have no
    MemAvailable: then MemFree + Buffers + Cached. (0, 0) and a sentence when unreadable."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        match = re.fullmatch(r"\s*(\d{1,18})(?:\s*(kB))?\s*", rest) if sep else None
        if match is not None:
            fields.setdefault(key.strip(), int(match[1]) * (1024 if match[2] else 1))
    total = fields.get("MemTotal")
    if total is None or not 0 < total <= MAX_RAM_BYTES:
        what = "has no MemTotal line" if total is None else f"says MemTotal is {total} bytes"
        _note(errors, f"/proc/meminfo {what}: the node's RAM is unknown")
        return 0, 0
    available = fields.get("MemAvailable")
    if available is None:
        parts = [fields.get(k) for k in ("MemFree", "Buffers", "Cached")]
        if parts[0] is None:
            _note(errors, "/proc/meminfo has neither MemAvailable nor MemFree: the node's "
                          "available RAM is unknown")
            return total, 0
        available = sum(p or 0 for p in parts)
    if available > total:
        _note(errors, f"/proc/meminfo says {available} bytes available of {total}: "
                      "counting the total as available")
        available = total
    return total, available


def parse_nvidia_smi(csv_text: str, errors: list[str] | None = None) -> list[Gpu]:
    """GPUs from `nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.free
    --format=csv,noheader,nounits` (MiB). Lines that are not GPU rows become one sentence."""
    gpus: list[Gpu] = []
    stray: list[str] = []
    for raw in csv_text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        index = _int(parts[0]) if len(parts) >= 5 else None
        if index is None or index > MAX_GPU_INDEX:
            stray.append(line)
            continue
        # A name with a comma would shift the columns: count uuid and memory from the end.
        name = _clean(", ".join(parts[1:-3])) or f"NVIDIA GPU {index}"
        uuid, total_mib, free_mib = _clean(parts[-3]), _int(parts[-2]), _int(parts[-1])
        if total_mib is None or free_mib is None:
            _note(errors, f"nvidia-smi reports no memory figures for GPU {index} ({name}): "
                          f"total {_clean(parts[-2], 40)!r}, free {_clean(parts[-1], 40)!r}; "
                          "it is left out")
            continue
        total, free = total_mib * MIB, free_mib * MIB
        if not 0 < total <= MAX_GPU_BYTES:
            _note(errors, f"nvidia-smi says GPU {index} ({name}) has {total_mib} MiB, which "
                          "cannot be right; it is left out")
            continue
        if free > total:
            _note(errors, f"nvidia-smi says GPU {index} ({name}) has more free memory "
                          f"({free_mib} MiB) than total ({total_mib} MiB): counting the total")
            free = total
        gpus.append(Gpu(index, name, "nvidia", total, free, uuid))
    if stray:
        more = f" (and {len(stray) - 1} more lines)" if len(stray) > 1 else ""
        _note(errors, f"nvidia-smi printed something that is not a GPU row: "
                      f"{_snippet(stray[0])}{more}")
    return gpus


_ROCM_NAME_KEYS = ("card series", "device name", "card model", "card sku")


def parse_rocm_smi(json_text: str, errors: list[str] | None = None) -> list[Gpu]:
    """GPUs from `rocm-smi --showmeminfo vram --showproductname --json`: {"card0": {"VRAM Total
    Memory (B)": "...", "VRAM Total Used Memory (B)": "...", "Card Series": "..."}, ...}. Key
    case differs between versions ("Card series" before 2024), warnings may precede the JSON."""
    start = json_text.find("{")
    if start < 0:
        _note(errors, f"rocm-smi printed no JSON: {_snippet(json_text)}")
        return []
    try:
        data, _ = json.JSONDecoder().raw_decode(json_text, start)
    except (ValueError, RecursionError):
        _note(errors, f"rocm-smi printed JSON that does not parse: {_snippet(json_text[start:])}")
        return []
    if not isinstance(data, dict):
        _note(errors, "rocm-smi printed JSON that is not an object of cards")
        return []
    gpus: list[Gpu] = []
    for key, card in data.items():
        match = re.fullmatch(r"card(\d{1,4})", str(key))
        if match is None:
            continue  # "system" and other summaries
        index = int(match[1])
        if not isinstance(card, dict):
            _note(errors, f"rocm-smi's entry for {key} is not an object; it is left out")
            continue
        fields = {str(k).strip().lower(): v for k, v in card.items()}
        name = next((_clean(v) for k in _ROCM_NAME_KEYS
                     if isinstance(v := fields.get(k), str) and _clean(v)
                     and _clean(v).upper() != "N/A"), f"AMD GPU {index}")
        uuid = next((_clean(v) for k in ("unique id", "guid")
                     if isinstance(v := fields.get(k), str) and _clean(v).upper() != "N/A"), "")
        total = _int(fields.get("vram total memory (b)"))
        used = _int(fields.get("vram total used memory (b)"))
        if total is None or used is None:
            _note(errors, f"rocm-smi reports no VRAM figures for {key} ({name}); it is left out")
            continue
        if not 0 < total <= MAX_GPU_BYTES:
            _note(errors, f"rocm-smi says {key} ({name}) has {total} bytes of VRAM, which "
                          "cannot be right; it is left out")
            continue
        if used > total:
            _note(errors, f"rocm-smi says {key} ({name}) uses more VRAM than it has: "
                          "counting none free")
            used = total
        gpus.append(Gpu(index, name, "amd", total, total - used, uuid))
    if not gpus and not any(re.fullmatch(r"card\d{1,4}", str(k)) for k in data):
        _note(errors, "rocm-smi listed no cards")
    return gpus


def _key_values(text: str, sep: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, found, rest = line.partition(sep)
        number = _int(rest.strip().rstrip(".")) if found else None
        if number is not None:
            values.setdefault(key.strip().strip('"'), number)
    return values


def parse_sysctl_darwin(sysctl_text: str, vm_stat_text: str = "",
                        errors: list[str] | None = None) -> DarwinMemory:
    """macOS: `sysctl hw.memsize hw.ncpu hw.pagesize` and `vm_stat`. Available RAM counts free,
    inactive and speculative pages (as psutil does, plus speculative), best effort."""
    sysctl = _key_values(sysctl_text, ":")
    total = sysctl.get("hw.memsize", 0)
    cores = sysctl.get("hw.ncpu", 0)
    if not 0 < total <= MAX_RAM_BYTES:
        _note(errors, "sysctl did not report hw.memsize: the node's RAM is unknown")
        total = 0
    if not 0 < cores <= MAX_CORES:
        cores = 0
    pages = _key_values(vm_stat_text, ":")
    size_match = re.search(r"page size of (\d{1,9}) bytes", vm_stat_text)
    page_size = int(size_match[1]) if size_match else sysctl.get("hw.pagesize", 4096)
    counted = [pages.get(k) for k in ("Pages free", "Pages inactive", "Pages speculative")]
    if total and counted[0] is None:
        _note(errors, "vm_stat did not report free pages: the node's available RAM is unknown")
        return DarwinMemory(cores, total, 0)
    available = min(total, sum(c or 0 for c in counted) * max(page_size, 1))
    return DarwinMemory(cores, total, available)


def parse_cgroup_memory(text: str) -> CgroupMemory | None:
    """The probe's cgroup section: `v1|v2`, `limit N|max`, `usage N`, `inactive_file N`."""
    lines = text.split("\n")
    version = lines[0].strip()
    if version not in ("v1", "v2"):
        return None
    values: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.strip().partition(" ")
        values.setdefault(key, value.strip())
    usage = _int(values.get("usage")) or 0
    limit = _int(values.get("limit"))
    inactive = _int(values.get("inactive_file")) or 0
    if limit is not None and not 0 < limit <= MAX_RAM_BYTES:
        limit = None  # v1 writes "no limit" as 9223372036854771712
    return CgroupMemory(version, limit, usage, inactive)


# ---- the one round trip ------------------------------------------------------------------------

# `now` prints the node's wall clock: GNU date has %N; BSD/macOS date prints a literal N, so try
# perl's Time::HiRes (on every macOS), then whole seconds marked with " s".
_SCRIPT = r"""export LC_ALL=C
__PATH__m=__MARKER__
sec() { echo "@@$m $1"; }
now() {
  t=$(date +%s.%N 2>/dev/null)
  case $t in
    ''|*[!0-9.]*|*.|.*) t=$(perl -MTime::HiRes=time -e 'printf "%.6f\n", time' 2>/dev/null)
      case $t in ''|*[!0-9.]*) t="$(date +%s 2>/dev/null) s";; esac;;
  esac
  echo "$t"
}
tool() {
  command -v "$1" 2>/dev/null && return 0
  for p in $2; do [ -x "$p" ] && { echo "$p"; return 0; }; done
  return 1
}
to=; command -v timeout >/dev/null 2>&1 && to="timeout __TOOL_TIMEOUT__"
{
sec clock-start; now
u=$(uname -s -m 2>&1)
sec uname; echo "$u"
sec cores; getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null || sysctl -n hw.ncpu 2>&1
if [ "${u%% *}" = Darwin ]; then
  sec darwin-sysctl; sysctl hw.memsize hw.ncpu hw.pagesize 2>&1 | head -n 20
  sec darwin-vm-stat; vm_stat 2>&1 | head -n 60
else
  sec meminfo; head -n 200 /proc/meminfo 2>&1
  sec cgroup
  g=$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null | head -n 1)
  if [ -r "/sys/fs/cgroup$g/memory.max" ]; then
    d="/sys/fs/cgroup$g"
    echo v2; echo "limit $(cat "$d/memory.max")"; echo "usage $(cat "$d/memory.current")"
    sed -n 's/^inactive_file /inactive_file /p' "$d/memory.stat" 2>/dev/null
  elif [ -r /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    d=/sys/fs/cgroup/memory
    echo v1; echo "limit $(cat $d/memory.limit_in_bytes)"
    echo "usage $(cat $d/memory.usage_in_bytes)"
    sed -n 's/^total_inactive_file /inactive_file /p' $d/memory.stat 2>/dev/null
  fi
fi
__WORKER__
if x=$(tool nvidia-smi __NVIDIA_PLACES__); then
  out=$($to "$x" __NVIDIA_QUERY__ 2>&1); st=$?
  sec nvidia-smi; printf '%s\n' "$out" | head -c __SECTION_CAP__
  sec nvidia-smi-status; echo "$st"
fi
if x=$(tool rocm-smi __ROCM_PLACES__); then
  out=$($to "$x" __ROCM_QUERY__ 2>&1); st=$?
  sec rocm-smi; printf '%s\n' "$out" | head -c __SECTION_CAP__
  sec rocm-smi-status; echo "$st"
fi
sec clock-end; now
sec end
} 2>&1 | head -c __TOTAL_CAP__ | {
  if command -v od >/dev/null 2>&1; then echo "@@$m hex"; od -An -v -tx1
  else echo "@@$m text"; tr -cd '\11\12\15\40-\176'; fi
}
"""

# The lookup runs in a subshell: it may `exit` after printing `TORBIZ error WORD`.
_WORKER = """sec worker
(
__RESOLVE__
printf '%s\\n' "$bin"
) 2>&1 | head -n 5"""


def probe_script(marker: str, resolve: str | None, extra_path: str | None = None) -> str:
    """The probe's sh text. `resolve`: sh that sets $bin (llama_rpc), None to skip the worker.
    `extra_path` is put in front of PATH (tests' stand-in tools, or /opt/... on odd nodes)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", marker):
        raise ValueError("the section marker must be hex")
    worker = _WORKER.replace("__RESOLVE__", resolve) if resolve is not None else ""
    path = f'PATH={quote(extra_path)}:"$PATH"; export PATH\n' if extra_path else ""
    subs = {
        "__PATH__": path,
        "__MARKER__": marker,
        "__TOOL_TIMEOUT__": str(TOOL_TIMEOUT_S),
        "__NVIDIA_PLACES__": quote(" ".join(_NVIDIA_PLACES)),
        "__ROCM_PLACES__": quote(" ".join(_ROCM_PLACES)),
        "__NVIDIA_QUERY__": " ".join(quote(a) for a in NVIDIA_QUERY),
        "__ROCM_QUERY__": " ".join(quote(a) for a in ROCM_QUERY),
        "__SECTION_CAP__": str(_SECTION_CAP),
        "__TOTAL_CAP__": str(_TOTAL_CAP),
        "__WORKER__": worker,
    }
    # One pass: text put in (a path, the lookup) is never searched for placeholders again.
    return re.sub(r"__[A-Z_]+__", lambda m: subs[m[0]], _SCRIPT)


def decode_answer(stdout: str, marker: str) -> dict[str, str] | None:
    """The sections of the probe's answer, or None when it is not a probe answer at all."""
    head, _, body = stdout.partition("\n")
    if head.strip() == f"@@{marker} hex":
        try:
            raw = bytes.fromhex("".join(body.split()))
        except ValueError:
            return None
        text = raw.decode("utf-8", "replace")
    elif head.strip() == f"@@{marker} text":
        text = body
    else:
        return None
    sections: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    prefix = f"@@{marker} "
    for line in text.split("\n"):
        if line.startswith(prefix):
            if name is not None:
                sections.setdefault(name, "\n".join(lines))
            name, lines = line[len(prefix):].strip(), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        sections.setdefault(name, "\n".join(lines))
    return sections


def _node_time(text: str | None, errors: list[str]) -> tuple[float | None, float]:
    """(seconds since the epoch, resolution) from `now`'s line; whole seconds are centred."""
    word = (text or "").strip()
    coarse = word.endswith(" s")
    word = word.removesuffix(" s").strip()
    if not re.fullmatch(r"\d{1,12}(\.\d{1,12})?", word):
        if text is not None:
            errors.append(f"the node's clock could not be read (date printed {_snippet(word)})")
        return None, 0.0
    value = float(word)
    if coarse:
        return value + 0.5, 1.0  # date +%s truncates: the true time is within the next second
    return value, 1e-9 if "." in word and len(word.split(".")[1]) >= 9 else 1e-6


def _tool_gpus(tool: str, sections: dict[str, str], errors: list[str]) -> list[Gpu]:
    if tool not in sections:
        return []
    output = sections[tool]
    status_text = sections.get(f"{tool}-status")  # absent when the answer was cut short
    status = _int(status_text) if status_text is not None else 0
    found: list[str] = []
    gpus = (parse_nvidia_smi(output, found) if tool == "nvidia-smi"
            else parse_rocm_smi(output, found))
    if status == 0:
        errors.extend(found)
    elif status == 124:
        errors.append(f"{tool} did not answer within {TOOL_TIMEOUT_S} s (a hung driver?); "
                      "its GPUs are left out")
    elif not gpus:
        errors.append(f"{tool} failed (exit {status if status is not None else '?'}): "
                      f"{_snippet(output)}; its GPUs are left out")
    else:
        errors.extend(found)
        errors.append(f"{tool} exited with status {status}; only the GPUs it listed are used")
    return gpus


def _cores(text: str | None, fallback: int, errors: list[str]) -> int:
    value = _int((text or "").strip().split("\n")[0])
    if value is None or not 0 < value <= MAX_CORES:
        if fallback:
            return fallback
        errors.append(f"the number of cores could not be read (got {_snippet(text or '')})")
        return 0
    return value


def _ram(sections: dict[str, str], errors: list[str]) -> tuple[int, int, str]:
    if "darwin-sysctl" in sections:
        mem = parse_sysctl_darwin(sections["darwin-sysctl"], sections.get("darwin-vm-stat", ""),
                                  errors)
        return mem.ram_total_bytes, mem.ram_available_bytes, "sysctl" if mem.ram_total_bytes else ""
    if "meminfo" not in sections:
        errors.append("the node's memory was not read (neither /proc/meminfo nor sysctl)")
        return 0, 0, ""
    total, available = parse_meminfo(sections["meminfo"], errors)
    cgroup = parse_cgroup_memory(sections.get("cgroup", ""))
    if not total or cgroup is None or cgroup.limit_bytes is None or cgroup.limit_bytes >= total:
        return total, available, "meminfo" if total else ""
    # A container's limit bites before the machine runs out; its page cache is reclaimable.
    used = max(0, cgroup.usage_bytes - cgroup.inactive_file_bytes)
    limited = max(0, min(available, cgroup.limit_bytes - used))
    return cgroup.limit_bytes, limited, f"cgroup {cgroup.version}"


@dataclass(frozen=True)
class WorkerLookup:
    """How the probe finds an engine's worker program: sh that sets $bin (or prints
    "TORBIZ error WORD"), and the sentence for such a WORD."""

    resolve_sh: str
    explain: Callable[[str], str]


def _worker(text: str | None, lookup: WorkerLookup | None, errors: list[str]) -> str | None:
    if text is None:
        return None
    lines = [ln for ln in text.split("\n") if ln.strip()]
    first = lines[0].strip() if lines else ""
    if first.startswith("TORBIZ error"):
        word = first.removeprefix("TORBIZ error").strip()
        errors.append(lookup.explain(word) if lookup else f"worker lookup: {word}")
        return None
    if not first.startswith(("/", "~")) or not first.isprintable():
        errors.append(f"the worker binary lookup printed {_snippet(text)}")
        return None
    return first


async def probe_node(transport: Transport, *, timeout: float = 30.0,
                     extra_path: str | None = None,
                     worker: WorkerLookup | None = None) -> NodeProbe:
    """Everything the planner and the preflight need from one node, in one round trip;
    `worker` also finds the engine's worker program there."""
    node = transport.node
    marker = secrets.token_hex(8)
    script = probe_script(marker, worker.resolve_sh if worker else None, extra_path)
    t0 = time.time()
    p0 = time.perf_counter()
    result = await transport.run(script, timeout=timeout)
    elapsed = time.perf_counter() - p0  # monotonic: a clock step during the probe can't skew it
    errors: list[str] = []
    sections = decode_answer(result.stdout, marker)
    if sections is None:
        errors.append(f"the probe script gave no answer (exit {result.exit_status}): "
                      f"{_snippet(result.stderr or result.stdout)}")
        return NodeProbe(node.name, "", "", 0, 0, 0, (), 0.0, elapsed, None, None,
                         tuple(errors), 0.0, "")
    if "end" not in sections:
        errors.append("the probe's answer was cut short; some facts may be missing")

    start, resolution = _node_time(sections.get("clock-start"), errors)
    end, _ = _node_time(sections.get("clock-end"), [])
    dashboard_mid = t0 + elapsed / 2
    clock_offset, rtt = 0.0, elapsed
    if start is not None:
        if end is not None and resolution < 1.0 and 0 <= end - start <= elapsed:
            # The time the script ran on the node is no part of the network's round trip.
            clock_offset = (start + end) / 2 - dashboard_mid
            rtt = elapsed - (end - start)
        else:
            clock_offset = start - dashboard_mid

    uname = _clean(sections.get("uname", ""), 200).split()
    if len(uname) < 2:
        errors.append(f"uname printed {_snippet(sections.get('uname', ''))}: OS unknown")
    os_name, arch = (uname[0][:32], uname[1][:32]) if len(uname) >= 2 else ("", "")

    cores = _cores(sections.get("cores"),
                   parse_sysctl_darwin(sections["darwin-sysctl"]).cores
                   if "darwin-sysctl" in sections else 0, errors)
    ram_total, ram_available, ram_source = _ram(sections, errors)
    gpus = _tool_gpus("nvidia-smi", sections, errors) + _tool_gpus("rocm-smi", sections, errors)
    found = _worker(sections.get("worker"), worker, errors)
    return NodeProbe(
        node=node.name, os=os_name, arch=arch, cores=cores,
        ram_total_bytes=ram_total, ram_available_bytes=ram_available, gpus=tuple(gpus),
        clock_offset_s=clock_offset, rtt_s=rtt, worker_binary=found, worker_version=None,
        errors=tuple(errors), clock_resolution_s=resolution, ram_source=ram_source,
    )


async def probe_nodes(transports: Mapping[str, Transport],
                      lookups: Mapping[str, WorkerLookup | None] | None = None
                      ) -> dict[str, NodeProbe]:
    """Every node's probe, in parallel (node name -> its transport); the first node that cannot
    be reached raises its TransportError (str: "node: reason")."""
    names = list(transports)
    found = lookups or {}
    results = await asyncio.gather(*(probe_node(transports[name], worker=found.get(name))
                                     for name in names), return_exceptions=True)
    probes: dict[str, NodeProbe] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            raise result
        probes[name] = result
    return probes
