"""Model facts from headers alone: the demo GGUF checked against hand-computed sizes, a 70B-shaped
header over a sparse file (never read), per-block KV heads and tied heads, Llama-2 configs
for Petals, and errors that name the file."""

from __future__ import annotations

import json
import resource
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from core.demo_model import write_demo_model
from core.planning.model_info import (
    ModelInfo,
    ModelInfoError,
    cache_row_bytes,
    describe_bytes,
    llama_block_params,
    read_gguf_info,
    read_hf_info,
)

F16, F32 = 2, 4
Q4_K = gguf.GGMLQuantizationType.Q4_K
Q6_K = gguf.GGMLQuantizationType.Q6_K


def quant_bytes(kind: gguf.GGMLQuantizationType, elements: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return elements // block * size


# ---- the demo model -------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    {},  # the defaults: 8 blocks, n_embd 256, 4 heads, 2 KV heads, n_ff 512, 512 tokens
    {"n_layer": 3, "n_embd": 128, "n_head": 8, "n_head_kv": 8, "n_ff": 96, "n_vocab": 300,
     "context": 4096},
    {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_head_kv": 1, "n_ff": 160, "dtype": "f32"},
])
def test_demo_model_sizes_by_hand(tmp_path: Path, params: dict[str, object]) -> None:
    p: dict[str, object] = {"n_layer": 8, "n_embd": 256, "n_head": 4, "n_head_kv": 2,
                            "n_ff": 512, "n_vocab": 512, "context": 2048, "dtype": "f16",
                            **params}
    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, context = (
        int(p[k]) for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab",
                            "context"))  # type: ignore[call-overload]
    path = write_demo_model(tmp_path / "m.gguf", **p)  # type: ignore[arg-type]
    info = read_gguf_info(path)

    w = F16 if p["dtype"] == "f16" else F32  # matrices; norms are always f32
    head_dim = n_embd // n_head
    kv = n_head_kv * head_dim
    block = w * (n_embd * n_embd  # attn_q
                 + 2 * kv * n_embd  # attn_k, attn_v
                 + n_embd * n_embd  # attn_output
                 + 3 * n_ff * n_embd)  # ffn_gate, ffn_up, ffn_down
    block += F32 * 2 * n_embd  # attn_norm, ffn_norm
    assert info.layer_bytes == (block,) * n_layer
    assert info.n_layers == n_layer
    assert info.embedding_bytes == w * n_vocab * n_embd
    assert info.output_bytes == w * n_vocab * n_embd + F32 * n_embd
    assert not info.output_tied
    assert (info.architecture, info.name) == ("llama", "torbiz-demo")
    assert info.context_length == context
    assert (info.n_embd, info.n_head, info.n_head_kv) == (n_embd, n_head, n_head_kv)
    assert (info.head_dim_k, info.head_dim_v) == (head_dim, head_dim)
    assert info.total_bytes <= path.stat().st_size  # plus header and alignment padding
    # The matrices a repacking CPU copies: each block's seven, and the output head's.
    assert [len(m) for m in info.layer_matrices] == [7] * n_layer
    assert sum(m.n_bytes for m in info.layer_matrices[0]) == block - F32 * 2 * n_embd
    assert {m.type for m in info.layer_matrices[0]} == {"F16" if w == F16 else "F32"}
    assert [m.n_bytes for m in info.output_matrices] == [w * n_vocab * n_embd]

    per_token = (n_head_kv * head_dim + n_head_kv * head_dim) * F16
    assert info.kv_bytes_per_token_per_layer() == per_token
    assert info.kv_bytes_per_token_per_layer("f32") == 2 * per_token
    assert info.kv_bytes(n_layer, 1000) == n_layer * 1000 * per_token
    assert info.kv_bytes(1, 10, first_layer=n_layer - 1) == 10 * per_token


