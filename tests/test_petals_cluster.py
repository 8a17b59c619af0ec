"""Two Petals nodes over real SSH: `torbiz-tui up` starts a private swarm of a tiny random Llama,
the DHT block map covers every block as planned, a generation through the swarm returns tokens,
a stopped node's blocks show unserved, a crashed node's too (its server no longer answers
pings although its DHT records live on for minutes), and nothing is left after `down`.

Every sshd of the test bed runs inside a loopback-only network namespace, so the Petals servers
its sessions start, and the commands (run there with `ip netns exec`), never touch the network.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.petals_cluster import cli, core_call, petals_cluster_file, tiny_llama_spec, write_model
from tests.petals_swarm import Netns, skip_reason


def _skip_reason() -> str | None:
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd missing: apt-get install openssh-server"
    return skip_reason()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _status(ns: Netns, config: Path) -> dict:
    proc = cli(ns, config, "status", "--json", timeout=120)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _petals_processes(ns: Netns, marker: str) -> list[psutil.Process]:
    found = []
    for proc in ns.processes():
        try:
            cmd = " ".join(proc.cmdline())
            if marker in cmd or proc.name() == "torch_shm_manager" or "p2pd" in proc.name():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_gone(ns: Netns, marker: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = _petals_processes(ns, marker)
        if not left or time.monotonic() > deadline:
            return [f"{p.pid} {p.name()}" for p in left]
        time.sleep(0.2)


def test_petals_swarm_over_ssh(tmp_path: Path, sshd_cluster: Callable[..., object]) -> None:
    ns = Netns().create()
    config = None
    try:
        sshd = sshd_cluster(count=2, netns=ns.name)
        model = write_model(ns, tmp_path / "model", tiny_llama_spec())
        config = petals_cluster_file(tmp_path, sshd, model)
        marker = str(model)

        started = time.monotonic()
        up = cli(ns, config, "up", timeout=400)
        assert up.returncode == 0, up.stdout + up.stderr[-4000:]
        up_seconds = time.monotonic() - started
        assert "node1 blocks 0:2, node2 blocks 2:4" in up.stdout

        status = _status(ns, config)
        assert [n["state"] for n in status["nodes"]] == ["ready", "ready"], status["nodes"]
        shares = {s["node"]: s for s in status["layers"]}
        for name, first in (("node1", 0), ("node2", 2)):
            share = shares[name]
            assert (share["first_layer"], share["layers"], share["state"]) == (first, 2, "ONLINE")
            assert (share["planned_first"], share["planned_layers"]) == (first, 2)
            assert share["version"] == "2.2.0.post1"
            # predicted (plan) next to measured (PSS of the server's group on the node)
            assert share["predicted_bytes"] > 0
            assert 0.5 < share["measured_bytes"] / share["predicted_bytes"] < 1.5, share
        assert status["unserved"] == []
        assert [[s["node"] for s in b["servers"]] for b in status["blocks"]] == \
            [["node1"], ["node1"], ["node2"], ["node2"]]

        gen = cli(ns, config, "petals-generate", "the quick brown fox", "-n", "8", timeout=300)
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert "8 tokens in" in gen.stderr and "tokens/s" in gen.stderr

        # A clean stop: SIGINT, Petals announces its blocks offline at once.
        core_call(ns, config, "print((await cluster.stop_node('node2')).state)")
        status = _status(ns, config)
        assert status["unserved"] == [2, 3]
        assert {n["name"]: n["state"] for n in status["nodes"]}["node2"] == "stopped"
        assert not [p for p in _petals_processes(ns, marker)
                    if str(tmp_path / "state" / "pt" / "node2") in " ".join(p.cmdline())]

        # Started alone, it joins the running node1 (not a new swarm).
        out = core_call(ns, config, "await cluster.refresh_nodes()\n"
                                    "print((await cluster.start_node('node2')).state)",
                        timeout=300)
        assert out.strip().splitlines()[-1] == "ready", out
        assert _status(ns, config)["unserved"] == []

        # A crash: its DHT records stay ONLINE for minutes, the ping shows it dead at once.
        pid = int((tmp_path / "state" / "pt" / "node1" / "pid").read_text().split()[0])
        os.killpg(pid, signal.SIGKILL)  # the server group the product started for this test
        status = _status(ns, config)
        assert status["unserved"] == [0, 1], status["blocks"]
        assert {n["name"]: n["state"] for n in status["nodes"]}["node1"] == "failed"

        down = cli(ns, config, "down", timeout=120)
        assert down.returncode == 0, down.stderr[-3000:]
        assert _wait_gone(ns, marker) == []
        print(f"\npetals cluster: up {up_seconds:.1f} s; generation: "
              f"{gen.stderr.strip().splitlines()[-1]}")
    finally:
        if config is not None and config.exists():
            cli(ns, config, "down", timeout=120)
        left = ns.delete()
        assert not [p for p in left if "sshd" not in p], left
