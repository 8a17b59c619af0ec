"""The weight cache on real sshd nodes with real rpc-server and llama-server: the manifest
against the worker's own cache files, pre-warm from the node's copy (nothing cached crosses),
caches that cannot lie, a copy of another model refused, prune, hostile paths."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.config import load_config
from core.engines.llama_rpc.build import find_cached_binary
from core.engines.llama_rpc.manifest import load_manifest
from tests.cluster_files import ssh_cluster_file

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 MB, two blocks: the ffn matrices (11 MiB) and the output (16 MiB) are cacheable."""
    from core.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "big.gguf", n_layer=2,
                            n_embd=1024, n_head=8, n_head_kv=8, n_ff=5632, n_vocab=8192)


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp binaries not built: run `torbiz-tui build-llama`")


def cache_files(tmp_path: Path, node: str) -> dict[str, int]:
    d = tmp_path / "state" / "t" / node / "cache" / "rpc"
    return {p.name: p.stat().st_size for p in d.iterdir()} if d.is_dir() else {}


def worker_received(host: str) -> int:
    """Bytes the worker on host:50052 received on its established connections (ss -ti)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "src", host, "sport", "= :50052"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(m) for m in re.findall(r"bytes_received:(\d+)", out))


def complete(cfg: Path, prompt: str = "hello world") -> tuple[str, list[object]]:
    port = load_config(cfg).coordinator.port
    reply = httpx.post(f"http://127.0.0.1:{port}/completion", timeout=120, json={
        "prompt": prompt, "n_predict": 12, "temperature": 0, "n_probs": 3, "cache_prompt": False})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["content"], body.get("completion_probabilities", [])


def test_manifest_prewarm_from_node_copy_and_warm_load(tmp_path: Path, sshd_cluster,
                                                        big_model: Path) -> None:
    sshd = sshd_cluster(count=2)
    cfg = ssh_cluster_file(tmp_path, sshd, big_model)
    manifest = load_manifest(big_model)
    want = {"node1": manifest.for_span(0, 1, False), "node2": manifest.for_span(1, 1, True)}
    try:
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 0, up.stdout + up.stderr
        cold_text, cold_probs = complete(cfg)
        cold_bytes = {n.name: worker_received(n.host) for n in sshd.nodes}
        # The worker's own saves after a cold load: exactly the manifest's names and sizes.
        for name, tensors in want.items():
            assert cache_files(tmp_path, name) == {t.hash: t.size for t in tensors}
    finally:
        assert cli("-c", str(cfg), "down").returncode == 0
    for node in sshd.nodes:
        shutil.rmtree(tmp_path / "state" / "t" / node.name / "cache")

    cold_map = json.loads(cli("-c", str(cfg), "cache", "--json").stdout)
    assert [n["warm_share"] for n in cold_map["nodes"]] == [0.0, 0.0]
    warm = cli("-c", str(cfg), "cache", "warm", "--verify")
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert warm.stdout.count("from its node copy") == 2, warm.stdout
    for name, tensors in want.items():
        assert cache_files(tmp_path, name) == {t.hash: t.size for t in tensors}
        mode = (tmp_path / "state" / "t" / name / "cache" / "rpc").stat().st_mode & 0o777
        assert mode == 0o700
    warm_map = json.loads(cli("-c", str(cfg), "cache", "--json").stdout)
    assert [n["warm_share"] for n in warm_map["nodes"]] == [1.0, 1.0]
    again = cli("-c", str(cfg), "cache", "warm")
    assert "0 tensor(s)" in again.stdout and again.stdout.count("already warm") == 2

    try:
        up = cli("-c", str(cfg), "up")
        assert up.returncode == 0, up.stdout + up.stderr
        warm_text, warm_probs = complete(cfg)
        warm_bytes = {n.name: worker_received(n.host) for n in sshd.nodes}
    finally:
        assert cli("-c", str(cfg), "down").returncode == 0
    assert warm_text == cold_text and warm_probs == cold_probs
    for name, tensors in want.items():
        cached = sum(t.size for t in tensors)
        # None of the cached tensors crossed: the warm load is short of them all.
        assert warm_bytes[name] <= cold_bytes[name] - cached + (1 << 20), (warm_bytes, cold_bytes)
        assert cold_bytes[name] > cached


def test_caches_that_cannot_lie_refusal_prune_and_hostile_paths(tmp_path: Path, sshd_cluster,
                                                                big_model: Path) -> None:
    from core.demo_model import write_demo_model

    sshd = sshd_cluster(count=2)
    other = write_demo_model(tmp_path / "other.gguf", n_layer=2)  # another model
    odd = tmp_path / "m'$(touch PWNED)`touch PWNED2`;x.gguf"
    os.link(big_model, odd)
    cfg = ssh_cluster_file(tmp_path, sshd, big_model, node_overrides={
        "node1": {"model_path": str(other)}, "node2": {"model_path": str(odd)}})
    refused = cli("-c", str(cfg), "cache", "warm")
    assert refused.returncode == 1
    assert f"node1: its model copy {other} is not the same model" in refused.stdout
    assert "from its node copy" in refused.stdout  # node2, through the hostile path
    assert not list(tmp_path.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert cache_files(tmp_path, "node1") == {}

    # node1 without a copy: pushed over SSH.
    cfg = ssh_cluster_file(tmp_path, sshd, big_model,
                           node_overrides={"node1": {"model_path": str(tmp_path / "none")}})
    pushed = cli("-c", str(cfg), "cache", "warm", "node1")
    assert pushed.returncode == 0 and "from its push" in pushed.stdout, pushed.stdout
    manifest = load_manifest(big_model)
    n1 = tmp_path / "state" / "t" / "node1" / "cache" / "rpc"
    n2 = tmp_path / "state" / "t" / "node2" / "cache" / "rpc"
    t1, t2, t3 = manifest.for_span(0, 1, False)
    (n1 / t1.hash).write_bytes((n1 / t1.hash).read_bytes()[:1000])  # truncated
    with open(n1 / t2.hash, "ab") as f:  # oversized: would crash rpc-server
        f.write(b"x")
    data = bytearray((n1 / t3.hash).read_bytes())
    data[5] ^= 0xFF
    (n1 / t3.hash).write_bytes(bytes(data))  # same size, other bytes
    shown = cli("-c", str(cfg), "cache", "--json")
    assert json.loads(shown.stdout)["nodes"][0]["wrong_files"] == 2
    # The size check before the worker starts moves the first two aside.
    started = cli("-c", str(cfg), "up")
    cli("-c", str(cfg), "down")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "truncated" in started.stdout + started.stderr
    assert "oversized" in started.stdout + started.stderr
    aside = list((tmp_path / "state" / "t" / "node1" / "cache" / "aside").iterdir())
    assert len(aside) == 2
    verified = cli("-c", str(cfg), "cache", "--verify")
    assert f"cache file {t3.hash}" in verified.stdout and "hash mismatch" in verified.stdout
    rewarm = cli("-c", str(cfg), "cache", "warm", "node1", "--verify")
    assert rewarm.returncode == 0, rewarm.stdout
    from core.engines.llama_rpc.manifest import fnv1a_range
    for t in (t1, t2, t3):
        assert fnv1a_range(n1 / t.hash, 0, t.size) == t.hash

    # Prune: a tensor of no configured model goes, the model's stay; a dry run first.
    foreign = n2 / "0123456789abcdef"
    foreign.write_bytes(b"y" * 4096)
    before = sorted(p.name for p in n2.iterdir())
    dry = cli("-c", str(cfg), "cache", "prune", "--dry-run")
    assert "node2: would evict 1 file(s)" in dry.stdout and "0123456789abcdef" in dry.stdout
    assert sorted(p.name for p in n2.iterdir()) == before
    done = cli("-c", str(cfg), "cache", "prune")
    assert "node2: evicted 1 file(s)" in done.stdout
    assert not foreign.exists()
    assert {p.name for p in n2.iterdir()} == set(before) - {foreign.name}