def test_quantized_cache_types_take_whole_blocks() -> None:
    assert cache_row_bytes("f16", 128) == 256
    assert cache_row_bytes("f32", 128) == 512
    assert cache_row_bytes("q8_0", 128) == 4 * 34  # 34 bytes per 32 values
    assert cache_row_bytes("q4_0", 128) == 4 * 18  # 18 bytes per 32 values
    assert cache_row_bytes("q8_0", 33) == 2 * 34
    info = _info(n_head_kv=2, head_dim_k=64, head_dim_v=64)
    assert info.kv_bytes_per_token_per_layer("q8_0") == 2 * 4 * 34
    assert info.kv_bytes_per_token_per_layer("q4_0") == 2 * 4 * 18
    with pytest.raises(ValueError, match="unknown KV cache type 'q3'"):
        info.kv_bytes_per_token_per_layer("q3")
    with pytest.raises(ValueError, match="not in 0..3"):
        info.kv_bytes(3, 10, first_layer=2)


def _info(**overrides: object) -> ModelInfo:
    fields: dict[str, object] = dict(
        path="x", architecture="llama", name="x", n_layers=4, layer_bytes=(1, 2, 3, 4),
        embedding_bytes=0, output_bytes=0, output_tied=False, context_length=4096,
        n_embd=128, n_head=2, n_head_kv=2, head_dim_k=64, head_dim_v=64)
    fields.update(overrides)
    return ModelInfo(**fields)  # type: ignore[arg-type]


# ---- headers written by hand ----------------------------------------------------------------


