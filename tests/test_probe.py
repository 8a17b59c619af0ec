"""The node probe: parsers on recorded outputs (no GPU here), the CPU path for real over a local
and an SSH transport, and the GPU plumbing end to end with stand-in vendor tools that print
recorded outputs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import NodeConfig, SshOptions
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.doctor import CLOCK_TOLERANCE_S
from core.engines.llama_rpc.rpc import resolve_binary_sh, worker_lookup
from core.engines.petals.engine import PetalsEngine
from core.reach import probe
from core.reach.probe import (
    Gpu,
    decode_answer,
    parse_cgroup_memory,
    parse_meminfo,
    parse_nvidia_smi,
    parse_rocm_smi,
    parse_sysctl_darwin,
    probe_node,
    probe_script,
)
from core.reach.transport import LocalTransport, SshTransport, Transport, TransportError

DATA = Path(__file__).parent / "data" / "probe"
MIB = 1024 * 1024
NVIDIA_ARGS = "--query-gpu=index,name,uuid,memory.total,memory.free --format=csv,noheader,nounits"
ROCM_ARGS = "--showmeminfo vram --showproductname --json"
CACHED_WORKER = Path.home() / ".cache/torbiz/llama.cpp-0.3.36/bin/ggml-rpc-server"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


# ---- nvidia-smi ---------------------------------------------------------------------------------

def test_nvidia_one_gpu() -> None:
    errors: list[str] = []
    assert parse_nvidia_smi(recorded("nvidia_smi_1gpu.csv"), errors) == [
        Gpu(0, "NVIDIA GeForce RTX 4090", "nvidia", 24564 * MIB, 23817 * MIB,
            "GPU-5f2b0e6c-8d1e-4a3f-b7c2-91e0d4a6f318")]
    assert errors == []


def test_nvidia_four_gpus() -> None:
    errors: list[str] = []
    gpus = parse_nvidia_smi(recorded("nvidia_smi_4gpu.csv"), errors)
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert {g.name for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert all(g.vendor == "nvidia" and g.total_bytes == 81920 * MIB for g in gpus)
    assert [g.free_bytes // MIB for g in gpus] == [81050, 41212, 81050, 3]
    assert len({g.uuid for g in gpus}) == 4
    assert errors == []


@pytest.mark.parametrize(("name", "words"), [
    ("nvidia_smi_no_devices.txt", "'No devices were found'"),
    ("nvidia_smi_driver_error.txt", "couldn't communicate with the NVIDIA driver"),
])
def test_nvidia_without_gpus_says_why(name: str, words: str) -> None:
    errors: list[str] = []
    assert parse_nvidia_smi(recorded(name), errors) == []
    assert len(errors) == 1 and words in errors[0]


def test_nvidia_keeps_healthy_gpus_next_to_an_error_line() -> None:
    errors: list[str] = []
    gpus = parse_nvidia_smi(recorded("nvidia_smi_partial.csv"), errors)
    assert [(g.index, g.name, g.total_bytes) for g in gpus] == [
        (1, "NVIDIA GeForce RTX 3090", 24576 * MIB)]
    assert len(errors) == 1 and "Unable to determine the device handle" in errors[0]


def test_nvidia_memory_not_reported_leaves_the_gpu_out() -> None:
    errors: list[str] = []
    assert parse_nvidia_smi(recorded("nvidia_smi_na.csv"), errors) == []
    assert errors == ["nvidia-smi reports no memory figures for GPU 0 (Orin (nvgpu)): total "
                      "'[N/A]', free '[N/A]'; it is left out"]


def test_nvidia_absurd_and_hostile_rows() -> None:
    errors: list[str] = []
    text = ("0, Huge, GPU-a, 99999999999, 5\n"
            "1, Odd, GPU-b, 1024, 2048\n"
            "2, \x1b[31mEvil, Inc\x1b[0m\x07, GPU-c, 4096, 1024\n"
            "-1, Neg, GPU-d, 10, 5\n"
            "9999999, Big index, GPU-e, 10, 5\n"
            "garbage\n, , , , \n")
    gpus = parse_nvidia_smi(text, errors)
    assert [(g.index, g.name, g.total_bytes, g.free_bytes) for g in gpus] == [
        (1, "Odd", 1024 * MIB, 1024 * MIB),  # free capped at total
        (2, "Evil, Inc", 4096 * MIB, 1024 * MIB),  # escape sequences removed whole
    ]
    assert any("99999999999 MiB, which cannot be right" in e for e in errors)
    assert any("more free memory (2048 MiB) than total (1024 MiB)" in e for e in errors)
    assert any("not a GPU row: '-1, Neg, GPU-d, 10, 5' (and 3 more lines)" in e for e in errors)


# ---- rocm-smi -----------------------------------------------------------------------------------

def test_rocm_one_card() -> None:
    errors: list[str] = []
    assert parse_rocm_smi(recorded("rocm_smi_1card.json"), errors) == [
        Gpu(0, "Navi 31 [Radeon RX 7900 XT/7900 XTX]", "amd", 25753026560,
            25753026560 - 1459634176, "45068")]
    assert errors == []


def test_rocm_two_cards_old_key_names_after_a_warning() -> None:
    errors: list[str] = []
    gpus = parse_rocm_smi(recorded("rocm_smi_2cards_old_keys.txt"), errors)
    assert [(g.index, g.name, g.vendor) for g in gpus] == [
        (0, "Aldebaran/MI200 [Instinct MI210]", "amd"),
        (1, "Aldebaran/MI200 [Instinct MI210]", "amd")]
    assert [g.free_bytes for g in gpus] == [68702699520 - 11534336, 68702699520 - 34376515584]
    assert errors == []


@pytest.mark.parametrize(("text", "words"), [
    ("", "printed no JSON"),
    ("ERROR: No DRM devices available. Exiting\n", "No DRM devices"),
    ('{"card0": {"VRAM Total Memory (B)": "1"', "does not parse"),
    ("[" * 100000, "printed no JSON"),
    ("{" + '"a":[' * 100000, "does not parse"),
    ("[1, 2]\n{}", "listed no cards"),
    ('{"system": {"Driver version": "6.8"}}', "listed no cards"),
    ('{"card0": "x"}', "is not an object"),
    ('{"card0": {"Card Series": "X"}}', "no VRAM figures for card0 (X)"),
    ('{"card0": {"VRAM Total Memory (B)": "0", "VRAM Total Used Memory (B)": "0"}}',
     "0 bytes of VRAM"),
    ('{"card0": {"VRAM Total Memory (B)": "10", "VRAM Total Used Memory (B)": "20"}}',
     "uses more VRAM than it has"),
])
def test_rocm_garbage_becomes_sentences(text: str, words: str) -> None:
    errors: list[str] = []
    parse_rocm_smi(text, errors)
    assert any(words in e for e in errors), errors


def test_rocm_name_falls_back_without_product_fields() -> None:
    text = json.dumps({"card3": {"VRAM Total Memory (B)": "1073741824",
                                 "VRAM Total Used Memory (B)": "0", "Card Series": "N/A"}})
    assert parse_rocm_smi(text) == [Gpu(3, "AMD GPU 3", "amd", 1 << 30, 1 << 30)]


# ---- RAM ----------------------------------------------------------------------------------------

def test_meminfo_of_this_machine() -> None:
    text = recorded("meminfo_this_machine.txt")
    fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()}
    assert parse_meminfo(text) == (fields["MemTotal"] * 1024, fields["MemAvailable"] * 1024)


def test_meminfo_without_memavailable_uses_free_buffers_cached() -> None:
    errors: list[str] = []
    assert parse_meminfo(recorded("meminfo_no_available.txt"), errors) == (
        8061372 * 1024, (1213420 + 263512 + 4867264) * 1024)
    assert errors == []


@pytest.mark.parametrize(("text", "expected", "words"), [
    ("", (0, 0), "has no MemTotal line"),
    ("\xff\xfe garbage\n\x00", (0, 0), "has no MemTotal line"),
    ("MemTotal: lots kB\n", (0, 0), "has no MemTotal line"),
    ("MemTotal: 0 kB\n", (0, 0), "says MemTotal is 0 bytes"),
    ("MemTotal: 99999999999999999 kB\n", (0, 0), "says MemTotal is"),
    ("MemTotal: 1000 kB\n", (1024000, 0), "neither MemAvailable nor MemFree"),
    ("MemTotal: 1000 kB\nMemAvailable: 5000 kB\n", (1024000, 1024000), "5120000 bytes available"),
])
def test_meminfo_garbage(text: str, expected: tuple[int, int], words: str) -> None:
    errors: list[str] = []
    assert parse_meminfo(text, errors) == expected
    assert len(errors) == 1 and words in errors[0]


def test_darwin_sysctl_and_vm_stat() -> None:
    mem = parse_sysctl_darwin(recorded("darwin_sysctl.txt"), recorded("darwin_vm_stat.txt"))
    assert mem.cores == 12
    assert mem.ram_total_bytes == 34359738368
    assert mem.ram_available_bytes == (5532 + 623125 + 10560) * 16384


def test_darwin_garbage() -> None:
    errors: list[str] = []
    mem = parse_sysctl_darwin("hw.memsize: lots\n", "nonsense", errors)
    assert (mem.cores, mem.ram_total_bytes, mem.ram_available_bytes) == (0, 0, 0)
    assert errors == ["sysctl did not report hw.memsize: the node's RAM is unknown"]
    errors.clear()
    mem = parse_sysctl_darwin(recorded("darwin_sysctl.txt"), "", errors)
    assert mem.ram_available_bytes == 0 and "vm_stat did not report free pages" in errors[0]


def test_cgroup_sections() -> None:
    limited = parse_cgroup_memory(recorded("cgroup_v2_limited.txt"))
    assert limited == probe.CgroupMemory("v2", 4 << 30, 3 << 30, 1 << 30)
    unlimited = parse_cgroup_memory(recorded("cgroup_v1_unlimited.txt"))
    assert unlimited is not None and unlimited.limit_bytes is None
    assert parse_cgroup_memory("v2\nlimit max\nusage 5\n") == probe.CgroupMemory("v2", None, 5, 0)
    assert parse_cgroup_memory("") is None and parse_cgroup_memory("v9\n") is None


# ---- garbage never raises -----------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=30), inner, max_size=4), max_leaves=20)
_cell = st.sampled_from(["0", "1", "17", "-3", "[N/A]", "24564", "99999999999", "", " x ",
                         "GPU-1", "\x1b[2J", "\udcff", "1e9", "٣"])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.lists(st.lists(_cell, min_size=1, max_size=7), max_size=6),
       _json)
def test_parsers_never_raise(text: str, rows: list[list[str]], doc: object) -> None:
    csv_text = "\n".join(", ".join(r) for r in rows)
    for parse in (parse_nvidia_smi, parse_rocm_smi):
        for source in (text, csv_text, json.dumps(doc), json.dumps({"card0": doc})):
            errors: list[str] = []
            for gpu in parse(source, errors):
                assert 0 <= gpu.free_bytes <= gpu.total_bytes <= probe.MAX_GPU_BYTES
                assert gpu.total_bytes > 0 and gpu.index >= 0
            assert all(isinstance(e, str) and e for e in errors)
    total, available = parse_meminfo(text + "\n" + csv_text)
    assert 0 <= available <= total
    mem = parse_sysctl_darwin(text, text)
    assert 0 <= mem.ram_available_bytes <= mem.ram_total_bytes
    parse_cgroup_memory(text)
    decode_answer(text, "ab12cd34")


# ---- the script and its answer ------------------------------------------------------------------

def test_script_is_valid_sh_and_refuses_a_bad_marker() -> None:
    node = NodeConfig(name="n", host="h")
    script = probe_script("0123abcd0123abcd", resolve_binary_sh(node), "/opt/x y;z__WORKER__")
    subprocess.run(["sh", "-n", "-c", script], check=True)
    assert "PATH='/opt/x y;z__WORKER__':\"$PATH\"" in script
    with pytest.raises(ValueError):
        probe_script("$(reboot)", None)


def test_answer_sections_cannot_be_faked_by_tool_output() -> None:
    marker = "00112233aabbccdd"
    text = (f"@@{marker} worker\n/usr/bin/rpc-server\n"
            f"@@{marker} nvidia-smi\n@@ worker\n@@00000000 worker\n/tmp/evil\n"
            f"@@{marker} end\n")
    answer = f"@@{marker} hex\n" + " ".join(f"{b:02x}" for b in text.encode())
    sections = decode_answer(answer, marker)
    assert sections == {"worker": "/usr/bin/rpc-server",
                        "nvidia-smi": "@@ worker\n@@00000000 worker\n/tmp/evil", "end": ""}
    assert decode_answer("@@ffffffffffffffff hex\n00", marker) is None
    assert decode_answer(f"@@{marker} hex\nzz", marker) is None


# ---- the real CPU path --------------------------------------------------------------------------

def local_transport(**node: object) -> LocalTransport:
    return LocalTransport(NodeConfig(name="here", host="127.0.0.1", transport="local",
                                     **node))  # type: ignore[arg-type]


def ssh_transport(sshd, **node: object) -> SshTransport:
    first = sshd.nodes[0]
    return SshTransport(NodeConfig(
        name="remote", host=first.host, ssh_port=first.port,
        ssh=SshOptions(user="root", identity_file=str(sshd.client_key),
                       known_hosts=str(sshd.known_hosts), config_file=None),
        **node))  # type: ignore[arg-type]


def assert_this_machine(result: probe.NodeProbe) -> None:
    assert result.os == os.uname().sysname and result.arch == os.uname().machine
    assert result.cores == os.cpu_count()
    memory = psutil.virtual_memory()
    assert result.ram_source in ("meminfo", "cgroup v1", "cgroup v2")
    if result.ram_source == "meminfo":
        assert abs(result.ram_total_bytes - memory.total) <= memory.total * 0.01
        assert abs(result.ram_available_bytes - memory.available) <= memory.total * 0.1
    assert 0 < result.ram_available_bytes <= result.ram_total_bytes
    assert result.gpus == ()
    # This machine against itself: never as far off as the preflight refuses (a loaded box
    # delays the script between its clock reads by tenths of a second).
    assert abs(result.clock_offset_s) < CLOCK_TOLERANCE_S
    assert result.clock_resolution_s < 1e-3
    assert 0 <= result.rtt_s < 5
    assert result.worker_version is None


async def test_local_probe_of_this_machine() -> None:
    transport = local_transport()
    result = await probe_node(transport, worker=worker_lookup(transport.node, True))
    assert_this_machine(result)
    assert result.errors == ()
    expected = find_cached_binary("ggml-rpc-server")
    if expected is None:
        pytest.skip("no cached llama.cpp build: the worker lookup is not checked")
    assert result.worker_binary == str(expected)


async def test_ssh_probe_of_a_real_node(sshd_cluster) -> None:
    transport = ssh_transport(sshd_cluster(count=1))
    try:
        await transport.connect()
        started = time.perf_counter()
        result = await probe_node(transport, worker=worker_lookup(transport.node, False))
        elapsed = time.perf_counter() - started
    finally:
        await transport.close()
    assert result.node == "remote"
    assert_this_machine(result)
    assert result.rtt_s <= elapsed < 5
    if not os.access(CACHED_WORKER, os.X_OK):
        pytest.skip(f"{CACHED_WORKER} missing: the worker lookup is not checked")
    assert result.errors == ()
    assert result.worker_binary == str(CACHED_WORKER)


async def test_unreachable_node_raises_transport_error(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    transport = SshTransport(NodeConfig(
        name="gone", host="127.0.0.1", ssh_port=1,
        ssh=SshOptions(user="root", known_hosts=str(known), config_file=None,
                       connect_timeout=2)))
    with pytest.raises(TransportError) as info:
        await probe_node(transport)
    assert info.value.node == "gone"


async def test_missing_worker_is_a_sentence_and_petals_nodes_skip_the_lookup() -> None:
    missing = local_transport(rpc_server="/nonexistent/rpc-server")
    result = await probe_node(missing, worker=worker_lookup(missing.node, True))
    assert result.worker_binary is None
    assert result.errors == ("rpc_server '/nonexistent/rpc-server' is not an executable file "
                             "there",)
    assert result.cores == os.cpu_count()
    petals_transport = local_transport(backend="petals")
    # the Petals engine has no worker program to look up (its python is the doctor's check)
    lookup = PetalsEngine.worker_lookup(None, petals_transport.node, True)  # type: ignore[arg-type]
    assert lookup is None
    petals = await probe_node(petals_transport, worker=lookup)
    assert petals.worker_binary is None and petals.errors == ()


# ---- GPUs end to end, with stand-in vendor tools that print recorded outputs -------------------

def stand_in(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def vendor_tool(directory: Path, name: str, args: str, recording: str, status: int = 0) -> None:
    """A stand-in that insists on the real query's arguments, then prints a recorded output."""
    stand_in(directory, name,
             f'[ "$*" = "{args}" ] || {{ echo "unexpected arguments: $*"; exit 2; }}\n'
             f"cat '{DATA / recording}'\nexit {status}")


