"""The preflight: each problem a sentence with its fix; `up` refuses on a failed check."""

from __future__ import annotations

from pathlib import Path

from core.cluster import Cluster
from core.config import NodeConfig, load_config
from core.engines.llama_rpc.doctor import bind_check as _bind_check
from core.operations import doctor as run_doctor
from tests.cluster_files import free_port, toml_text


def test_bind_warnings() -> None:
    def level(**kw: str) -> str:
        return _bind_check(NodeConfig(name="n", **{"host": "10.0.0.5", **kw})).level

    assert level(rpc_bind="loopback") == "ok"
    assert level() == "ok"  # a private LAN address
    assert level(rpc_bind="any") == "warning"
    assert level(host="gpu-box") == "warning"  # a name: rpc-server must bind 0.0.0.0
    assert level(host="8.8.8.8") == "warning"
    assert "no authentication" in _bind_check(NodeConfig(name="n", host="8.8.8.8")).message


async def test_local_cluster_report(tmp_path: Path) -> None:
    nodes = [{"name": "w0", "host": "127.0.0.1", "transport": "local", "rpc_port": free_port()},
             {"name": "w1", "host": "127.0.0.1", "transport": "local", "rpc_port": free_port(),
              "rpc_server": str(tmp_path / "missing-binary")}]
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"name": "doc", "state_dir": str(tmp_path / "state")}, nodes,
                              model={"gguf": str(tmp_path / "absent.gguf")}))
    cluster = Cluster(load_config(path))
    try:
        report = await run_doctor(cluster)
    finally:
        await cluster.close()
    failed = {(c.part, c.name): c.message for c in report.failed}
    assert set(failed) == {("coordinator", "model"), ("w1", "binary")}
    assert "absent.gguf not found" in failed[("coordinator", "model")]
    assert "is not an executable file" in failed[("w1", "binary")]
    assert report.probes["w0"].cores > 0
    data = report.to_json()
    assert data["ok"] is False and data["nodes"]["w0"]["ram_total_bytes"] > 0


async def test_a_running_worker_is_asked_its_protocol(tmp_path: Path) -> None:
    """A real HELLO to our running worker, compared with the coordinator's build."""
    import pytest

    from core.engines.llama_rpc.build import find_cached_binary

    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    path = tmp_path / "c.toml"
    path.write_text(toml_text({"name": "doc", "state_dir": str(tmp_path / "state")},
                              [{"name": "w0", "host": "127.0.0.1", "transport": "local",
                                "rpc_port": free_port(), "threads": 1}],
                              model={"gguf": str(tmp_path / "absent.gguf")}))
    cluster = Cluster(load_config(path))
    try:
        assert (await cluster.start_node("w0")).state == "ready"
        report = await run_doctor(cluster)
    finally:
        await cluster.stop_workers()
        await cluster.close()
    checks = {(c.part, c.name): c for c in report.checks}
    built = checks[("coordinator", "protocol")]
    assert built.level == "ok" and built.message.startswith("RPC protocol ")
    version = built.message.removeprefix("RPC protocol ")
    worker = checks[("w0", "protocol")]
    assert worker.level == "ok"
    assert worker.message == f"RPC protocol {version} (coordinator {version})"