def write_header_only_gguf(path: Path, arch: str, kv: dict[str, object],
                           tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]],
                           file_size: int) -> Path:
    """A GGUF whose header and tensor infos are real and whose data is a hole: the file is
    truncated up to `file_size`, so it takes no disk and reading the data would only find
    zeros (slowly, for a 40 GB file)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    for name, shape, kind in tensors:
        elements = int(np.prod(shape))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor_info(name, shape, np.dtype(np.float32), elements // block * size,
                               raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as handle:
        handle.truncate(file_size)
    return path


def llama2_70b_q4k(path: Path, context: int = 4096) -> Path:
    """Llama-2-70B's real shapes (80 blocks, n_embd 8192, 64 heads, 8 KV heads, n_ff 28672,
    vocab 32000) with Q4_K matrices and a Q6_K output, as a header over a 40 GiB hole."""
    h, kv, ff, vocab = 8192, 1024, 28672, 32000
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (vocab, h), Q4_K)]
    for i in range(80):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (h,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.attn_q.weight", (h, h), Q4_K),
            (f"blk.{i}.attn_k.weight", (kv, h), Q4_K),
            (f"blk.{i}.attn_v.weight", (kv, h), Q4_K),
            (f"blk.{i}.attn_output.weight", (h, h), Q4_K),
            (f"blk.{i}.ffn_norm.weight", (h,), gguf.GGMLQuantizationType.F32),
            (f"blk.{i}.ffn_gate.weight", (ff, h), Q4_K),
            (f"blk.{i}.ffn_up.weight", (ff, h), Q4_K),
            (f"blk.{i}.ffn_down.weight", (h, ff), Q4_K),
        ]
    tensors += [("output_norm.weight", (h,), gguf.GGMLQuantizationType.F32),
                ("output.weight", (vocab, h), Q6_K)]
    kvs: dict[str, object] = {
        "general.name": "llama-2-70b-shaped", "llama.block_count": 80,
        "llama.context_length": context, "llama.embedding_length": h,
        "llama.feed_forward_length": ff, "llama.attention.head_count": 64,
        "llama.attention.head_count_kv": 8}
    return write_header_only_gguf(path, "llama", kvs, tensors, file_size=40 << 30)


LLAMA2_70B_Q4K_BLOCK = (2 * quant_bytes(Q4_K, 8192 * 8192) + 2 * quant_bytes(Q4_K, 1024 * 8192)
                        + 3 * quant_bytes(Q4_K, 28672 * 8192) + 2 * 8192 * F32)


def test_70b_header_is_read_without_touching_the_data(tmp_path: Path) -> None:
    path = llama2_70b_q4k(tmp_path / "70b.gguf")
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.monotonic()
    info = read_gguf_info(path)
    elapsed = time.monotonic() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    # Reading the mapped data faults about 1.4 times per MiB here (fault-around): the 40 GiB
    # would be some 58,000 faults and many seconds; the header alone is under 1,000.
    assert faults < 5_000 and elapsed < 5, (faults, elapsed)
    assert LLAMA2_70B_Q4K_BLOCK == 481_361_920
    assert info.layer_bytes == (LLAMA2_70B_Q4K_BLOCK,) * 80
    assert info.embedding_bytes == quant_bytes(Q4_K, 32000 * 8192)
    assert info.output_bytes == quant_bytes(Q6_K, 32000 * 8192) + 8192 * F32
    assert (info.n_head, info.n_head_kv, info.head_dim_k) == (64, 8, 128)
    assert info.kv_bytes_per_token_per_layer() == 2 * 8 * 128 * F16  # 4 KiB
    assert info.kv_bytes(80, 4096) == 80 << 24  # 1.25 GiB at 4096 tokens
    assert 35 << 30 < info.weight_bytes < 36 << 30


def test_per_block_kv_heads_head_sizes_and_a_tied_head(tmp_path: Path) -> None:
    h, vocab = 64, 300
    kv_heads = [2, 0, 4]  # a block without attention keeps no cache
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (vocab, h), gguf.GGMLQuantizationType.F16)]
    for i, heads in enumerate(kv_heads):
        tensors.append((f"blk.{i}.attn_norm.weight", (h,), gguf.GGMLQuantizationType.F32))
        if heads:
            tensors.append((f"blk.{i}.attn_k.weight", (heads * 96, h),
                            gguf.GGMLQuantizationType.F16))
    tensors.append(("output_norm.weight", (h,), gguf.GGMLQuantizationType.F32))
    kvs: dict[str, object] = {
        "gemmoid.block_count": 3, "gemmoid.context_length": 8192,
        "gemmoid.embedding_length": h, "gemmoid.attention.head_count": 4,
        "gemmoid.attention.head_count_kv": kv_heads, "gemmoid.attention.key_length": 96,
        "gemmoid.attention.value_length": 32}
    path = write_header_only_gguf(tmp_path / "g.gguf", "gemmoid", kvs, tensors, 1 << 20)
    info = read_gguf_info(path)
    assert info.name == "g"  # no general.name: the file's stem
    assert info.n_head_kv_per_layer == (2, 0, 4) and info.n_head_kv == 4
    assert (info.head_dim_k, info.head_dim_v) == (96, 32)
    assert info.layer_bytes == (h * 4 + 2 * 96 * h * 2, h * 4, h * 4 + 4 * 96 * h * 2)
    assert info.output_tied
    # The tied head is token_embd loaded again on the last block's device.
    assert info.output_bytes == h * F32 + vocab * h * F16
    assert [(m.type, m.n_bytes) for m in info.output_matrices] == [("F16", vocab * h * F16)]
    assert [len(m) for m in info.layer_matrices] == [1, 0, 1]
    assert info.embedding_bytes == vocab * h * F16
    assert info.kv_bytes_per_token_per_layer(layer=0) == 2 * (96 + 32) * F16
    assert info.kv_bytes_per_token_per_layer(layer=1) == 0
    assert info.kv_bytes_per_token_per_layer() == 4 * (96 + 32) * F16  # the largest
    assert info.kv_bytes(3, 100) == 100 * 6 * (96 + 32) * F16
    assert info.kv_bytes(1, 100, first_layer=1) == 0


def test_missing_keys_and_bad_files_name_the_path(tmp_path: Path) -> None:
    path = write_header_only_gguf(
        tmp_path / "nokey.gguf", "llama",
        {"llama.block_count": 1, "llama.embedding_length": 8, "llama.attention.head_count": 2},
        [("blk.0.attn_norm.weight", (8,), gguf.GGMLQuantizationType.F32)], 1 << 16)
    with pytest.raises(ModelInfoError, match=rf"^{path}: missing key llama.context_length$"):
        read_gguf_info(path)

    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model at all")
    with pytest.raises(ModelInfoError, match=rf"^{text}: not a GGUF file"):
        read_gguf_info(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelInfoError, match=rf"^{empty}: not a GGUF file"):
        read_gguf_info(empty)
    with pytest.raises(ModelInfoError, match=rf"^{tmp_path / 'absent.gguf'}: cannot read"):
        read_gguf_info(tmp_path / "absent.gguf")

    whole = write_demo_model(tmp_path / "whole.gguf", n_layer=2)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a partial download
    with pytest.raises(ModelInfoError, match=rf"^{cut}: not a GGUF file, or a truncated one"):
        read_gguf_info(cut)

    wrong = write_header_only_gguf(
        tmp_path / "wrong.gguf", "llama",
        {"llama.block_count": 2, "llama.embedding_length": 8, "llama.context_length": 64,
         "llama.attention.head_count": 2, "llama.attention.head_count_kv": [1, 1, 1]},
        [("blk.0.attn_norm.weight", (8,), gguf.GGMLQuantizationType.F32)], 1 << 16)
    with pytest.raises(ModelInfoError, match="head_count_kv must be .* one per block"):
        read_gguf_info(wrong)
    extra = write_header_only_gguf(
        tmp_path / "extra.gguf", "llama",
        {"llama.block_count": 1, "llama.embedding_length": 8, "llama.context_length": 64,
         "llama.attention.head_count": 2},
        [("blk.1.attn_norm.weight", (8,), gguf.GGMLQuantizationType.F32)], 1 << 16)
    with pytest.raises(ModelInfoError, match="names block 1 but the header says 1 blocks"):
        read_gguf_info(extra)


# ---- Petals: a Hugging Face directory -------------------------------------------------------

LLAMA2_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
             "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
             "tie_word_embeddings": False, "_name_or_path": "meta-llama/Llama-2-7b-hf"}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
              "_name_or_path": "meta-llama/Llama-2-70b-hf"}


def write_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_llama2_7b_and_70b_blocks_from_config(tmp_path: Path) -> None:
    # 7B: q,k,v,o 4 x 4096^2 + gate/up/down 3 x 4096 x 11008 + 2 norms of 4096.
    block_7b = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert block_7b == 202_383_360 == llama_block_params(4096, 11008, 32, 32)
    # 70B: q,o 2 x 8192^2, k,v 2 x 8192 x (8 x 128), gate/up/down 3 x 8192 x 28672, norms.
    block_70b = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert block_70b == 855_654_400 == llama_block_params(8192, 28672, 64, 8)

    info = read_hf_info(write_config(tmp_path / "7b", LLAMA2_7B), dtype="float16")
    assert info.sizes_from == "config"
    assert info.n_layers == 32 and info.layer_bytes == (block_7b * 2,) * 32
    assert info.embedding_bytes == 32000 * 4096 * 2
    assert info.output_bytes == (32000 * 4096 + 4096) * 2 and not info.output_tied
    assert (info.name, info.architecture, info.context_length) == (
        "meta-llama/Llama-2-7b-hf", "llama", 4096)
    assert info.kv_bytes_per_token_per_layer() == 2 * 4096 * F16
    # 32 blocks x 0.39 GB = 12.95 GB of blocks at float16, as Petals reports for a 7B.
    assert info.weight_bytes == 12_952_535_040

    big = read_hf_info(write_config(tmp_path / "70b", LLAMA2_70B), dtype="bfloat16")
    assert big.layer_bytes == (block_70b * 2,) * 80
    assert (big.n_head, big.n_head_kv, big.head_dim_k) == (64, 8, 128)
    assert big.kv_bytes_per_token_per_layer() == 2 * 8 * 128 * F16
    assert read_hf_info(tmp_path / "70b", "float32").layer_bytes[0] == block_70b * 4
    assert read_hf_info(tmp_path / "70b", "auto").layer_bytes[0] == block_70b * 2  # float16


def write_safetensors(path: Path, tensors: dict[str, list[int]], dtype: str = "BF16") -> None:
    """A real safetensors file: 8-byte header length, JSON header, zeroed data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_exact_counts_from_safetensors_headers(tmp_path: Path) -> None:
    h, ff, vocab = 16, 40, 50
    config = {**LLAMA2_7B, "hidden_size": h, "intermediate_size": ff, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": vocab,
              "tie_word_embeddings": True}
    directory = write_config(tmp_path / "tiny", config)

    def block(i: int) -> dict[str, list[int]]:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [8, h],
                p + "self_attn.v_proj.weight": [8, h], p + "self_attn.o_proj.weight": [h, h],
                p + "mlp.gate_proj.weight": [ff, h], p + "mlp.up_proj.weight": [ff, h],
                p + "mlp.down_proj.weight": [h, ff], p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h]}

    shard1 = {"model.embed_tokens.weight": [vocab, h], **block(0)}
    shard2 = {**block(1), "model.norm.weight": [h]}
    write_safetensors(directory / "model-00001-of-00002.safetensors", shard1)
    write_safetensors(directory / "model-00002-of-00002.safetensors", shard2)
    weight_map = {name: "model-00001-of-00002.safetensors" for name in shard1}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in shard2}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    info = read_hf_info(directory, dtype="float16")
    expected_block = llama_block_params(h, ff, 4, 2)
    assert info.sizes_from == "safetensors"
    assert info.layer_bytes == (expected_block * 2,) * 2
    assert info.embedding_bytes == vocab * h * 2
    assert info.output_tied and info.output_bytes == h * 2  # the final norm; lm_head is shared
    # The headers and the arithmetic agree.
    (directory / "model-00002-of-00002.safetensors").unlink()  # index without its shards
    fallback = read_hf_info(directory, dtype="float16")
    assert fallback.sizes_from == "config" and fallback.layer_bytes == info.layer_bytes


