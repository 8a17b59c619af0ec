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
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad}: [nodes[0] (a)]: unknown key 'port' (allowed: ")
    assert "ssh_port" in lines[0]
    assert "Traceback" not in result.stderr
