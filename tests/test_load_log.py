"""The load log of the real llama-server (captured in tests/data/load_logs at -lv 4, one at
-lv 5) read into bytes and layers per worker; llama.cpp's split rule; garbage never raises."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.supervision.load_log import (
    HOST,
    MIB,
    LoadReport,
    llama_layer_split,
    load_progress,
    parse_load_log,
    tensor_split_for,
)
from tests.cluster_files import free_port, start_test_workers, stop_all, wait_for_load

DATA = Path(__file__).parent / "data" / "load_logs"
W1, W2, W3 = "127.0.0.1:51301", "127.0.0.1:51302", "127.0.0.1:51303"
KV_LAYER_8 = MIB // 4  # the 8-block demo model (n_embd 256, 2 KV heads of 64) at 512 cells


def lines(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8", errors="replace").splitlines()


def mib(value: float) -> int:
    return round(value * MIB)


# name: (flags it ran with, n_layer, {endpoint: (blocks, model MiB, KV MiB)}, offloaded)
Case = tuple[dict[str, Any], int, dict[str, tuple[int, float, float]], tuple[int, int]]
CASES: dict[str, Case] = {
    "rpc2_fit_default.log": ({"ts": None, "ngl": 99}, 8,
                             {W1: (5, 5.63, 1.25), W2: (3, 3.63, 0.75), HOST: (0, 0.25, 0)},
                             (9, 9)),
    "rpc2_colors.log": ({"ts": None, "ngl": 99}, 8,
                        {W1: (5, 5.63, 1.25), W2: (3, 3.63, 0.75), HOST: (0, 0.25, 0)}, (9, 9)),
    "rpc2_ts13_fit.log": ({"ts": (1, 3), "ngl": 99}, 8,
                          {W1: (3, 3.38, 0.75), W2: (5, 5.89, 1.25), HOST: (0, 0.25, 0)}, (9, 9)),
    "rpc2_ts13_nofit.log": ({"ts": (1, 3), "ngl": 99}, 8,
                            {W1: (3, 3.38, 0.75), W2: (5, 5.89, 1.25), HOST: (0, 0.25, 0)},
                            (9, 9)),
    "rpc2_ts27_nofit.log": ({"ts": (2, 7), "ngl": 99}, 8,
                            {W1: (2, 2.25, 0.50), W2: (6, 7.01, 1.50), HOST: (0, 0.25, 0)},
                            (9, 9)),
    "rpc2_ngl7_ts25_nofit.log": ({"ts": (2, 5), "ngl": 7}, 8,
                                 {W1: (2, 2.25, 0.50), W2: (4, 4.76, 1.00), HOST: (2, 2.50, 0.50)},
                                 (7, 9)),
    "rpc3_ts211_nofit.log": ({"ts": (2, 1, 1), "ngl": 99}, 12,
                             {W1: (7, 1.98, 0.88), W2: (3, 0.85, 0.38), W3: (2, 0.69, 0.25),
                              HOST: (0, 0.12, 0)}, (13, 13)),
    # --fit on with -fitt 24098,24098 and no -ngl: the fit moved four blocks to the CPU.
    "rpc2_fit_moved_to_cpu.log": ({"ts": None, "ngl": None}, 8,
                                  {W1: (2, 2.25, 0.50), W2: (2, 2.50, 0.50), HOST: (4, 4.76, 1.00)},
                                  (5, 9)),
    "cpu_only.log": ({"ts": None, "ngl": 99}, 8, {HOST: (8, 9.52, 2.00)}, (9, 9)),
    # An Intel CPU with AMX: the CPU's weights twice, an AMX (repacked) copy beside CPU_Mapped.
    "amx_cpu_only.log": ({"ts": None, "ngl": 0}, 8, {HOST: (8, 9.25 + 9.27, 2.00)}, (0, 9)),
    "amx_rpc2_ngl6_ts12_nofit.log": ({"ts": (1, 2), "ngl": 6}, 8,
                                     {"127.0.0.1:51111": (2, 2.25, 0.50),
                                      "127.0.0.1:51112": (3, 3.63, 0.75),
                                      HOST: (3, 3.38 + 2.88, 0.75)}, (6, 9)),
    # -lv 5: the --fit dry run prints a whole block of 0.00 MiB buffers first.
    "rpc2_lv5_trimmed.log": ({"ts": None, "ngl": 99}, 8,
                             {W1: (5, 5.63, 1.25), W2: (3, 3.63, 0.75), HOST: (0, 0.25, 0)},
                             (9, 9)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_captured_logs(name: str) -> None:
    _, _, expected, offloaded = CASES[name]
    report = parse_load_log(lines(name))
    assert report.finished and report.error == "" and report.stage == "ready"
    assert report.offloaded == offloaded
    assert [d.endpoint for d in report.devices] == list(expected)  # --rpc order, CPU last
    for endpoint, (blocks, model, kv) in expected.items():
        device = report.device(endpoint)
        assert device is not None
        assert device.layers == blocks, endpoint
        assert device.model_bytes == mib(model), endpoint
        assert device.kv_bytes == mib(kv), endpoint
        assert device.compute_bytes > 0
    assert sum(d.layers or 0 for d in report.devices) == CASES[name][1]


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c[0]["ts"]))
def test_split_rule_predicts_the_captured_placement(name: str) -> None:
    flags, n_layer, expected, _ = CASES[name]
    cpu, per_device, output = llama_layer_split(n_layer, flags["ts"], flags["ngl"])
    workers = [e for e in expected if e != HOST]
    assert per_device == tuple(expected[e][0] for e in workers)
    assert cpu == (expected[HOST][0] if HOST in expected else 0)
    assert output == len(workers) - 1


def test_ts_1_3_is_over_blocks_plus_output() -> None:
    # The output layer is one unit of the split: -ts 1,3 over 8 blocks is 3 + 5, and 2 + 6
    # needs -ts 2,7.
    assert llama_layer_split(8, (1, 3)) == (0, (3, 5), 1)
    assert tensor_split_for((2, 6)) == (9, (2, 7))
    assert llama_layer_split(8, (2, 7)) == (0, (2, 6), 1)
    # Two blocks on the coordinator's CPU: -ngl 7 leaves the first two there.
    assert tensor_split_for((2, 4)) == (7, (2, 5))
    assert llama_layer_split(8, (2, 5), 7) == (2, (2, 4), 1)
    assert llama_layer_split(8, (1, 0, 1))[1] == (5, 0, 3)  # a zero weight gets nothing


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(0, 20))
def test_tensor_split_for_places_exactly(blocks: list[int], on_cpu: int) -> None:
    ngl, ts = tensor_split_for(blocks)
    n_layer = sum(blocks) + on_cpu
    assert llama_layer_split(n_layer, ts, ngl) == (on_cpu, tuple(blocks), len(blocks) - 1)


def test_lv5_per_layer_lines_name_the_output_holder() -> None:
    report = parse_load_log(lines("rpc2_lv5_trimmed.log"))
    holders = {d.endpoint: d.holds_output for d in report.devices}
    assert holders == {W1: False, W2: True, HOST: False}
    # Without -lv 5 the log does not say.
    assert {d.holds_output for d in parse_load_log(lines("rpc2_fit_default.log")).devices} \
        == {None}


def test_repacked_cpu_buffers_are_the_coordinators_cpu() -> None:
    """AMX and CPU_REPACK are ggml-cpu's extra buffers: the same CPU holding a repacked copy.
    They fold into "CPU" (no device named AMX), their bytes counted and told apart, and the
    memory table's AMX row adds to the Host row."""
    for name, repacked in (("amx_cpu_only.log", 9.25), ("amx_rpc2_ngl6_ts12_nofit.log", 3.38)):
        report = parse_load_log(lines(name))
        assert "AMX" not in {d.endpoint for d in report.devices}
        cpu = report.device(HOST)
        assert cpu is not None and cpu.repacked_bytes == mib(repacked)
        assert [r.endpoint for r in report.memory].count(HOST) == 1
        assert all(d.repacked_bytes == 0 for d in report.devices if d.endpoint != HOST)
    table = {r.endpoint: r for r in parse_load_log(lines("amx_cpu_only.log")).memory}
    assert (table[HOST].model_mib, table[HOST].context_mib, table[HOST].compute_mib) == (18, 2, 5)
    # A CPU_REPACK buffer (this machine's AVX2 with a Q4_0 model) and any *_REPACK likewise.
    text = ["load_tensors:   CPU_Mapped model buffer size =     2.62 MiB",
            "load_tensors:   CPU_REPACK model buffer size =     2.60 MiB",
            "load_tensors:   CPU_FUTURE_REPACK model buffer size =     1.00 MiB"]
    cpu = parse_load_log(text).device(HOST)
    assert cpu is not None and cpu.model_bytes == mib(2.62) + mib(2.60) + mib(1.00)
    assert cpu.repacked_bytes == mib(2.60) + mib(1.00)
    assert parse_load_log(lines("cpu_only.log")).device(HOST).repacked_bytes == 0  # type: ignore


