"""A tiny real llama model in GGUF: random weights from a fixed seed, a small SentencePiece-style
vocab with byte fallback, so llama-server loads it and generates tokens (not sensible text)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import gguf
import numpy as np

from core.engines.llama_rpc.build import cache_root

DEMO_MODEL_NAME = "torbiz-demo.gguf"
_SPACE = "\u2581"  # SentencePiece's word boundary
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_WORDS = ("the to of and in it is for on with you this that what how hello world model layer "
          "node nodes cluster token tokens worker server run be as at by from we an or if not "
          "all can one will my your have do go get make know take see come think look want "
          "give use find tell ask work call try need feel say time people year way day thing "
          "man woman life child")


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens (so any text tokenizes), then single characters and
    whole words. llama.cpp's SPM tokenizer only merges two adjacent pieces when the joined text
    is itself a token, so each word comes with all its prefixes (" t", " th", " the")."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces = [_SPACE, *string.ascii_letters, *string.digits, *string.punctuation]
    pieces += [_SPACE + c for c in string.ascii_letters]
    for word in _WORDS.split():
        pieces += [_SPACE + word[:n] for n in range(2, len(word) + 1)]
    # Larger vocabularies: letter pairs, printable (a sampled UNUSED token renders as nothing).
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    pieces += [_SPACE + pair for pair in pairs] + pairs
    seen = set(tokens)
    for piece in pieces:
        if len(tokens) >= n_vocab:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(T.NORMAL)
    while len(tokens) < n_vocab:  # pad with inert pieces so the size is exact
        tokens.append(f"<extra_{len(tokens)}>")
        types.append(T.UNUSED)
    # Longer pieces score higher so the tokenizer prefers them over single characters.
    scores = [0.0 if t != T.NORMAL else float(len(tok)) - 10.0
              for tok, t in zip(tokens, types, strict=True)]
    return tokens, scores, [int(t) for t in types]


def write_demo_model(path: Path, *, seed: int = 0, n_layer: int = 8, n_embd: int = 256,
                     n_head: int = 4, n_head_kv: int = 2, n_ff: int = 512, n_vocab: int = 512,
                     context: int = 2048, dtype: str = "f16") -> Path:
    """Write the model; the same arguments always give a byte-identical file. `dtype` "q4_0"
    quantizes every matrix to Q4_0 (what CPUs with AVX2 or NEON repack), norms stay f32."""
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    if dtype not in _FILE_TYPES:
        raise ValueError("dtype must be f16, f32 or q4_0")
    if n_vocab < 300:
        raise ValueError("n_vocab must be at least 300 (3 control + 256 byte tokens + pieces)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wtype = np.float16 if dtype == "f16" else np.float32
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("torbiz-demo")
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(_FILE_TYPES[dtype])
    tokens, scores, types = _vocab(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def add_matrix(name: str, rows: int, cols: int) -> None:
        values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if dtype == "q4_0":
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(name, values.astype(wtype))

    def ones() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    add_matrix("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones())
        add_matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        add_matrix(f"blk.{i}.attn_k.weight", n_embd_kv, n_embd)
        add_matrix(f"blk.{i}.attn_v.weight", n_embd_kv, n_embd)
        add_matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones())
        add_matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    writer.add_tensor("output_norm.weight", ones())
    add_matrix("output.weight", n_vocab, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def default_demo_model_path() -> Path:
    return cache_root() / "models" / DEMO_MODEL_NAME


def ensure_demo_model(path: Path | None = None) -> Path:
    """The demo model at `path`, written (atomically) only when missing."""
    target = Path(path) if path is not None else default_demo_model_path()
    if target.is_file():
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        write_demo_model(partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
