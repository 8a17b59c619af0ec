"""The dashboard's model without Textual: rows joined from the core's events and the polls,
our own "probing" and "stopping", the loading row, and what each key may do now and why not."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from core.engines.base import Capabilities
from core.planning.layer_map import LOADED, LayerMap, MapSpan
from core.status import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    CoordinatorLoading,
    CoordinatorStatus,
    Level,
    NodeState,
    NodeStatus,
    Notice,
)
from core.supervision.bottleneck import Bottleneck, PartShare
from core.supervision.throughput import ThroughputSample
from tui.model import (
    COORDINATOR,
    PROBING,
    STOPPING,
    WHOLE_CLUSTER,
    Dashboard,
    Key,
    node_cells,
    status_cells,
)

LLAMA = Capabilities(has_coordinator=True, can_recover=True, has_throughput=True,
                     node_start_needs_plan=False, coordinator_label="coordinator",
                     worker_label="worker", map_interval_s=2.0)
SWARM = Capabilities(has_coordinator=False, can_recover=False, has_throughput=False,
                     node_start_needs_plan=True, coordinator_label="swarm",
                     worker_label="server", map_interval_s=5.0)
URL = "http://127.0.0.1:8181"


def status(name: str, state: NodeState = STOPPED, **extra: Any) -> NodeStatus:
    return NodeStatus(name, "10.0.0.1", "llama-rpc", state, endpoint=f"{name}:50052", **extra)


def dashboard(caps: Capabilities = LLAMA, *, read_only: bool = False) -> Dashboard:
    return Dashboard(caps, [status("alpha"), status("beta")], CoordinatorStatus(STOPPED, URL),
                     read_only=read_only, engine_title="Petals", serving_name="torbiz-lab",
                     clock=lambda: "12:00:00")


def refreshed(model: Dashboard) -> Dashboard:
    model.refreshed("")
    return model


def sample(rate: float) -> ThroughputSample:
    return ThroughputSample(at=0.0, gen_tps=rate, prompt_tps=0.0, requests_processing=1,
                            requests_deferred=0, decoded_total=1, prompt_tokens_total=0,
                            slots_decoding=1, running_tps=rate)


def test_the_model_needs_no_textual() -> None:
    code = "import sys, tui.model; assert 'textual' not in sys.modules, 'textual imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_rows_are_probing_until_the_first_refresh_except_those_being_changed() -> None:
    model = dashboard()
    assert [row.state for row in model.nodes.values()] == [PROBING, PROBING]
    assert model.coordinator.state == PROBING
    assert model.check("start_node", "alpha").key == Key.GREYED
    model.begin("beta")
    changed, went_stale = model.refreshed("")
    assert [row.name for row in changed.nodes] == ["alpha"] and changed.coordinator
    assert not went_stale
    assert model.nodes["alpha"].state == STOPPED and model.nodes["beta"].state == PROBING
    changed, went_stale = model.refreshed("ssh: timeout")
    assert went_stale and model.stale
    assert model.refreshed("ssh: timeout")[1] is False  # said once, not every second


def test_a_row_joins_the_status_with_the_polls_cells() -> None:
    model = refreshed(dashboard())
    model.node_changed(status("alpha", READY, pid=41, probe_ms=40))
    model.resources("alpha", "RTX 4090", "20.5 GiB")
    model.layer_map_changed(LayerMap(4, (MapSpan("alpha", 0, 4),), source=LOADED))
    neck = Bottleneck(0.1, "running", (
        PartShare("coordinator", None, 0.01, 0.0, 0.1),
        PartShare("alpha", 4, 0.05, 0.03, 0.8)))
    model.throughput_changed(sample(9.5), "")
    changed = model.bottleneck_changed(neck)
    assert [row.name for row in changed] == ["alpha"]  # beta holds no layers: no share
    cells = node_cells(model.nodes["alpha"])
    assert (cells["device"], cells["free"], cells["layers"], cells["share"], cells["latency"]) \
        == ("RTX 4090", "20.5 GiB", "0-3", "80% c50 l30 ◀", "40ms")
    model.node_changed(status("alpha", FAILED, pid=41, error="worker \x1b[31mdied"))
    cells = node_cells(model.nodes["alpha"])
    assert cells["layers"] == "0-3" and cells["device"] == "RTX 4090"  # kept across the change
    assert cells["share"] == "-"  # not serving: no share
    assert cells["error"] == "worker died"  # remote text is inert


def test_status_cells_are_what_the_cli_and_the_table_share() -> None:
    cells = status_cells(status("alpha", READY, pid=7, started_at=1000.0), now=1000.0 + 3700)
    assert cells == {"name": "alpha", "host": "10.0.0.1", "backend": "llama-rpc",
                     "state": "ready", "pid": "7", "latency": "-", "uptime": "1h01",
                     "endpoint": "alpha:50052", "error": ""}


def test_keys_follow_the_selected_node_and_say_why_not() -> None:
    model = refreshed(dashboard())
    assert model.can("start_node", "alpha")
    assert not model.can("stop_node", "alpha")
    assert model.why_not("stop_node", "alpha") == "alpha is stopped"
    assert model.why_not("start_node", None) == "no node selected"
    model.node_changed(status("alpha", READY, pid=1))
    assert model.why_not("start_node", "alpha") == "alpha is ready"
    assert model.can("restart_node", "alpha") and model.can("logs", "alpha")
    model.begin("alpha")
    assert model.why_not("stop_node", "alpha") == "alpha is being changed"
    assert model.can("start_node", "beta")  # another node is not busy
    assert model.why_not("up") == "another action is under way"
    model.end("alpha")
    assert model.can("up") and model.can("down")


def test_c_is_start_or_stop_by_the_coordinators_state() -> None:
    model = dashboard()
    # Not known yet: both greyed, neither hidden.
    assert model.check("start_coordinator", None).key == Key.GREYED
    assert model.check("stop_coordinator", None).key == Key.GREYED
    refreshed(model)
    assert model.can("start_coordinator")
    assert model.check("stop_coordinator", None).key == Key.HIDDEN
    model.coordinator_changed(CoordinatorStatus(READY, URL, 99))
    assert model.check("start_coordinator", None).key == Key.HIDDEN
    assert model.can("stop_coordinator") and model.can("generate")
    model.begin(COORDINATOR, stopping=True)
    assert model.coordinator.state == STOPPING
    assert model.why_not("stop_coordinator") == "the coordinator is being changed"
    model.coordinator_changed(CoordinatorStatus(STOPPED, URL))
    model.end(COORDINATOR)
    assert model.why_not("generate") == "the coordinator is stopped"


def test_read_only_hides_what_changes_the_cluster() -> None:
    model = refreshed(dashboard(read_only=True))
    for action in ("start_node", "stop_node", "restart_node", "start_coordinator", "up",
                   "down"):
        assert model.check(action, "alpha").key == Key.HIDDEN, action
    assert model.can("logs", "alpha") and model.can("plan")


def test_an_engine_without_a_coordinator_hides_c_and_generates_through_its_workers() -> None:
    model = refreshed(dashboard(SWARM))
    assert model.check("start_coordinator", None).key == Key.HIDDEN
    assert model.check("stop_coordinator", None).key == Key.HIDDEN
    assert model.why_not("generate") == "no server is ready"
    model.node_changed(status("beta", READY, pid=5))
    assert model.can("generate")
    assert model.serving is not None and model.serving.title == "Petals swarm"
    assert model.serving.name == "torbiz-lab"
    model.throughput_changed(None, "")
    assert model.bottleneck_changed(None) == []  # no shares per node
    assert "torbiz-tui generate" in model.idle_throughput_note("stopped")
    assert dashboard().serving is None


def test_stopping_shows_at_once_and_goes_with_the_action() -> None:
    model = refreshed(dashboard())
    model.node_changed(status("alpha", READY, pid=1))
    model.coordinator_changed(CoordinatorStatus(READY, URL, 9))
    changed = model.begin(WHOLE_CLUSTER, stopping=True)
    assert [row.name for row in changed.nodes] == ["alpha"]  # beta is stopped already
    assert changed.coordinator and model.coordinator.state == STOPPING
    assert model.running_summary() == "1 of 2 workers not stopped, coordinator stopping"
    model.node_changed(status("alpha", STOPPED))
    changed = model.end(WHOLE_CLUSTER)
    assert changed.nodes == [] and changed.coordinator  # alpha already said it stopped
    assert model.coordinator.state == READY  # what the core last said stays
    assert model.busy_keys == set()


def test_the_loading_row_comes_from_the_typed_event() -> None:
    model = refreshed(dashboard())
    model.coordinator_changed(CoordinatorStatus(STARTING, URL, 9))
    assert model.loading_shown and model.loading is None
    model.coordinator_loading(CoordinatorLoading(15.0, 0.5, 503))
    # While it loads, the core's periodic info notice goes to the event log, not a toast.
    view = model.notice(Notice("coordinator loading the model (15 s, /health says 503)"))
    assert view.toast is None and view.line.endswith("/health says 503)")
    assert model.notice(Notice("beta: worker died", Level.ERROR, "beta")).toast == Level.ERROR
    model.coordinator_changed(CoordinatorStatus(READY, URL, 9))
    assert not model.loading_shown and model.loading is None
    assert model.notice(Notice("coordinator ready")).toast == Level.INFO


def test_notices_make_one_event_line_and_errors_are_said_once() -> None:
    model = dashboard()
    view = model.notice(Notice("alpha: port in use", Level.ERROR, "alpha"))
    assert view.line == "12:00:00 error   alpha: port in use"
    assert view.node_note == "-- 12:00:00 error: alpha: port in use --"
    assert model.unsaid(["alpha: port in use", "beta: no answer"]) == ["beta: no answer"]
    assert list(model.event_log) == ["12:00:00 error   alpha: port in use"]


@pytest.mark.parametrize("count,expected", [(0, "-"), (1, "3"), (3, "3-5")])
def test_layers_cell_names_the_span(count: int, expected: str) -> None:
    model = refreshed(dashboard())
    spans = (MapSpan("alpha", 3, count),) if count else ()
    model.layer_map_changed(LayerMap(8, spans, source=LOADED))
    assert model.nodes["alpha"].layers == expected


def test_rebalance_is_offered_for_a_worker_left_out_but_never_for_a_standby() -> None:
    def running(standbys: tuple[str, ...] = ()) -> Dashboard:
        model = refreshed(Dashboard(LLAMA, [status("alpha"), status("beta")],
                                    CoordinatorStatus(STOPPED, URL), standbys=standbys))
        model.coordinator_changed(CoordinatorStatus(READY, URL, 7))
        model.node_changed(status("alpha", READY, pid=41))
        model.node_changed(status("beta", READY, pid=42))
        model.layer_map_changed(LayerMap(4, (MapSpan("alpha", 0, 4),), source=LOADED))
        return model

    assert running().can("rebalance")  # beta is ready and holds nothing: it came back
    assert not running(("beta",)).can("rebalance")  # beta waits as a standby on purpose
    assert "in the plan" in running(("beta",)).why_not("rebalance")
