"""The coordinator's API key comes from the environment, is required when the API would leave
this machine, and never appears on a command line."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import free_port, llama_processes_with, toml_text

pytestmark = pytest.mark.integration
SECRET = "tbz-test-secret-4f1c9a"


def _config(tmp_path: Path, host: str) -> Path:
    nodes = [{"name": "w0", "host": "127.0.0.1", "transport": "local", "rpc_port": free_port(),
              "threads": 1}]
    path = tmp_path / "k.toml"
    path.write_text(toml_text({"name": "key", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(ensure_demo_model(tmp_path / "m.gguf")),
                                     "context": 512},
                              coordinator={"host": host, "port": free_port(),
                                           "api_key_env": "TBZ_TEST_KEY"}))
    return path


async def test_non_loopback_api_without_a_key_is_refused(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TBZ_TEST_KEY", raising=False)
    cluster = Cluster(load_config(_config(tmp_path, "0.0.0.0")))
    try:
        status = await cluster.start_coordinator(timeout=10)
    finally:
        await cluster.close()
    assert status.state == "failed"
    assert "with no API key: export TBZ_TEST_KEY=" in status.error
    assert "never put the key in the config file" in status.error


async def test_key_from_the_environment_guards_the_api(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    monkeypatch.setenv("TBZ_TEST_KEY", SECRET)
    path = _config(tmp_path, "127.0.0.1")
    config = load_config(path)
    cluster = Cluster(config)
    try:
        await operations.up(cluster, force=True)
        url = cluster.coordinator.url
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {SECRET}"})
        assert ok.status_code == 200
        assert (await cluster.engine.throughput()) is not None  # the monitor sends the key
        for proc in psutil.process_iter(["cmdline"]):
            assert SECRET not in " ".join(proc.info["cmdline"] or [])
    finally:
        await cluster.down()
        await cluster.close()
    assert llama_processes_with([f"--port {config.coordinator.port}"]) == []
