"""Nothing of ours is left around a stopped Petals swarm: `status` answers from the swarm file
at once without starting a DHT monitor, and a monitor that cannot join (its peers are gone)
backs off and leaves no hivemind socket in the shared /tmp when it is closed.

The second test runs the real DHT monitor (the Petals venv) inside a loopback-only network
namespace, as every Petals process in these tests does."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.engines.petals.swarm_file import update_swarm
from tests.cluster_files import free_port, toml_text
from tests.petals_swarm import Netns, skip_reason

PEER = "12D3KooW" + "A" * 44  # a well-formed peer id nobody has


def _swarm_config(tmp_path: Path, python: str = "/nonexistent/python") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(toml_text(
        {"name": "stopped", "state_dir": str(tmp_path / "state")},
        [{"name": "p0", "host": "127.0.0.1", "transport": "local", "backend": "petals",
          "rpc_port": free_port()}],
        model={"hf": str(tmp_path / "model")}, petals={"python": python}))
    return path


def _hivemind_sockets() -> set[str]:
    return set(glob.glob("/tmp/hivemind-*"))


async def test_status_of_a_stopped_swarm_starts_no_monitor(tmp_path: Path) -> None:
    from tests.petals_swarm import petals_python

    python = petals_python()  # a real one: nothing but the rule keeps the monitor from starting
    if python is None:
        pytest.skip(skip_reason() or "no Petals venv")
    config = load_config(_swarm_config(tmp_path, str(python)))
    # A swarm that ran once: its file names a peer and four blocks, and nothing runs now.
    update_swarm(config, n_blocks=4, prefix="stopped", plan={"p0": [0, 4]},
                 maddrs={"p0": f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}"})
    before = _hivemind_sockets()
    cluster = Cluster(config)
    try:
        report = await operations.status(cluster, detail=True)
        assert cluster.engine.view._watch is None  # type: ignore[attr-defined]
    finally:
        await cluster.close()
    assert [n.state for n in report.status.nodes] == ["stopped"]
    assert report.status.unserved == (0, 1, 2, 3)
    assert not report.healthy
    assert _hivemind_sockets() - before == set()


_DRIVER = textwrap.dedent("""
    import asyncio, glob, json, os, sys
    from core.engines.petals.dht import DhtWatch

    async def main():
        before = set(glob.glob("/tmp/hivemind-*"))
        watch = DhtWatch(sys.argv[1], [sys.argv[2]], "gone", 2,
                         log=__import__("pathlib").Path(sys.argv[3]))
        await watch.start()
        errors = []
        for _ in range(3):  # the first attempts to join fail: the peer is not there
            await watch.next_snapshot(40)
            errors.append(watch.error)
        sock_dir = watch.sock_dir
        used = sorted(os.listdir(sock_dir))  # hivemind's sockets went here, not to /tmp
        await watch.aclose()
        print(json.dumps({"errors": errors, "used": used,
                          "sock_dir_left": os.path.exists(sock_dir),
                          "new_tmp": sorted(set(glob.glob("/tmp/hivemind-*")) - before)}))

    asyncio.run(main())
""")


def test_a_monitor_that_cannot_join_leaves_nothing_in_tmp() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from tests.petals_swarm import petals_python

    python = petals_python()
    assert python is not None
    ns = Netns().create()
    try:
        dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}"
        # A /tmp of its own (a tmpfs in a private mount namespace): what the driver finds
        # there at the end is exactly what this monitor left, whatever else runs on the machine.
        # The old /tmp stays reachable under OLD (the checkout or a venv may live in it).
        old = f"/run/torbiz-oldtmp-{os.getpid()}"
        private_tmp = ["unshare", "--mount", "sh", "-c",
                       f'mkdir -p {old} && mount --bind /tmp {old} && '
                       'mount -t tmpfs torbiz-tmp /tmp && cd "$1" && shift && exec "$@"', "sh"]

        def moved(path: str) -> str:
            return old + path[len("/tmp"):] if path == "/tmp" or path.startswith("/tmp/") \
                else path

        repo = str(Path(__file__).resolve().parent.parent)
        try:
            done = subprocess.run(
                ns.argv([*private_tmp, moved(repo), moved(sys.executable), "-c", _DRIVER,
                         moved(str(python)), dead, "/tmp/monitor.log"]),
                capture_output=True, text=True, timeout=240,
                env={**os.environ, "PYTHONPATH": moved(repo)})
        finally:
            subprocess.run(["rmdir", old], capture_output=True, check=False)
    finally:
        ns.delete()
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all("cannot join the swarm's DHT" in e for e in result["errors"]), result
    assert any(name.startswith("hivemind-p2p") for name in result["used"]), result
    assert result["sock_dir_left"] is False
    assert result["new_tmp"] == [], result
