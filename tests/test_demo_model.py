"""The demo model: deterministic, a real GGUF llama, and the real llama-server generates from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import httpx
import pytest

from core.demo_model import _vocab, ensure_demo_model, write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import free_port, wait_healthy


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


def test_vocab_has_every_prefix_of_its_words() -> None:
    """llama.cpp's SPM tokenizer merges pairs only into existing tokens: a word whose prefixes
    are missing would never become one token."""
    tokens = set(_vocab(512)[0])
    for piece in tokens:
        if piece.startswith("\u2581") and len(piece) > 2 and piece.isprintable():
            assert piece[:-1] in tokens, piece


@pytest.mark.integration
def test_llama_server_loads_it_tokenizes_words_and_generates(tmp_path: Path) -> None:
    binary = find_cached_binary("llama-server")
    if binary is None:
        pytest.skip("llama-server not built: run `torbiz-tui build-llama`")
    model = ensure_demo_model(tmp_path / "demo.gguf")
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), "-c", "512", "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        pieces = httpx.post(f"{url}/tokenize", timeout=30, json={
            "content": "hello world", "with_pieces": True}).json()["tokens"]
        assert [t["piece"] for t in pieces] == [" hello", " world"]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8,
            "seed": 7})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        # > 0, not == 8: a random model may sample </s> early.
        assert 0 < body["usage"]["completion_tokens"] <= 8, body
        assert body["choices"][0]["message"]["content"], body
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