@pytest.mark.parametrize("kind", ["local", "ssh"])
async def test_gpus_reach_the_probe_from_vendor_tools(tmp_path: Path, kind: str,
                                                      sshd_cluster) -> None:
    vendor_tool(tmp_path, "nvidia-smi", NVIDIA_ARGS, "nvidia_smi_4gpu.csv")
    vendor_tool(tmp_path, "rocm-smi", ROCM_ARGS, "rocm_smi_1card.json")
    transport: Transport = (local_transport() if kind == "local"
                            else ssh_transport(sshd_cluster(count=1)))
    try:
        result = await probe_node(transport, extra_path=str(tmp_path))
    finally:
        await transport.close()
    assert result.errors == ()
    assert [(g.vendor, g.index) for g in result.gpus] == [
        ("nvidia", 0), ("nvidia", 1), ("nvidia", 2), ("nvidia", 3), ("amd", 0)]
    assert result.gpus[:4] == tuple(parse_nvidia_smi(recorded("nvidia_smi_4gpu.csv")))
    assert result.gpus[4].name == "Navi 31 [Radeon RX 7900 XT/7900 XTX]"
    assert result.gpu_free_bytes == sum(g.free_bytes for g in result.gpus)
    assert result.cores == os.cpu_count()


async def test_driver_error_is_a_sentence_and_the_rest_still_counts(tmp_path: Path) -> None:
    vendor_tool(tmp_path, "nvidia-smi", NVIDIA_ARGS, "nvidia_smi_driver_error.txt", status=9)
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    assert result.gpus == ()
    assert result.errors == (
        "nvidia-smi failed (exit 9): \"NVIDIA-SMI has failed because it couldn't communicate "
        "with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and "
        "running.\"; its GPUs are left out",)
    assert result.cores == os.cpu_count() and result.ram_total_bytes > 0


