"""A GGUF's tensors as rpc-server's cache sees them: name, block, offset, size and the 64-bit
FNV-1a hash llama.cpp names cache files by (16 lowercase hex digits).

Hashing runs in C: tensor_tool.c compiled with the system cc at first use into the torbiz cache
(keyed by the source's hash) and called through ctypes, which releases the GIL, so tensors hash
in parallel threads. Without a C compiler there is no manifest: a sentence says to install cc
(a byte loop in Python is hundreds of times too slow for a model of gigabytes). A manifest is
kept as JSON keyed by the file's identity (path, size, mtime, inode)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from core.engines.llama_rpc.build import cache_root

# ggml-rpc.cpp HASH_THRESHOLD: only weight tensors strictly larger than this are hashed and
# looked up in the worker's cache; smaller ones always cross the network.
HASH_THRESHOLD = 10 * 1024 * 1024
TOOL_SOURCE = Path(__file__).with_name("tensor_tool.c")
MANIFEST_VERSION = 1
HEX16 = re.compile(r"^[0-9a-f]{16}$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class ManifestError(Exception):
    """A sentence for the operator."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    block: int | None  # blk.N -> N; None for the embedding and the output
    offset: int  # absolute, in the file
    size: int
    hash: str  # 16 lowercase hex digits

    @property
    def cacheable(self) -> bool:
        return self.size > HASH_THRESHOLD

    @property
    def part(self) -> str:
        """Where the tensor lives in llama.cpp's split: "input", "output" or "block N"."""
        if self.block is not None:
            return f"block {self.block}"
        return "input" if self.name.startswith("token_embd") else "output"


@dataclass(frozen=True)
class Manifest:
    path: str
    size: int
    n_layer: int
    tensors: tuple[TensorEntry, ...]

    def cacheable(self) -> list[TensorEntry]:
        return [t for t in self.tensors if t.cacheable]

    def by_hash(self) -> dict[str, TensorEntry]:
        return {t.hash: t for t in self.cacheable()}

    def for_span(self, first: int, count: int, last_block: bool) -> list[TensorEntry]:
        """The cacheable tensors a worker holding blocks first..first+count-1 receives; the
        output layer goes with the last block (llama.cpp puts it on that block's device)."""
        out = []
        for t in self.cacheable():
            in_span = t.block is not None and first <= t.block < first + count
            if in_span or (t.block is None and t.part == "output" and last_block):
                out.append(t)
        return out

    def to_json(self) -> dict[str, object]:
        return {"version": MANIFEST_VERSION, "path": self.path, "size": self.size,
                "n_layer": self.n_layer, "tensors": [asdict(t) for t in self.tensors]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Manifest:
        tensors = data["tensors"]
        assert isinstance(tensors, list)
        return cls(str(data["path"]), int(str(data["size"])), int(str(data["n_layer"])),
                   tuple(TensorEntry(**t) for t in tensors))


def tool_dir() -> Path:
    return cache_root() / "tensor-tool"


def _source_key() -> str:
    return hashlib.sha256(TOOL_SOURCE.read_bytes()).hexdigest()[:16]


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        target = tool_dir() / f"tensor_tool-{_source_key()}.so"
        if not target.is_file():
            cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if cc is None:
                raise ManifestError(
                    "no C compiler (cc) here to build the tensor hasher: install one (e.g. "
                    "apt-get install gcc); hashing a model in Python would take hours")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
            done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(partial),
                                   str(TOOL_SOURCE)], capture_output=True, text=True)
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                raise ManifestError(f"building the tensor hasher with {cc} failed: "
                                    f"{done.stderr.strip()[-300:]}")
            partial.replace(target)
        lib = ctypes.CDLL(str(target))
        lib.fnv1a_file.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64,
                                   ctypes.POINTER(ctypes.c_uint64)]
        lib.fnv1a_file.restype = ctypes.c_int
        _lib = lib
        return lib


def fnv1a_range(path: str | Path, offset: int, size: int) -> str:
    """The 16-hex FNV-1a 64 of size bytes of the file at offset (native speed)."""
    out = ctypes.c_uint64()
    err = _library().fnv1a_file(os.fsencode(str(path)), offset, size, ctypes.byref(out))
    if err:
        raise ManifestError(f"cannot read {path} at {offset} (+{size} bytes): "
                            f"{os.strerror(err)}")
    return f"{out.value:016x}"


def fnv1a_bytes(data: bytes) -> str:
    """For tests and tiny inputs only (a Python byte loop)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _identity(path: Path) -> tuple[str, int, str]:
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return key, st.st_size, hashlib.sha256(key.encode()).hexdigest()[:24]


def _layout(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    import gguf  # heavy; only when a manifest is computed

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(f"{_arch(reader)}.block_count")
    n_layer = int(field.parts[field.data[0]][0]) if field is not None else 0
    return n_layer, [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]


def _arch(reader: object) -> str:
    fields = reader.fields  # type: ignore[attr-defined]
    arch = fields.get("general.architecture")
    if arch is None:
        return "llama"
    return bytes(arch.parts[arch.data[0]]).decode()


def compute_manifest(path: Path, workers: int | None = None) -> Manifest:
    """Every tensor's hash; the cacheable ones in parallel, the small ones too (cheap)."""
    n_layer, layout = _layout(path)
    size = path.stat().st_size
    _library()  # build before the threads start
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        # Largest first, so the pool does not end waiting on one big tensor.
        order = sorted(range(len(layout)), key=lambda i: -layout[i][2])
        hashes = dict(zip(order, pool.map(
            lambda i: fnv1a_range(path, layout[i][1], layout[i][2]), order), strict=True))
    tensors = []
    for i, (name, offset, nbytes) in enumerate(layout):
        match = _BLOCK.match(name)
        tensors.append(TensorEntry(name, int(match.group(1)) if match else None, offset,
                                   nbytes, hashes[i]))
    return Manifest(str(path.resolve()), size, n_layer, tuple(tensors))


def manifest_cache_dir() -> Path:
    return cache_root() / "manifests"


def load_manifest(path: Path | str) -> Manifest:
    """The model's manifest, from the cache when the file is unchanged (path, size, mtime,
    inode), else computed and stored."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"model file {path} does not exist")
    key, _, digest = _identity(path)
    stored = manifest_cache_dir() / f"{digest}.json"
    try:
        data = json.loads(stored.read_text())
        if data.get("version") == MANIFEST_VERSION and data.get("key") == key:
            return Manifest.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        pass
    manifest = compute_manifest(path)
    stored.parent.mkdir(parents=True, exist_ok=True)
    data = manifest.to_json() | {"key": key}
    # A name of its own per writer: two threads (or two supervisors) of one process may store
    # the same manifest at once; the last rename wins, each file is whole.
    partial = stored.with_name(f".{stored.name}.{os.getpid()}.{secrets.token_hex(4)}")
    partial.write_text(json.dumps(data))
    partial.replace(stored)
    return manifest