def test_hf_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelInfoError, match=rf"^{tmp_path / 'none'}: no readable config.json"):
        read_hf_info(tmp_path / "none")
    bloom = write_config(tmp_path / "bloom", {"model_type": "bloom", "hidden_size": 64,
                                              "num_hidden_layers": 2, "num_attention_heads": 4})
    with pytest.raises(ModelInfoError, match="no safetensors files to size the blocks of a "
                                             "'bloom' model"):
        read_hf_info(bloom)
    with pytest.raises(ModelInfoError, match="unknown dtype 'int3'"):
        read_hf_info(write_config(tmp_path / "7b", LLAMA2_7B), dtype="int3")
    no_layers = write_config(tmp_path / "x", {k: v for k, v in LLAMA2_7B.items()
                                              if k != "num_hidden_layers"})
    with pytest.raises(ModelInfoError, match="config.json: missing key num_hidden_layers"):
        read_hf_info(no_layers)
    junk = tmp_path / "junk"
    write_config(junk, LLAMA2_7B)
    (junk / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ModelInfoError, match="model.safetensors: not a safetensors file"):
        read_hf_info(junk)


def test_bytes_read_as_an_operator_reads_them() -> None:
    assert describe_bytes(41.2 * (1 << 30)) == "41.2 GiB"
    assert describe_bytes(3 << 20) == "3.0 MiB"
    assert describe_bytes(1536) == "1.5 KiB"
    assert describe_bytes(512) == "512 B"
    assert describe_bytes((1 << 30) + 1, round_up=True) == "1.1 GiB"  # never understated
