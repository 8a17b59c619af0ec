"""The recovery plan keeps the survivors' blocks (their warm caches) when budgets allow, and
its records read as sentences."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.recovery import sticky_spans
from core.planning.model_info import read_gguf_info
from core.planning.placement import COORDINATOR, Placement
from core.planning.planner import NodeBudget, plan_layers
from core.supervision.recovery_record import RecoveryResult, format_recovery

MIB = 1 << 20
BEFORE = {"a": [0, 3], "b": [3, 3], "c": [6, 2]}  # the demo model's 8 blocks on three workers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return read_gguf_info(ensure_demo_model(tmp_path_factory.mktemp("m") / "demo.gguf"))


def placement(model, names: list[str], cap: int = 1 << 30,
              coordinator: bool = False) -> Placement:
    budgets = [NodeBudget(n, cap, 0) for n in names]
    if coordinator:
        budgets.insert(0, NodeBudget(COORDINATOR, cap, 0, is_coordinator=True))
    plan = plan_layers(model, budgets, context=512, policy="spread")
    return Placement(model, tuple(budgets), {}, plan)


def test_nothing_lost_keeps_the_previous_spans(model) -> None:
    assert sticky_spans(placement(model, ["a", "b", "c"]), BEFORE, 512) == (
        ("a", 0, 3), ("b", 3, 3), ("c", 6, 2))


def test_a_lost_range_goes_to_a_neighbour_and_the_rest_stays(model) -> None:
    # Lost in the middle: the balanced choice (c takes 3-5 next to its 6-7).
    assert sticky_spans(placement(model, ["a", "c"]), BEFORE, 512) == (
        ("a", 0, 3), ("c", 3, 5))
    # Lost first: the next survivor starts earlier. Lost last: the previous one extends.
    assert sticky_spans(placement(model, ["b", "c"]), BEFORE, 512) == (
        ("b", 0, 6), ("c", 6, 2))
    assert sticky_spans(placement(model, ["a", "b"]), BEFORE, 512) == (
        ("a", 0, 3), ("b", 3, 5))


def test_budgets_too_small_for_a_neighbour_fall_back_to_the_fresh_plan(model) -> None:
    tight = placement(model, ["a", "c"], cap=7 * MIB)
    assert sticky_spans(tight, BEFORE, 512) is None
    assert sum(count for _, _, count in tight.plan.rpc_spans()) == 8


def test_unusable_previous_plans_are_ignored(model) -> None:
    full = placement(model, ["a", "c"])
    assert sticky_spans(full, None, 512) is None
    assert sticky_spans(full, {}, 512) is None
    assert sticky_spans(full, {"a": ["x", 3]}, 512) is None
    assert sticky_spans(full, {"a": [0, 3], "c": [4, 4]}, 512) is None  # a gap
    assert sticky_spans(full, {"a": [0, 3], "c": [3, 3]}, 512) is None  # not to the end
    # The fresh plan gives the coordinator's CPU blocks the old one did not: not sticky.
    with_cpu = placement(model, ["a", "c"], coordinator=True)
    if with_cpu.plan.assignment(COORDINATOR) is not None:
        assert sticky_spans(with_cpu, BEFORE, 512) is None


def test_records_read_as_sentences() -> None:
    done = RecoveryResult("recovered", ("b",), ("a", "c"), (("a", 0, 3), ("c", 3, 5)), 2.345,
                          "coordinator recovered in 2.3 s", time.time())
    line = format_recovery(done.to_json())
    assert "in 2.3 s: coordinator restarted over a, c (left out: b)" in line
    timed = RecoveryResult("recovered", ("b",), ("a", "c"), (("a", 0, 3), ("c", 3, 5)), 2.345,
                           "coordinator recovered in 2.3 s", time.time(),
                           steps=(("confirmed", 0.5), ("surveyed", 0.52), ("started", 2.345)))
    assert timed.to_json()["steps"] == {"confirmed": 0.5, "surveyed": 0.52, "started": 2.345}
    assert format_recovery(timed.to_json()).endswith(
        "; from the detection: confirmed +0.50 s, surveyed +0.02 s, started +1.83 s")
    refused = RecoveryResult("degraded", ("b",), (), (), None,
                             "cannot recover without b: 3.1 MiB missing", time.time(),
                             3 * MIB)
    assert format_recovery(refused.to_json()).endswith("(lost: b): cannot recover without b: "
                                                       "3.1 MiB missing")


def test_core_recovery_imports_no_textual(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import core.engines.llama_rpc.recovery, sys; assert 'textual' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


def test_recover_is_on_by_default_and_a_checked_cluster_key(tmp_path: Path) -> None:
    from core.config import ConfigError, parse_config

    nodes = [{"name": "a", "host": "127.0.0.1"}]
    assert parse_config({"nodes": nodes}, tmp_path / "c.toml").recover is True
    off = parse_config({"cluster": {"recover": False}, "nodes": nodes}, tmp_path / "c.toml")
    assert off.recover is False
    with pytest.raises(ConfigError, match=r"\[cluster\].*'recover' must be true or false"):
        parse_config({"cluster": {"recover": "yes"}, "nodes": nodes}, tmp_path / "c.toml")


def test_supervisor_without_recovery_has_no_recoverer(tmp_path: Path) -> None:
    from core.cluster import Cluster
    from core.config import parse_config
    from core.supervision.supervisor import Supervisor

    nodes = [{"name": "a", "host": "127.0.0.1", "transport": "local"}]
    off = parse_config({"cluster": {"recover": False}, "nodes": nodes}, tmp_path / "c.toml")
    assert Supervisor(Cluster(off)).recoverer is None
    assert Supervisor(Cluster(off), recover=True).recoverer is not None
