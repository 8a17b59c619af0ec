"""SVG snapshots (pytest-textual-snapshot) of every screen at 140x40, under a deterministic
synthetic feed: fixed names, pids and log lines, a fixed clock, no cluster behind the app
(live=False), animations off (the spinner and the indeterminate bar hold still).

Update after an intended change: `pytest tests/test_tui_snapshots.py --snapshot-update`, then
look at the SVGs in tests/snapshots/ before committing them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_textual_snapshot
from textual.command import CommandList
from textual.pilot import Pilot
from textual.widgets import Input

from core.config import ClusterConfig, load_config
from core.planning.layer_map import llama_map
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    UNREACHABLE,
    CoordinatorLoading,
    CoordinatorStatus,
    LayerShare,
    NodeStatus,
    Notice,
)
from core.supervision.bottleneck import Bottleneck, PartShare
from core.supervision.throughput import SlotProgress, ThroughputSample
from tests.cluster_files import toml_text
from tui.app import TorbizApp, make_app
from tui.screens.logs import LogsScreen
from tui.screens.main import MainScreen
from tui.widgets.node_filter import NodeFilter

SIZE = (140, 40)

SNAPSHOTS = Path(__file__).parent / "snapshots"

NODES = [  # name, host, state, pid, error
    ("gpu-a", "10.9.66.41", READY, 4101, ""),
    ("gpu-b", "10.9.66.42", READY, 4102, ""),
    ("gpu-c", "10.9.66.43", STARTING, 4103, ""),
    ("cpu-d", "10.9.66.44", FAILED, 4104,
     "out of memory: the worker could not allocate 2048 MiB (see its log)"),
    ("cpu-e", "10.9.66.45", UNREACHABLE, None,
     "no SSH answer from 10.9.66.45:22 within 10 s"),
    ("cpu-f", "10.9.66.46", STOPPED, None, ""),
]
WORKER_LOG = [
    "torbiz-start Sun Nov 22 10:00:00 UTC 2026",
    "Starting RPC server v7.0.0",
    "  endpoint       : 10.9.66.41:50052",
    "  local cache    : cache/rpc",
    "Devices:",
    "  CPU: AMD EPYC (24105 MiB, 24105 MiB free)",
    "  transport      : TCP",
    "Accepted client connection",
    "[set_tensor] loading blk.0.attn_q.weight (4194304 bytes) from the cache",
    "[set_tensor] loading blk.0.attn_k.weight (1048576 bytes) from the cache",
    "[graph_compute] 38 nodes, 12 ms",
]


# An 80-block model: the first 8 on the coordinator's CPU, the rest over three GPUs; gpu-c
# loaded one block fewer than planned (the map flags it).
LAYERS = [LayerShare("gpu-a", "10.9.66.41:50052", 8, 30, 30, 30 * 410 << 20),
          LayerShare("gpu-b", "10.9.66.42:50052", 38, 24, 24, 24 * 410 << 20),
          LayerShare("gpu-c", "10.9.66.43:50052", 62, 18, 17, 17 * 410 << 20)]
THROUGHPUT = [0.0, 0.0, 3.1, 8.4, 11.2, 11.9, 12.3, 12.1, 11.8, 12.4, 12.2, 12.0]
# Where each 83 ms token goes: gpu-c sits behind a thin link.
NECK = Bottleneck(0.083, "running", (
    PartShare("coordinator", 8, 0.004, 0.0, 0.048),
    PartShare("gpu-a", 30, 0.018, 0.002, 0.241),
    PartShare("gpu-b", 24, 0.014, 0.003, 0.205),
    PartShare("gpu-c", 17, 0.011, 0.031, 0.506)))


class SnapshotsHere(pytest_textual_snapshot.SVGImageExtension):
    """Snapshots in tests/snapshots/<test module>/ rather than __snapshots__."""

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        return str(SNAPSHOTS / test_location.basename)


@pytest.fixture(autouse=True)
def _snapshots_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest_textual_snapshot, "SVGImageExtension", SnapshotsHere)


@pytest.fixture
def config(tmp_path: Path) -> ClusterConfig:
    nodes = [{"name": name, "host": host, "rpc_port": 50052} for name, host, *_ in NODES]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text({"name": "lab", "state_dir": "~/.torbiz"}, nodes,
                              model={"gguf": "model.gguf"},
                              coordinator={"host": "127.0.0.1", "port": 8181}))
    return load_config(path)


def still_app(config: ClusterConfig, read_only: bool = False) -> TorbizApp:
    app = make_app(config, read_only=read_only, live=False, clock=lambda: "10:00:05")
    app.animation_level = "none"
    return app


async def feed(pilot: Pilot[Any], coordinator: str = STARTING) -> None:
    app = pilot.app
    assert isinstance(app, TorbizApp)
    await pilot.pause()
    for name, _, state, pid, error in NODES:
        node = app.config.node(name)
        app.main.post_message(MainScreen.NodeUpdated(NodeStatus(
            name, node.host, node.backend, state, pid, node.endpoint, error,
            probe_ms=40 + 10 * len(name) if pid else None)))
    app.main.post_message(MainScreen.CoordinatorUpdated(CoordinatorStatus(
        coordinator, "http://127.0.0.1:8181", 4200 if coordinator != STOPPED else None)))
    app.main.post_message(MainScreen.NoticeReceived(Notice(
        "gpu-a: worker ready on 10.9.66.41:50052 (pid 4101)", node="gpu-a")))
    app.main.post_message(MainScreen.NoticeReceived(Notice(
        "cpu-d: out of memory: the worker could not allocate 2048 MiB (see its log)", "error",
        "cpu-d")))
    if coordinator == STARTING:
        app.main.post_message(MainScreen.LoadingUpdated(CoordinatorLoading(15.0, None, 503)))
        app.main.post_message(MainScreen.NoticeReceived(Notice(
            "coordinator loading the model (15 s, /health says 503)")))
    app.main.post_message(MainScreen.LogLines("gpu-a", WORKER_LOG))
    for name, device, free in (("gpu-a", "RTX 4090", "21.3 GiB"), ("gpu-b", "RTX 3090", "22.9 GiB"),
                               ("gpu-c", "RTX 3090", "23.1 GiB"), ("cpu-d", "CPU 16c", "3.2 GiB")):
        app.main.post_message(MainScreen.ResourcesUpdated(name, device, free))
    if coordinator != STOPPED:
        app.main.post_message(MainScreen.LayerMapUpdated(llama_map(LAYERS, blocks=80)))
        for rate in THROUGHPUT:
            app.main.post_message(MainScreen.ThroughputUpdated(ThroughputSample(
                at=0.0, gen_tps=rate, prompt_tps=rate * 6, requests_processing=1,
                requests_deferred=0, decoded_total=500, prompt_tokens_total=900,
                slots_decoding=1, slots=(SlotProgress(0, 12, True, 214, 298, 300, 86, rate),),
                running_tps=rate)))
        app.main.post_message(MainScreen.BottleneckUpdated(NECK))
    await settle(pilot)
    app.clear_notifications()  # toasts have their own timers: leave them out of the picture
    await settle(pilot)


async def settle(pilot: Pilot[Any]) -> None:
    """Until every message is handled and no widget waits on the shared redraw clock (the
    node table, the status line and the log views redraw on its next slot, not at once)."""
    app = pilot.app
    deadline = time.monotonic() + 10
    calm = 0
    while calm < 2:
        await pilot.pause()
        pending = [w for w in app.screen.query("*")
                   if getattr(w, "_dirty_timer", None) is not None
                   or getattr(w, "_draw_timer", None) is not None
                   or getattr(w, "_redraw_timer", None) is not None]
        calm = calm + 1 if not pending else 0
        if time.monotonic() > deadline:
            raise AssertionError(f"still redrawing after 10 s: {pending}")
        if pending:
            await pilot.pause(0.06)


def test_main_screen(snap_compare: Any, config: ClusterConfig) -> None:
    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=feed)


def test_main_screen_read_only(snap_compare: Any, config: ClusterConfig) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot, coordinator=READY)

    assert snap_compare(still_app(config, read_only=True), terminal_size=SIZE,
                        run_before=run_before)


def test_main_screen_filtered(snap_compare: Any, config: ClusterConfig) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot)
        pilot.app.main.query_one(NodeFilter).cursor_blink = False  # type: ignore[attr-defined]
        await pilot.press("slash", *"cpu")
        await settle(pilot)

    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=run_before)


def test_logs_screen_with_search(snap_compare: Any, config: ClusterConfig) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot)
        await pilot.press("l")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, LogsScreen)
        screen.post_message(LogsScreen.Lines("node:gpu-a", WORKER_LOG * 3))
        await pilot.pause()
        await pilot.press("slash", *"set_tensor", "enter")
        await settle(pilot)

    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=run_before)


def test_event_log_screen(snap_compare: Any, config: ClusterConfig) -> None:
    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=feed, press=["e"])


def test_help_screen(snap_compare: Any, config: ClusterConfig) -> None:
    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=feed,
                        press=["question_mark"])


def test_command_palette(snap_compare: Any, config: ClusterConfig) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot)
        await pilot.press("colon")
        await pilot.pause()
        pilot.app.screen.query_one(Input).cursor_blink = False  # a blink is a different picture
        await pilot.press(*"jump")
        # The palette searches in the background: wait for every node's jump command.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            options = pilot.app.screen.query_one(CommandList).options
            if sum("Jump to node" in str(o.prompt) for o in options) == len(NODES) \
                    and not pilot.app.screen.query("LoadingIndicator.--visible"):
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)

    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=run_before)


def test_stop_confirmation(snap_compare: Any, config: ClusterConfig) -> None:
    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=feed, press=["x"])


def test_quit_dialog(snap_compare: Any, config: ClusterConfig) -> None:
    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=feed, press=["q"])


def test_plan_preview(snap_compare: Any, config: ClusterConfig) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot, coordinator=STOPPED)
        pilot.app.main.post_message(MainScreen.PlanReady(PLAN_TEXT, refused=False))
        await settle(pilot)

    assert snap_compare(still_app(config), terminal_size=SIZE, run_before=run_before)


PLAN_TEXT = """\
NODE         DEVICE    FREE       RESERVE   BUDGET     BLOCKS        WEIGHTS    KV        TOTAL
coordinator  CPU       28.00 GiB  1.00 GiB  26.50 GiB  0-7 (8)       3.20 GiB   0.16 GiB  3.36 GiB
gpu-a        RTX 4090  21.30 GiB  0.50 GiB  20.80 GiB  8-37 (30)     12.01 GiB  0.59 GiB  12.60 GiB
gpu-b        RTX 3090  22.90 GiB  0.50 GiB  22.40 GiB  38-61 (24)    9.61 GiB   0.47 GiB  10.08 GiB
gpu-c        RTX 3090  23.10 GiB  0.50 GiB  22.60 GiB  62-79 (18)    7.21 GiB   0.35 GiB  7.56 GiB

model llama-70b-q4: 80 blocks, 32.03 GiB of weights; context 4096, KV cache f16; policy pack"""
