"""Which weights the coordinator's CPU keeps a repacked copy of, by CPU feature: the rule the
planner counts (checked against real load logs in test_planner and test_load_log)."""

from __future__ import annotations

from pathlib import Path

from core.planning.placement import local_cpu_repack
from core.planning.repack import (
    NO_REPACK,
    WeightMatrix,
    cpu_repack,
    is_cpu_extra_buffer,
    matrix_of,
    parse_cpuinfo_flags,
)

# This project's machines (AMD EPYC, AVX-512 without AMX) and the Intel host of the AMX logs.
EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"}
XEON_AMX = EPYC | {"amx_bf16", "amx_tile", "amx_int8", "avx_vnni"}

F16 = WeightMatrix("F16", 256 * 512, 256 * 512 * 2)
Q4_0 = WeightMatrix("Q4_0", 256 * 512, 256 * 512 // 32 * 18)
Q8_0 = WeightMatrix("Q8_0", 256 * 512, 256 * 512 // 32 * 34)
F32 = WeightMatrix("F32", 256 * 512, 256 * 512 * 4)


def test_an_amd_cpu_repacks_q4_0_but_never_f16() -> None:
    rule = cpu_repack(EPYC, "x86_64")
    assert not rule.amx
    assert rule.copy_bytes(F16) == 0 and rule.copy_bytes(F32) == 0
    assert rule.copy_bytes(Q4_0) == Q4_0.n_bytes  # CPU_REPACK keeps the same bytes
    assert rule.copy_bytes(Q8_0) == 0  # x86 repacks Q8_0 only through AMX
    assert cpu_repack({"sse2"}, "x86_64") == NO_REPACK  # no AVX2: nothing


def test_amx_copies_f16_and_adds_its_compensation() -> None:
    rule = cpu_repack(XEON_AMX, "x86_64")
    assert rule.amx
    assert rule.copy_bytes(F16) == F16.n_bytes
    assert rule.copy_bytes(Q4_0) == Q4_0.n_bytes
    assert rule.copy_bytes(Q8_0) == Q8_0.n_bytes + Q8_0.values // 32 * 4  # an int32 per block
    assert rule.copy_bytes(F32) == 0
    assert not cpu_repack(EPYC | {"amx_tile"}, "x86_64").amx  # AMX-INT8 is the one it uses


def test_arm_and_unknown_cpus() -> None:
    arm = cpu_repack({"fp", "asimd", "asimddp", "i8mm"}, "aarch64")
    assert arm.copy_bytes(Q8_0) == Q8_0.n_bytes and arm.copy_bytes(F16) == 0
    assert cpu_repack({"fp", "asimd"}, "aarch64") == NO_REPACK  # NEON without dotprod/i8mm
    # Features that cannot be read: every feature the architecture can have (conservative).
    unknown = cpu_repack(None, "x86_64")
    assert unknown.amx and unknown.copy_bytes(Q4_0) == Q4_0.n_bytes


def test_cpuinfo_flags_and_no_repack(tmp_path: Path) -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 AVX512F\n\nprocessor\t: 1\n"
    assert parse_cpuinfo_flags(x86) == {"fpu", "avx2", "avx512f"}
    assert parse_cpuinfo_flags("processor : 0\nFeatures : fp asimd asimddp\n") == {
        "fp", "asimd", "asimddp"}
    assert parse_cpuinfo_flags("nothing here\n") is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(x86)
    assert local_cpu_repack((), cpuinfo).copy_bytes(Q4_0) == Q4_0.n_bytes
    # llama-server told not to repack keeps no copy, whatever the CPU.
    for flag in ("-nr", "--no-repack", "--no_repack"):
        assert local_cpu_repack(("-t", "2", flag), cpuinfo) == NO_REPACK
    assert local_cpu_repack() is not None  # this machine's own /proc/cpuinfo reads


def test_extra_buffer_names_and_matrices() -> None:
    for name in ("AMX", "CPU_REPACK", "CPU_KLEIDIAI", "CPU_RISCV64_SPACEMIT", "CPU_NEW_REPACK"):
        assert is_cpu_extra_buffer(name)
    for name in ("CPU", "CPU_Mapped", "CUDA0", "CUDA_Host", "RPC0[127.0.0.1:50052]"):
        assert not is_cpu_extra_buffer(name)
    assert matrix_of("F32", [256], 1024) is None  # a norm
    assert matrix_of("F32", [256, 1], 1024) is None
    assert matrix_of("Q4_0", [256, 512], 73728) == WeightMatrix("Q4_0", 131072, 73728)
