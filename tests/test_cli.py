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


HOSTILE = ("ready \x1b]52;c;ZWNobyBwd25lZA==\x07 \x1b]0;all nodes ready\x07\x1b[2J"
           "\x9b31m done")


@pytest.mark.parametrize("follow", [False, True])
def test_logs_are_terminal_safe_unless_raw(tmp_path: Path, follow: bool) -> None:
    """A node's log that writes the clipboard (OSC 52), retitles the window and clears the
    screen reaches the terminal inert; `--raw` passes it through for a pipe."""
    from tests.cluster_files import free_port, toml_text

    config = tmp_path / "c.toml"
    config.write_text(toml_text({"name": "logs", "state_dir": str(tmp_path / "state")},
                                [{"name": "a", "host": "127.0.0.1", "transport": "local",
                                  "rpc_port": free_port()}]))
    node_dir = tmp_path / "state" / "logs" / "a"
    node_dir.mkdir(parents=True, mode=0o700)
    for part in (tmp_path / "state", tmp_path / "state" / "logs"):
        part.chmod(0o700)
    (node_dir / "log").write_text(f"first\n{HOSTILE}\n")
    base = [sys.executable, "-m", "tui.cli", "-c", str(config), "logs", "a", "-n", "5"]

    def run(*extra: str) -> str:
        argv = [*base, *extra] + (["-f"] if follow else [])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            return done.stdout
        except subprocess.TimeoutExpired as exc:  # -f follows until stopped
            out = exc.stdout or b""
            return out.decode() if isinstance(out, bytes) else out

    safe = run()
    assert "first" in safe and "done" in safe
    assert "\x1b" not in safe and "\x9b" not in safe and "\x07" not in safe
    raw = run("--raw")
    assert "\x1b]52;c;ZWNobyBwd25lZA==\x07" in raw
