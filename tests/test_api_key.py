"""The coordinator's API key comes from the environment, is required when the API would leave
this machine, and never appears on a command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import ensure_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.coordinator import (
    CoordinatorError,
    coordinator_api_key,
    coordinator_argv,
    coordinator_env,
)
from tests.cluster_files import free_port, llama_processes_with, toml_text, wait_healthy

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


@pytest.mark.parametrize("key", ["tbz,secret", "tbz secret", 'tbz"secret', "tbz-s\u00e9cret",
                                 "tbz\tsecret"])
async def test_a_key_llama_server_would_read_otherwise_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """llama-server splits --api-key/LLAMA_API_KEY at commas (each part alone would open the
    API) and reads quotes as CSV; an HTTP header carries no spaces or non-ASCII as is."""
    monkeypatch.setenv("TBZ_TEST_KEY", key)
    config = load_config(_config(tmp_path, "127.0.0.1"))
    with pytest.raises(CoordinatorError, match=r"the API key in \$TBZ_TEST_KEY contains"):
        coordinator_api_key(config)
    cluster = Cluster(config)
    try:
        status = await cluster.start_coordinator(timeout=10)
    finally:
        await cluster.close()
    assert status.state == "failed" and "the API key in $TBZ_TEST_KEY contains" in status.error
    assert ("comma" in status.error) == ("," in key)


def _start_server(tmp_path: Path, config: Any, env: dict[str, str] | None,
                  name: str) -> tuple[subprocess.Popen[bytes], Path]:
    binary = find_cached_binary("llama-server")
    assert binary is not None
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(coordinator_argv(config, str(binary), [], layers=[]),
                                env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


def test_the_key_stays_out_of_llama_servers_log(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """At -lv 4 (which the load log needs) llama-server prints a single key's last four
    characters; the environment torbiz gives it (the key twice) makes it print a count."""
    if not find_cached_binary("llama-server"):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    monkeypatch.setenv("TBZ_TEST_KEY", SECRET)
    config = load_config(_config(tmp_path, "127.0.0.1"))
    url = f"http://127.0.0.1:{config.coordinator.port}"
    body = {"prompt": "hi", "max_tokens": 2}
    for name, env in (("one key", {"LLAMA_API_KEY": SECRET}),
                      ("torbiz", coordinator_env(config))):
        proc, log = _start_server(tmp_path, config, env, name)
        try:
            wait_healthy(url, proc)
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
            ok = httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {SECRET}"})
            assert ok.status_code == 200
        finally:
            proc.terminate()
            proc.wait(15)
        text = log.read_text(errors="replace")
        assert "-lv" in coordinator_argv(config, "llama-server", [], layers=[])
        if name == "one key":  # what llama-server does with one key: why torbiz gives two
            assert f"api_keys: ****{SECRET[-4:]}" in text
        else:
            assert SECRET[-4:] not in text and "api_keys: 2 keys loaded" in text
    assert coordinator_env(config) == {"LLAMA_API_KEY": f"{SECRET},{SECRET}"}
    monkeypatch.delenv("TBZ_TEST_KEY")
    assert coordinator_env(config) is None
