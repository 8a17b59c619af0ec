"""Petals preflight and stop on local nodes (real shells, real processes; no Petals process)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

from core.checks import FAIL, OK, Check
from core.cluster import Cluster
from core.config import load_config
from core.engines.petals.doctor import same_petals_version as _same_petals_version
from core.reach import detached
from core.reach.probe import probe_node
from core.reach.transport import LocalTransport
from tests.cluster_files import free_port, toml_text


def _cluster(tmp_path: Path, python: str) -> Cluster:
    nodes = [{"name": "p0", "host": "127.0.0.1", "transport": "local", "backend": "petals",
              "rpc_port": free_port(), "python": python}]
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"name": "pt", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"hf": str(tmp_path / "model")}))
    return Cluster(load_config(path))


async def test_clock_offset_is_refused_with_node_offset_and_fix(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, str(tmp_path / "no-venv" / "bin" / "python"))
    node = cluster.config.node("p0")
    try:
        probe = replace(await probe_node(cluster.transport("p0")), clock_offset_s=61.5)
        checks = await cluster.engine.node_checks(node, probe, probe.clock_offset_s)
    finally:
        await cluster.close()
    by_name = {c.name: c for c in checks}
    clock = by_name["clock"]
    assert clock.level == FAIL
    assert "p0" in clock.message and "+61.5 s" in clock.message
    assert "NTP" in clock.message and "chronyc makestep" in clock.message
    assert by_name["petals"].level == FAIL and "no Petals python" in by_name["petals"].message
    assert by_name["port"].level == OK
    assert by_name["model"].level == FAIL and "same path on every" in by_name["model"].message


def test_different_petals_versions_fail() -> None:
    def check(node: str, version: str) -> Check:
        return Check(node, "petals", OK, f"python 3.11.7, petals {version}, torch 2.13.0")

    same = _same_petals_version([check("a", "2.2.0.post1"), check("b", "2.2.0.post1")])
    assert [c.level for c in same] == [OK]
    mixed = _same_petals_version([check("a", "2.2.0.post1"), check("b", "2.1.0")])
    assert mixed[0].level == FAIL and "a 2.2.0.post1, b 2.1.0" in mixed[0].message


# A main process that ignores nothing and a child that leaves the group with setsid, as
# torch_shm_manager does: a group signal never reaches it.
_TREE = r"""
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
signal.signal(signal.SIGINT, lambda *a: None)  # a main pid that does not stop on SIGINT
time.sleep(600)
"""


async def test_stop_tree_kills_group_and_setsid_descendants(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, sys.executable)
    transport = cluster.transport("p0")
    assert isinstance(transport, LocalTransport)
    state = str(tmp_path / "state" / "tree")
    child_file = tmp_path / "child.pid"
    proc = await detached.spawn(transport, state, [sys.executable, "-c", _TREE,
                                                   str(child_file)])
    try:
        assert proc.state == "running" and proc.pid
        deadline = time.monotonic() + 20
        while not child_file.exists() or not child_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(child_file.read_text())
        while os.getpgid(child) == proc.pid:  # until its setsid() ran
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        result = await detached.stop(transport, state, signal="INT", grace=1.0, tree=True)
        assert result.state == "none" and not result.error
        assert time.monotonic() - started < 10
        for pid in (proc.pid, child):
            assert not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        await detached.stop(transport, state, signal="KILL", grace=1.0, tree=True)
        await cluster.close()
