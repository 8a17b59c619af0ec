"""A node whose state directory is on a full disk gets a sentence, not a half-started worker."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from core.cluster import Cluster
from core.config import load_config
from tests.cluster_files import free_port, llama_processes_with, toml_text


@pytest.fixture
def full_disk(tmp_path: Path):
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "state" / "c" / "w0").mkdir(parents=True)
        with open(mount / "filler", "wb") as out, contextlib.suppress(OSError):
            out.write(b"\0" * (1 << 20))
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_for_the_state_directory(full_disk: Path) -> None:
    port = free_port()
    cfg = full_disk.parent / "c.toml"
    cfg.write_text(toml_text({"name": "c", "state_dir": str(full_disk / "state")},
                             [{"name": "w0", "host": "127.0.0.1", "transport": "local",
                               "rpc_port": port}]))
    cluster = Cluster(load_config(cfg))
    try:
        status = await cluster.start_node("w0")
    finally:
        await cluster.close()
    assert status.state == "failed"
    assert "cannot write" in status.error and "disk full" in status.error
    assert llama_processes_with([f"-p {port}"]) == []
