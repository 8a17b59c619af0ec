"""`torbiz-tui plan`: real probes of local nodes, the real demo model's header."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.demo_model import ensure_demo_model
from tests.cluster_files import free_port, toml_text


def _config(tmp_path: Path, plan: dict, **node_keys: object) -> Path:
    nodes = [{"name": f"w{i}", "host": "127.0.0.1", "transport": "local",
              "rpc_port": free_port(), **node_keys} for i in range(3)]
    path = tmp_path / "p.toml"
    path.write_text(toml_text({"name": "p", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(ensure_demo_model(tmp_path / "m.gguf")),
                                     "context": 512},
                              plan=plan))
    return path


def plan(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", "-c", str(path), "plan", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_spread_covers_every_block_in_order(tmp_path: Path) -> None:
    result = plan(_config(tmp_path, {"policy": "spread", "coordinator_layers": False}), "--json")
    assert result.returncode == 0, result.stderr
    spans = json.loads(result.stdout)["spans"]
    assert [s[0] for s in spans] == ["w0", "w1", "w2"]
    assert spans[0][1] == 0
    assert all(a[1] + a[2] == b[1] for a, b in zip(spans, spans[1:], strict=False))
    assert sum(s[2] for s in spans) == 8


def test_pack_uses_one_node_when_one_is_enough(tmp_path: Path) -> None:
    result = plan(_config(tmp_path, {"coordinator_layers": False}))
    assert result.returncode == 0, result.stderr
    assert "0-7 (8)" in result.stdout
    assert "not used: w1, w2" in result.stdout or "not used: w0, w2" in result.stdout or \
        "not used: w0, w1" in result.stdout


def test_refusal_says_what_is_missing(tmp_path: Path) -> None:
    result = plan(_config(tmp_path, {"coordinator_layers": False}, max_memory_gb=0.001))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "missing" in line
    assert "w0" in line and "w2" in line