async def test_partial_listing_keeps_healthy_gpus(tmp_path: Path) -> None:
    vendor_tool(tmp_path, "nvidia-smi", NVIDIA_ARGS, "nvidia_smi_partial.csv", status=15)
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    assert [g.name for g in result.gpus] == ["NVIDIA GeForce RTX 3090"]
    assert len(result.errors) == 2
    assert "Unable to determine the device handle" in result.errors[0]
    assert result.errors[1] == ("nvidia-smi exited with status 15; only the GPUs it listed "
                                "are used")


async def test_hostile_tool_output_over_ssh(tmp_path: Path, sshd_cluster) -> None:
    # Not UTF-8 (asyncssh would drop the whole answer), escapes, a faked section header.
    stand_in(tmp_path, "nvidia-smi",
             "printf '0, Evil\\377\\376 \\033]0;title\\007GPU, GPU-x, 8192, 4096\\n'\n"
             "printf '@@ worker\\n/tmp/evil\\n'\n"
             "head -c 3000 /dev/urandom")
    transport = ssh_transport(sshd_cluster(count=1))
    try:
        result = await probe_node(transport, extra_path=str(tmp_path))
    finally:
        await transport.close()
    assert [(g.index, g.total_bytes) for g in result.gpus] == [(0, 8192 * MIB)]
    assert "\x1b" not in result.gpus[0].name and "\x07" not in result.gpus[0].name
    assert "title" not in result.gpus[0].name  # the escape sequence goes whole
    assert result.gpus[0].name.startswith("Evil")
    assert result.worker_binary != "/tmp/evil"
    assert result.cores == os.cpu_count() and result.ram_total_bytes > 0
    assert any("not a GPU row" in e for e in result.errors)