def test_free_memory_and_breakdown_table() -> None:
    report = parse_load_log(lines("rpc2_fit_default.log"))
    assert report.device(W1) is not None
    assert report.device(W1).free_bytes == 24105 * MIB  # type: ignore[union-attr]
    assert report.kv_bytes_per_layer == KV_LAYER_8
    rows = {r.endpoint: r for r in report.memory}
    assert set(rows) == {W1, W2, HOST}
    assert (rows[W1].model_mib, rows[W1].context_mib, rows[W1].compute_mib) == (5, 1, 8)
    assert rows[HOST].total_mib is None and rows[HOST].compute_mib == 4


def test_fit_tables_are_a_projection_and_only_the_real_load_counts() -> None:
    log = lines("rpc2_fit_moved_to_cpu.log")
    # Cut just after the fit: the dry runs' tables are known, no device has bytes yet.
    cut = next(i for i, ln in enumerate(log) if "fitting params to free memory took" in ln)
    report = parse_load_log(log[:cut + 1])
    assert report.devices == () and report.memory and not report.finished
    assert report.stage == "fitting"


def test_partial_logs_grow_monotonically() -> None:
    log = lines("rpc2_fit_default.log")
    last = -1.0
    for n in range(len(log) + 1):
        report = parse_load_log(log[:n])
        progress = load_progress(log[:n])
        if progress is not None:
            assert progress >= last
            last = progress
        assert report.error == ""
        assert report.finished == any("model loaded" in ln for ln in log[:n])
    assert last == 1.0
    # Right after the first KV line: layers only when the caller knows the per-layer size.
    first_kv = next(i for i, ln in enumerate(log) if "KV buffer size" in ln)
    early = parse_load_log(log[:first_kv + 1])
    assert early.device(W1) is not None and early.device(W1).layers is None  # type: ignore[union-attr]
    early = parse_load_log(log[:first_kv + 1], kv_bytes_per_layer=KV_LAYER_8)
    assert early.device(W1).layers == 5  # type: ignore[union-attr]
    assert early.device(W2).layers == 0  # type: ignore[union-attr]  # its KV line not yet
    assert 0 < (load_progress(log[:first_kv + 1]) or 0) < 1


