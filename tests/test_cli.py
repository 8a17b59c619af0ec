"""The entry's config lookup and its error lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tui.cli import DEMO_CONFIG, resolve_config_path


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORBIZ_CONFIG", raising=False)
    assert resolve_config_path(None) == (DEMO_CONFIG, True)
    (tmp_path / "torbiz.toml").write_text("")
    assert resolve_config_path(None) == (Path("torbiz.toml"), False)
    monkeypatch.setenv("TORBIZ_CONFIG", "/etc/x.toml")
    assert resolve_config_path(None) == (Path("/etc/x.toml"), False)
    assert resolve_config_path("mine.toml") == (Path("mine.toml"), False)


def test_broken_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[nodes]]\nname = "a"\nhost = "h"\nport = 22\n')
    result = subprocess.run([sys.executable, "-m", "tui.cli", "-c", str(bad), "status"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}: [nodes[0] (a)]: unknown key 'port' (allowed: backend, cache, "
        "config_file, connect_timeout, host, identity_file, keepalive_count_max, "
        "keepalive_interval, known_hosts, name, rpc_bind, rpc_host, rpc_port, rpc_server, ssh_port, "
        "threads, transport, user)"]
    assert "Traceback" not in result.stderr