async def test_a_worker_path_with_escapes_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "bin\x1b]0;owned\x07"
    odd.mkdir()
    binary = odd / "rpc-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    odd_node = local_transport(rpc_server=str(binary))
    result = await probe_node(odd_node, worker=worker_lookup(odd_node.node, True))
    assert result.worker_binary is None
    assert any("worker binary lookup printed" in e and "\x1b" not in e and "owned" not in e
               for e in result.errors), result.errors


async def test_hung_tool_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "TOOL_TIMEOUT_S", 1)
    stand_in(tmp_path, "nvidia-smi", "exec sleep 30")
    started = time.monotonic()
    result = await probe_node(local_transport(), extra_path=str(tmp_path), timeout=20)
    assert time.monotonic() - started < 10
    assert result.errors == ("nvidia-smi did not answer within 1 s (a hung driver?); its GPUs "
                             "are left out",)


async def test_whole_probe_timeout_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "TOOL_TIMEOUT_S", 30)
    # Short: LocalTransport waits for the killed script's children to let go of its pipes.
    stand_in(tmp_path, "nvidia-smi", "exec sleep 3")
    with pytest.raises(TransportError) as info:
        await probe_node(local_transport(), extra_path=str(tmp_path), timeout=1)
    assert info.value.kind == "timeout"