def test_ansi_garbage_and_bytes_change_nothing() -> None:
    clean = parse_load_log(lines("rpc2_fit_default.log"))
    noisy: list[object] = []
    for i, ln in enumerate(lines("rpc2_fit_default.log")):
        noisy.append(ln.encode() if i % 3 == 0 else f"\x1b[34m{ln}\x1b[0m\r")
        noisy.append(b"\xff\xfe garbage \x00 buffer size = lots MiB")
        noisy.append("|   - RPC0 (x) | not = a + table |" if i % 7 else "\x1b]0;title\x07")
        noisy.append("")
    assert parse_load_log(noisy).devices == clean.devices
    assert parse_load_log(lines("rpc2_colors.log")).devices == clean.devices


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))),
                max_size=30))
def test_any_text_is_a_report(garbage: list[str]) -> None:
    report = parse_load_log(garbage)
    assert isinstance(report, LoadReport)
    progress = load_progress(garbage)
    assert progress is None or 0.0 <= progress <= 1.0
    # Garbage after a real log cannot undo it.
    after = parse_load_log(lines("rpc2_ts13_nofit.log") + garbage)
    assert after.device(W2) is not None and after.device(W2).layers == 5  # type: ignore[union-attr]


def test_the_last_load_wins() -> None:
    # The same log file across a restart of the coordinator with another split.
    report = parse_load_log(lines("rpc2_fit_default.log") + lines("rpc2_ts13_nofit.log"))
    assert [d.layers for d in report.devices] == [3, 5, 0]
    # A second load still under way: nothing of the first one leaks into it.
    second = lines("rpc2_ts13_nofit.log")
    cut = next(i for i, ln in enumerate(second) if "model buffer size" in ln)
    report = parse_load_log(lines("rpc2_fit_default.log") + second[:cut])
    assert not report.finished and report.stage == "placing layers"
    assert all(d.model_bytes == 0 for d in report.devices)


