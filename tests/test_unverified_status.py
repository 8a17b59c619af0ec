"""A pidfile that proves nothing (no start-time record, a planted pid) makes the node `failed`
with the guard's sentence: never `stopped`, which would invite a start over a live process."""

from __future__ import annotations

import os
from pathlib import Path

from core.cluster import Cluster
from core.config import load_config
from core.status import FAILED
from tests.cluster_files import free_port, toml_text


async def test_a_pidfile_without_a_record_is_failed_not_stopped(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"name": "guard", "state_dir": str(tmp_path / "state")},
                              [{"name": "a", "host": "127.0.0.1", "transport": "local",
                                "rpc_port": free_port()}]))
    node_dir = tmp_path / "state" / "guard" / "a"
    node_dir.mkdir(parents=True, mode=0o700)
    for part in (tmp_path / "state", tmp_path / "state" / "guard"):
        part.chmod(0o700)
    (node_dir / "pid").write_text(f"{os.getpid()}\n")  # a live pid, and nothing proving it ours
    cluster = Cluster(load_config(path))
    try:
        status = await cluster.probe_node("a")
    finally:
        await cluster.close()
    assert status.state == FAILED, status
    assert "pid" in status.error and status.error