# ---- clocks and systems other than GNU/Linux ----------------------------------------------------

def bsd_date(directory: Path) -> None:
    """BSD date: %N is printed literally."""
    stand_in(directory, "date",
             'case "$1" in +%s.%N) echo "$(/bin/date +%s).N";; *) exec /bin/date "$@";; esac')


async def test_bsd_date_falls_back_to_perl(tmp_path: Path) -> None:
    bsd_date(tmp_path)
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    if subprocess.run(["perl", "-MTime::HiRes", "-e", "1"], check=False).returncode != 0:
        pytest.skip("perl with Time::HiRes missing")
    assert result.clock_resolution_s == 1e-6
    assert abs(result.clock_offset_s) < CLOCK_TOLERANCE_S and result.errors == ()


async def test_bsd_date_without_perl_reads_whole_seconds(tmp_path: Path) -> None:
    bsd_date(tmp_path)
    stand_in(tmp_path, "perl", "exit 127")
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    assert result.clock_resolution_s == 1.0
    assert abs(result.clock_offset_s) < CLOCK_TOLERANCE_S  # whole seconds, centred
    assert result.errors == ()


async def test_unreadable_clock_is_a_sentence(tmp_path: Path) -> None:
    stand_in(tmp_path, "date", "echo 'Tue Jan  1'")
    stand_in(tmp_path, "perl", "exit 127")
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    assert result.clock_offset_s == 0.0
    assert result.errors == ("the node's clock could not be read (date printed 'Tue Jan  1')",)


