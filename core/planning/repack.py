"""The second copy of weights the coordinator's own CPU keeps. llama.cpp's CPU backend moves the
matrices it has faster kernels for into an "extra" buffer, repacked in RAM, while the model file
stays memory-mapped beside it: `AMX` on Intel CPUs with AMX, `CPU_REPACK` where quantized blocks
are interleaved for AVX2/AVX-512/NEON/RVV, `CPU_KLEIDIAI` on Arm builds with KleidiAI. Which
types, by CPU feature, as ggml-cpu decides it (llama.cpp of the llama-cpp-python 0.3.36 sdist:
amx/amx.cpp, amx/mmq.cpp get_row_size, repack.cpp ggml_repack_get_optimal_repack_type).

Only the coordinator repacks: an rpc-server receives its tensors into a plain buffer. The rule
is conservative: every matrix (2 or more dimensions) of a listed type counts, whatever its
shape (llama.cpp also wants rows in multiples of 8 or 32), and a CPU whose features cannot be
read counts as one with every feature of its architecture.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import gguf

# ggml-cpu's extra buffer types: their bytes are a repacked copy on the coordinator's CPU.
CPU_EXTRA_BUFFERS = ("AMX", "CPU_REPACK", "CPU_KLEIDIAI", "CPU_RISCV64_SPACEMIT")


def is_cpu_extra_buffer(name: str) -> bool:
    """A buffer llama-server names in its load log that holds repacked CPU weights."""
    return name in CPU_EXTRA_BUFFERS or name.endswith("_REPACK")


# AMX (first in ggml's list, so it wins where it applies): type -> extra bytes per block of
# values, the compensation or scale its VNNI layout adds (F16 is copied as is).
_AMX_EXTRA = {"F16": 0, "Q4_0": 0, "Q4_1": 0, "Q8_0": 4, "Q4_K": 4, "Q5_K": 4, "Q6_K": 0,
              "IQ4_XS": 2}
# CPU_REPACK keeps the same bytes, interleaved; which types depends on the CPU's features.
_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_X86_AVX512 = frozenset({"Q2_K"})
_ARM_DOTPROD = frozenset({"Q1_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"})
_ARM_I8MM = frozenset({"Q1_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"})
_RISCV_V = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q8_0", "Q2_K"})
_S390_VXE = frozenset({"Q4_0"})


@dataclass(frozen=True)
class WeightMatrix:
    """One weight tensor of 2 or more dimensions: what a CPU may keep a repacked copy of."""

    type: str  # ggml type name: "F16", "Q4_0", ...
    values: int
    n_bytes: int


@dataclass(frozen=True)
class CpuRepack:
    """Which matrices this CPU keeps a second, repacked copy of."""

    amx: bool = False
    types: frozenset[str] = frozenset()  # repacked by CPU_REPACK (same size)

    def copy_bytes(self, matrix: WeightMatrix) -> int:
        if self.amx and matrix.type in _AMX_EXTRA:
            block = _block_values(matrix.type)
            return matrix.n_bytes + -(-matrix.values // block) * _AMX_EXTRA[matrix.type]
        return matrix.n_bytes if matrix.type in self.types else 0

    def repacked_bytes(self, matrices: Iterable[WeightMatrix]) -> int:
        return sum(self.copy_bytes(m) for m in matrices)

    @property
    def repacks(self) -> bool:
        return self.amx or bool(self.types)


NO_REPACK = CpuRepack()


def _block_values(type_name: str) -> int:
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]
    except KeyError:
        return 1


def cpu_repack(flags: Collection[str] | None, machine: str) -> CpuRepack:
    """The repack rule of a CPU from its feature flags (/proc/cpuinfo `flags`, `Features` or
    `isa`, lower case) and its architecture (platform.machine()). `flags` None: unknown, so
    every feature the architecture can have."""
    arch = machine.lower()
    x86 = arch in ("x86_64", "amd64", "i386", "i686", "x86")
    arm = arch in ("aarch64", "arm64") or arch.startswith("arm")
    riscv = arch.startswith("riscv")
    s390 = arch.startswith("s390")
    if flags is None:
        if x86:
            return CpuRepack(amx=True, types=_X86_AVX2 | _X86_AVX512)
        if arm:
            return CpuRepack(types=_ARM_DOTPROD | _ARM_I8MM)
        if riscv:
            return CpuRepack(types=_RISCV_V)
        if s390:
            return CpuRepack(types=_S390_VXE)
        return CpuRepack(amx=True, types=_X86_AVX2 | _X86_AVX512 | _ARM_DOTPROD | _ARM_I8MM
                         | _RISCV_V)
    have = {f.lower() for f in flags}
    types: set[str] = set()
    if x86:
        if "avx2" in have:
            types |= _X86_AVX2
        if "avx512f" in have:
            types |= _X86_AVX512
        amx = "amx_int8" in have and "avx512_vnni" in have
        return CpuRepack(amx=amx, types=frozenset(types))
    if arm:
        if "asimddp" in have or "dotprod" in have:
            types |= _ARM_DOTPROD
        if "i8mm" in have:
            types |= _ARM_I8MM
    elif riscv:
        # The RISC-V `isa` line is one word (rv64imafdcv_zvfh...): the vector extension is a
        # letter in it, so count it whenever the line is there at all.
        types |= _RISCV_V
    elif s390 and ("vxe" in have or "vxe2" in have):
        types |= _S390_VXE
    return CpuRepack(types=frozenset(types))


def parse_cpuinfo_flags(text: str) -> frozenset[str] | None:
    """The feature words of /proc/cpuinfo's first `flags` (x86), `Features` (Arm), `isa`
    (RISC-V) or `features` (s390) line; None when there is none."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features", "isa"):
            return frozenset(value.lower().split())
    return None


def matrix_of(type_name: str, shape: Iterable[int], n_bytes: int) -> WeightMatrix | None:
    """A WeightMatrix for a tensor with this shape, or None for a vector (a norm, a bias)."""
    dims = [int(d) for d in shape]
    if sum(1 for d in dims if d > 1) < 2:
        return None
    return WeightMatrix(type_name, math.prod(dims), n_bytes)
