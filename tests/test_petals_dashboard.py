"""The dashboard runs a private Petals swarm: the real torbiz-tui in tmux, inside a network
namespace that has only loopback (Petals reaches out on its own otherwise), against two sshd
nodes of the test bed in the same namespace. u starts the swarm, the layer map shows the
blocks each node serves as the DHT says, stopping a node marks its blocks unserved, d stops
everything."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.petals_cluster import cli, petals_cluster_file, tiny_llama_spec, write_model
from tests.petals_swarm import Netns, skip_reason
from tests.test_tui_e2e_tmux import COLUMNS, ROWS, Tmux, row

pytestmark = pytest.mark.skipif(
    skip_reason() is not None or not os.access("/usr/sbin/sshd", os.X_OK),
    reason=skip_reason() or "/usr/sbin/sshd missing: apt-get install openssh-server")


def test_dashboard_starts_watches_and_stops_a_private_swarm(
        tmp_path: Path, sshd_cluster: Callable[..., object]) -> None:
    ns = Netns().create()
    tmux = Tmux(f"torbiz-petals-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    config = None
    try:
        sshd = sshd_cluster(count=2, netns=ns.name)
        model = write_model(ns, tmp_path / "model", tiny_llama_spec())
        config = petals_cluster_file(tmp_path, sshd, model)
        # The tmux server starts inside the namespace, so the dashboard and everything it
        # runs here (the DHT monitor) are there too; tmux's socket is a file, reached from out.
        shell = (f"read go; {sys.executable} -m tui.cli -c {config}; "
                 "echo \"torbiz-tui exited with $?\"; sleep 600")
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        subprocess.run(ns.argv(["tmux", "-L", tmux.socket, "-f", "/dev/null", "new-session",
                                "-d", "-s", "e2e", "-x", str(COLUMNS), "-y", str(ROWS),
                                "-e", "TERM=xterm-256color", "-c",
                                str(Path(__file__).resolve().parent.parent), "sh", "-c",
                                shell]), env=env, check=True, timeout=30)
        tmux.keys("Enter")
        screen = tmux.wait_for("2 nodes", "○ stopped", absent="probing", timeout=60)
        assert "petals" in row(screen, "node1")

        tmux.keys("u")
        # A server is ready before every DHT record of its span has reached the monitor:
        # wait until no block is left unserved.
        screen = tmux.wait_for("2 ready", "as served in the swarm (DHT)", "= plan",
                               absent="not served", timeout=400)
        legend = [line for line in screen.splitlines() if "blk" in line]
        assert any("node1" in line and "0-1" in line for line in legend), screen
        assert any("node2" in line and "2-3" in line for line in legend), screen
        assert "not served" not in screen
        print("\n" + screen)

        tmux.keys("j", "x")  # stop node2: asks first
        tmux.wait_for("Stop the worker on node2")
        tmux.keys("y")
        screen = tmux.wait_for("not served: blocks 2, 3", "1 stopped", timeout=120)
        assert "○ stopped" in row(screen, "node2") and "● ready" in row(screen, "node1")
        print("\n" + screen)

        tmux.keys("d")
        tmux.wait_for("Take cluster")
        tmux.keys("y")
        tmux.wait_for("2 stopped", timeout=120)
        tmux.keys("q")
        tmux.wait_for("torbiz-tui exited with 0", timeout=60)
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True,
                       timeout=10)
        if config is not None and config.exists():
            cli(ns, config, "down", timeout=120)
        left = ns.delete()
        assert not [p for p in left if "sshd" not in p], left