async def test_darwin_node_plumbing(tmp_path: Path) -> None:
    stand_in(tmp_path, "uname", 'echo "Darwin arm64"')
    stand_in(tmp_path, "sysctl",
             f'[ "$*" = "hw.memsize hw.ncpu hw.pagesize" ] || exit 2\n'
             f"cat '{DATA / 'darwin_sysctl.txt'}'")
    stand_in(tmp_path, "vm_stat", f"cat '{DATA / 'darwin_vm_stat.txt'}'")
    result = await probe_node(local_transport(), extra_path=str(tmp_path))
    assert (result.os, result.arch, result.ram_source) == ("Darwin", "arm64", "sysctl")
    assert result.ram_total_bytes == 34359738368
    assert result.ram_available_bytes == (5532 + 623125 + 10560) * 16384
    assert result.cores == os.cpu_count()  # getconf answers first; sysctl's hw.ncpu is a fallback
    assert result.errors == ()


def test_cgroup_limit_below_the_ram_wins() -> None:
    sections = {
        "meminfo": "MemTotal: 16777216 kB\nMemAvailable: 12582912 kB\n",
        "cgroup": recorded("cgroup_v2_limited.txt"),
    }
    errors: list[str] = []
    total, available, source = probe._ram(sections, errors)
    # 4 GiB limit, 3 GiB charged of which 1 GiB is reclaimable page cache: 2 GiB left.
    assert (total, available, source) == (4 << 30, 2 << 30, "cgroup v2")
    sections["cgroup"] = recorded("cgroup_v1_unlimited.txt")
    assert probe._ram(sections, errors) == (16 << 30, 12 << 30, "meminfo")
    assert errors == []