@pytest.mark.parametrize(("name", "words"), [
    ("err_worker_oom.log", ["failed to allocate RPC0[127.0.0.1:51304]", "initialize the context"]),
    ("err_truncated_model.log", ["error loading model", "corrupted or incomplete"]),
    ("err_rpc_unreachable.log", ["Failed to connect to 127.0.0.1:51399"]),
])
def test_failed_loads_say_why(name: str, words: list[str]) -> None:
    report = parse_load_log(lines(name))
    assert not report.finished and report.stage == "failed"
    for word in words:
        assert word in report.error
    assert len(report.error) <= 300
    assert load_progress(lines(name)) is None


def test_oom_log_still_shows_what_was_placed() -> None:
    report = parse_load_log(lines("err_worker_oom.log"))
    assert [(d.endpoint, d.layers) for d in report.devices] == [
        ("127.0.0.1:51304", 7), ("127.0.0.1:51302", 1), (HOST, 0)]
    assert report.device("127.0.0.1:51304").model_bytes == mib(157.55)  # type: ignore[union-attr]


# ---- against the real binaries --------------------------------------------------------------


@pytest.mark.integration
def test_real_split_lands_as_planned(tmp_path: Path) -> None:
    """Start two workers and a coordinator with the split tensor_split_for() computes, and read
    its log: the blocks land exactly where asked, per endpoint."""
    rpc, server = find_cached_binary("ggml-rpc-server"), find_cached_binary("llama-server")
    if not (rpc and server):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    model = write_demo_model(tmp_path / "m.gguf", n_layer=10, n_embd=128, n_ff=256)
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "coordinator.log"
    try:
        procs += start_test_workers(rpc, ports)
        ngl, ts = tensor_split_for((3, 7))
        with log_path.open("wb") as log:
            coordinator = subprocess.Popen(
                [str(server), "-m", str(model), "--rpc", ",".join(f"127.0.0.1:{p}" for p in ports),
                 "-ngl", str(ngl), "-ts", ",".join(map(str, ts)), "--fit", "off", "-lv", "4",
                 "-c", "512", "--host", "127.0.0.1", "--port", str(free_port())],
                stdout=log, stderr=subprocess.STDOUT)
            procs.append(coordinator)
            report = wait_for_load(coordinator, log_path)
        assert report.finished, log_path.read_text(errors="replace")[-2000:]
        assert [(d.endpoint, d.layers) for d in report.devices] == [
            (f"127.0.0.1:{ports[0]}", 3), (f"127.0.0.1:{ports[1]}", 7), (HOST, 0)]
        assert report.offloaded == (11, 11)
    finally:
        stop_all(procs)


def test_two_devices_behind_one_worker_and_a_local_gpu() -> None:
    # Shaped like the real lines; a worker started with two devices (-d) names its buffers
    # RPC0[ep] and RPC1[ep], a local GPU is its own device and host-pinned buffers are the CPU's.
    ep = "10.0.0.5:50052"
    using = "0.00.1 I llama_prepare_model_devices: using device"
    log = [
        f"{using} RPC0 ({ep}) (unknown id) - 1000 MiB free",
        f"{using} RPC1 ({ep}) (unknown id) - 3000 MiB free",
        f"{using} CUDA0 (NVIDIA X) (0000:01:00.0) - 8000 MiB free",
        "0.00.2 I load_tensors: offloaded 33/33 layers to GPU",
        "0.00.2 I load_tensors:   CPU_Mapped model buffer size =   100.00 MiB",
        "0.00.2 I load_tensors:    CUDA_Host model buffer size =    10.00 MiB",
        f"0.00.2 I load_tensors: RPC0[{ep}] model buffer size =  1000.00 MiB",
        f"0.00.2 I load_tensors: RPC1[{ep}] model buffer size =  3000.00 MiB",
        "0.00.2 I load_tensors:        CUDA0 model buffer size =  4000.00 MiB",
        f"0.00.3 I llama_kv_cache: RPC0[{ep}] KV buffer size =    32.00 MiB",
        f"0.00.3 I llama_kv_cache: RPC1[{ep}] KV buffer size =    96.00 MiB",
        "0.00.3 I llama_kv_cache:        CUDA0 KV buffer size =   128.00 MiB",
        "0.00.3 I llama_kv_cache: size =  256.00 MiB (  4096 cells,  32 layers,  1/1 seqs)",
    ]
    report = parse_load_log(log)
    assert [(d.endpoint, d.layers, d.model_bytes // MIB, d.free_bytes) for d in report.devices] \
        == [(ep, 16, 4000, 4000 * MIB), ("CUDA0", 16, 4000, 8000 * MIB), (HOST, 0, 110, None)]
    assert report.kv_bytes_per_layer == 8 * MIB and not report.finished
    assert report.stage == "allocating KV cache"
