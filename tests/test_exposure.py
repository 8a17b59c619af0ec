"""What a cluster opens to the network: local workers listen on loopback, every interface needs
rpc_bind = "any", and exposure_warnings() names each endpoint that listens beyond loopback
(for `up`, `u` and `s` to show before anything starts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from core.cluster import Cluster
from core.config import ConfigError, load_config, parse_config
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.rpc import bind_address, rpc_server_args
from core.engines.registry import exposure_warnings, node_exposure
from tests.cluster_files import free_port, toml_text

REPO = Path(__file__).resolve().parent.parent


def config_of(nodes: list[dict[str, Any]], **tables: Any) -> Any:
    return parse_config({"nodes": nodes, **tables}, Path("/cfg/c.toml"))


def test_a_local_node_named_localhost_binds_loopback() -> None:
    config = config_of([{"name": "w", "host": "localhost", "transport": "local"}])
    node = config.node("w")
    assert bind_address(node) == "127.0.0.1"
    assert rpc_server_args(node)[:2] == ["-H", "127.0.0.1"]
    assert exposure_warnings(config) == []


def test_every_interface_needs_rpc_bind_any() -> None:
    with pytest.raises(ConfigError, match='rpc_bind = "any" to listen on every interface') as e:
        config_of([{"name": "gpu", "host": "gpu-box"}])
    assert "nodes[0] (gpu)" in str(e.value) and "rpc_host" in e.value.message
    config = config_of([{"name": "gpu", "host": "gpu-box", "rpc_bind": "any"}])
    assert bind_address(config.node("gpu")) == "0.0.0.0"
    [warning] = exposure_warnings(config)
    assert warning.startswith("gpu: rpc-server listens on every interface of gpu-box")
    assert "no authentication" in warning
    # A name is fine through a tunnel, or with the node's address in rpc_host.
    for extra in ({"rpc_bind": "loopback"}, {"rpc_host": "10.0.0.5"}):
        assert bind_address(config_of([{"name": "gpu", "host": "gpu-box", **extra}])
                            .node("gpu")) in ("127.0.0.1", "10.0.0.5")


def test_one_sentence_per_exposed_endpoint() -> None:
    config = config_of(
        [{"name": "here", "host": "localhost", "transport": "local"},
         {"name": "lan", "host": "10.0.0.5"},
         {"name": "all", "host": "10.0.0.6", "rpc_bind": "any"},
         {"name": "tunnel", "host": "10.0.0.7", "rpc_bind": "loopback"},
         {"name": "lo", "host": "127.0.0.2"}],
        coordinator={"host": "0.0.0.0", "port": 8081})
    warnings = exposure_warnings(config)
    assert len(warnings) == 3, warnings
    api, lan, every = warnings
    assert api.startswith("the coordinator's API listens on every interface of this machine, "
                          "port 8081") and "$TORBIZ_API_KEY" in api
    assert lan.startswith("lan: rpc-server listens on 10.0.0.5, port 50052")
    assert every.startswith("all: rpc-server listens on every interface of 10.0.0.6")
    assert node_exposure(config.node("lan")) == lan and node_exposure(config.node("lo")) is None
    [api] = exposure_warnings(config_of([{"name": "a", "host": "127.0.0.1"}],
                                        coordinator={"host": "10.0.0.1"}))
    assert api.startswith("the coordinator's API listens on 10.0.0.1, port 8080")


def test_petals_servers_announced_beyond_loopback() -> None:
    config = config_of([{"name": "p0", "host": "127.0.0.2", "backend": "petals"},
                        {"name": "p1", "host": "10.0.0.8", "backend": "petals",
                         "rpc_port": 31337}], coordinator={"host": "0.0.0.0"})
    [warning] = exposure_warnings(config)  # a Petals cluster starts no llama-server
    assert warning.startswith("p1: the Petals server listens on 10.0.0.8, port 31337")
    assert "announces" in warning and "no authentication" in warning


def test_the_shipped_configs() -> None:
    assert exposure_warnings(load_config(REPO / "configs" / "demo.toml")) == []
    lan = exposure_warnings(load_config(REPO / "configs" / "example-lan.toml"))
    assert [w.split(":")[0] for w in lan] == ["gpu-a", "gpu-b", "gpu-c", "cpu-d"]


@pytest.mark.integration
async def test_a_real_local_worker_named_localhost_listens_on_loopback_only(
        tmp_path: Path) -> None:
    if not find_cached_binary("ggml-rpc-server"):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")
    path = tmp_path / "c.toml"
    port = free_port()
    path.write_text(toml_text({"name": "lo", "state_dir": str(tmp_path / "state")},
                              [{"name": "w0", "host": "localhost", "transport": "local",
                                "rpc_port": port, "threads": 1}]))
    cluster = Cluster(load_config(path))
    try:
        status = await cluster.start_node("w0")
        assert status.state == "ready", status.error
        assert status.pid is not None
        listening = {c.laddr.ip for c in psutil.Process(status.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
    finally:
        await cluster.down()
        await cluster.close()
