"""The demo model: deterministic, a real GGUF llama, and the real llama-server generates from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import httpx
import pytest

from core.demo_model import ensure_demo_model, write_demo_model
from core.llama_build import find_cached_binary

from .cluster_files import free_port, wait_healthy


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a.gguf", n_layer=2)
    b = write_demo_model(tmp_path / "b.gguf", n_layer=2)
    c = write_demo_model(tmp_path / "c.gguf", n_layer=2, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_reads_back_as_a_llama_with_every_block(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(write_demo_model(tmp_path / "m.gguf", n_layer=5))
    field = reader.fields["llama.block_count"]
    assert int(field.parts[field.data[0]][0]) == 5
    names = {t.name for t in reader.tensors}
    for i in range(5):
        assert f"blk.{i}.ffn_down.weight" in names
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= names


def test_ensure_writes_once(tmp_path: Path) -> None:
    path = ensure_demo_model(tmp_path / "d" / "demo.gguf")
    stamp = path.stat().st_mtime_ns
    assert ensure_demo_model(path) == path
    assert path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob(".*partial"))


@pytest.mark.integration
def test_llama_server_loads_it_and_generates(tmp_path: Path) -> None:
    binary = find_cached_binary("llama-server")
    if binary is None:
        pytest.skip("llama-server not built: run `torbiz-tui build-llama`")
    model = ensure_demo_model(tmp_path / "demo.gguf")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "-c", "512", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
