"""What a model needs, read from its headers alone: blocks, exact bytes per block, the embedding
and output head, the trained context and the KV cache per token. Weights are never read: a
GGUF's tensor infos carry each tensor's type and shape, a safetensors file's JSON header the
same, and the bytes follow from those."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from core.planning.repack import WeightMatrix, matrix_of

# llama-server --cache-type-k/-v names; values per block and bytes per block (ggml's sizes).
_CACHE_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "iq4_nl": gguf.GGMLQuantizationType.IQ4_NL,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
}
CACHE_TYPES = tuple(_CACHE_TYPES)

# torch dtypes a Petals server may hold blocks in, and their bytes per parameter.
HF_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
_HF_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16",
                     "half": "float16", "bf16": "bfloat16"}
# Model types whose block size follows from config.json when no safetensors header is at hand.
_LLAMA_LIKE = ("llama", "mistral")
_MAX_SAFETENSORS_HEADER = 100 << 20  # a header this large is a corrupt or hostile file

_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")
_HF_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_HF_FINAL_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm)\.")


class ModelInfoError(Exception):
    """A model file or directory that cannot tell what the model needs, phrased for the
    operator; the message starts with the path."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    name: str
    n_layers: int  # repeating blocks
    layer_bytes: tuple[int, ...]  # exact bytes of each block's tensors, len == n_layers
    embedding_bytes: int  # token_embd and any other input tensors: they stay on the coordinator
    # The output head (norm + output matrix) on the device of the last block; for a tied head
    # in a GGUF this counts token_embd again, because llama.cpp loads a second copy there.
    output_bytes: int
    output_tied: bool  # no output matrix in the file: the head reuses the token embedding
    context_length: int  # trained context
    n_embd: int
    n_head: int
    n_head_kv: int  # the largest over the blocks (see n_head_kv_per_layer)
    head_dim_k: int
    head_dim_v: int
    n_head_kv_per_layer: tuple[int, ...] = ()  # empty: every block has n_head_kv
    sizes_from: str = "gguf"  # "gguf", "safetensors" (headers) or "config" (arithmetic)
    # The matrices of each block and of the output head (a GGUF's; empty when not known): what
    # the coordinator's CPU may keep a repacked copy of (see core.planning.repack).
    layer_matrices: tuple[tuple[WeightMatrix, ...], ...] = ()
    output_matrices: tuple[WeightMatrix, ...] = ()

    def __post_init__(self) -> None:
        if len(self.layer_bytes) != self.n_layers:
            raise ValueError(f"{self.path}: {len(self.layer_bytes)} block sizes for "
                             f"{self.n_layers} blocks")
        if self.layer_matrices and len(self.layer_matrices) != self.n_layers:
            raise ValueError(f"{self.path}: matrices of {len(self.layer_matrices)} blocks for "
                             f"{self.n_layers} blocks")
        if self.n_head_kv_per_layer and len(self.n_head_kv_per_layer) != self.n_layers:
            raise ValueError(f"{self.path}: {len(self.n_head_kv_per_layer)} KV head counts for "
                             f"{self.n_layers} blocks")

    @property
    def weight_bytes(self) -> int:
        """Bytes of all blocks' tensors."""
        return sum(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.embedding_bytes + self.output_bytes

    def kv_heads(self, layer: int) -> int:
        return self.n_head_kv_per_layer[layer] if self.n_head_kv_per_layer else self.n_head_kv

    def kv_bytes_per_token_per_layer(self, cache_type: str = "f16",
                                     layer: int | None = None) -> int:
        """K and V bytes one token takes in one block's cache: (n_head_kv * head_dim_k +
        n_head_kv * head_dim_v) values at the cache type's size. `layer` picks that block's KV
        head count when it varies per block; None uses the largest (an upper bound)."""
        heads = self.n_head_kv if layer is None else self.kv_heads(layer)
        return (cache_row_bytes(cache_type, heads * self.head_dim_k)
                + cache_row_bytes(cache_type, heads * self.head_dim_v))

    def kv_bytes(self, layers: int, context: int, cache_type: str = "f16",
                 first_layer: int = 0) -> int:
        """KV-cache bytes of `layers` blocks from `first_layer` on, at `context` tokens."""
        if layers < 0 or first_layer < 0 or first_layer + layers > self.n_layers:
            raise ValueError(f"blocks {first_layer}..{first_layer + layers - 1} are not in "
                             f"0..{self.n_layers - 1}")
        if context < 0:
            raise ValueError("context must not be negative")
        if not self.n_head_kv_per_layer:
            return layers * context * self.kv_bytes_per_token_per_layer(cache_type)
        return context * sum(self.kv_bytes_per_token_per_layer(cache_type, layer)
                             for layer in range(first_layer, first_layer + layers))


def cache_row_bytes(cache_type: str, values: int) -> int:
    """Bytes of `values` cache values of this type (quantized types in whole blocks)."""
    try:
        block, size = gguf.GGML_QUANT_SIZES[_CACHE_TYPES[cache_type]]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r} (known: "
                         f"{', '.join(CACHE_TYPES)})") from None
    return -(-values // block) * size


# ---- GGUF -----------------------------------------------------------------------------------

def read_gguf_info(path: Path) -> ModelInfo:
    """Read a GGUF's header and tensor infos (memory-mapped; tensor data is never touched)."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except OSError as exc:
        raise ModelInfoError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
        # GGUFReader says a bad magic, an unknown version or a truncated file with these.
        raise ModelInfoError(f"{path}: not a GGUF file, or a truncated one ({exc})") from None
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            if default is None:
                raise ModelInfoError(f"{path}: missing key {key}")
            return default
        try:
            return field.contents()
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise ModelInfoError(f"{path}: key {key} cannot be read ({exc})") from None

    def whole(key: str, default: int | None = None) -> int:
        got = value(key, default)
        if isinstance(got, bool) or not isinstance(got, int) or got < 0:
            raise ModelInfoError(f"{path}: key {key} must be a non-negative integer, got {got!r}")
        return got

    arch = value("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelInfoError(f"{path}: key general.architecture must be a name, got {arch!r}")
    name = value("general.name", path.stem)
    n_layers = whole(f"{arch}.block_count")
    n_embd = whole(f"{arch}.embedding_length")
    context = whole(f"{arch}.context_length")
    heads = _per_layer(path, f"{arch}.attention.head_count",
                       value(f"{arch}.attention.head_count"), n_layers)
    kv_key = f"{arch}.attention.head_count_kv"
    kv_heads = _per_layer(path, kv_key, value(kv_key), n_layers) if kv_key in fields else heads
    n_head = max(heads, default=0)
    if n_head == 0:
        raise ModelInfoError(f"{path}: {arch}.attention.head_count is 0: a model without "
                             "attention heads (recurrent) is not supported")
    head_dim_k = whole(f"{arch}.attention.key_length", n_embd // n_head)
    head_dim_v = whole(f"{arch}.attention.value_length", n_embd // n_head)

    layer_bytes = [0] * n_layers
    layer_matrices: list[list[WeightMatrix]] = [[] for _ in range(n_layers)]
    output_matrices: list[WeightMatrix] = []
    embedding = output = 0
    token_embd = 0
    token_embd_matrix: WeightMatrix | None = None
    has_output_matrix = False
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)  # from type and shape in the tensor info
        matrix = matrix_of(tensor.tensor_type.name, tensor.shape, size)
        block = _GGUF_BLOCK.match(tensor.name)
        if block:
            index = int(block.group(1))
            if index >= n_layers:
                raise ModelInfoError(f"{path}: tensor {tensor.name} names block {index} but "
                                     f"the header says {n_layers} blocks")
            layer_bytes[index] += size
            if matrix:
                layer_matrices[index].append(matrix)
        elif tensor.name.startswith(("output.", "output_norm.", "cls.")):
            output += size
            has_output_matrix = has_output_matrix or tensor.name == "output.weight"
            if matrix:
                output_matrices.append(matrix)
        else:
            embedding += size
            if tensor.name == "token_embd.weight":
                token_embd = size
                token_embd_matrix = matrix
    tied = not has_output_matrix
    if tied and token_embd_matrix is not None:
        output_matrices.append(token_embd_matrix)  # llama.cpp's second copy for the head
    return ModelInfo(
        path=str(path), architecture=arch, name=str(name), n_layers=n_layers,
        layer_bytes=tuple(layer_bytes), embedding_bytes=embedding,
        output_bytes=output + (token_embd if tied else 0), output_tied=tied,
        context_length=context, n_embd=n_embd, n_head=n_head, n_head_kv=max(kv_heads, default=0),
        head_dim_k=head_dim_k, head_dim_v=head_dim_v,
        n_head_kv_per_layer=() if len(set(kv_heads)) <= 1 else tuple(kv_heads),
        sizes_from="gguf", layer_matrices=tuple(tuple(m) for m in layer_matrices),
        output_matrices=tuple(output_matrices))


def _per_layer(path: Path, key: str, got: Any, n_layers: int) -> list[int]:
    """A head count that is one integer for every block, or an array with one per block."""
    items = got if isinstance(got, list) else [got] * n_layers
    if len(items) != n_layers or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ModelInfoError(f"{path}: key {key} must be a non-negative integer or one per "
                             f"block ({n_layers}), got {got!r}")
    return [int(v) for v in items]


# ---- Hugging Face directory (Petals) --------------------------------------------------------

def read_hf_info(model_dir: Path, dtype: str = "bfloat16") -> ModelInfo:
    """A transformers model directory as Petals serves it: config.json for the shape, and the
    safetensors headers (via model.safetensors.index.json, or every *.safetensors) for exact
    parameter counts; without them, parameter arithmetic for llama-like models. Bytes are at
    `dtype` ("auto": the config's torch_dtype), the dtype the blocks are served in."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError as exc:
        raise ModelInfoError(f"{model_dir}: no readable config.json ({exc.strerror or exc})"
                             ) from None
    except ValueError as exc:
        raise ModelInfoError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelInfoError(f"{config_path}: must be a JSON object")
    bytes_per_param = _dtype_bytes(model_dir, dtype, config)

    def whole(key: str, default: int | None = None) -> int:
        got = config.get(key, default)
        if got is None:
            raise ModelInfoError(f"{config_path}: missing key {key}")
        if isinstance(got, bool) or not isinstance(got, int) or got < 0:
            raise ModelInfoError(f"{config_path}: key {key} must be a non-negative integer, "
                                 f"got {got!r}")
        return got

    arch = str(config.get("model_type") or "")
    if not arch:
        raise ModelInfoError(f"{config_path}: missing key model_type")
    hidden = whole("hidden_size")
    n_layers = whole("num_hidden_layers")
    n_head = whole("num_attention_heads")
    if n_head == 0:
        raise ModelInfoError(f"{config_path}: num_attention_heads is 0")
    n_head_kv = whole("num_key_value_heads", n_head)
    head_dim = whole("head_dim", hidden // n_head)
    context = whole("max_position_embeddings", 0)
    tied = bool(config.get("tie_word_embeddings", False))

    counts = _safetensors_param_counts(model_dir)
    if counts is not None:
        layer_params, embedding_params, output_params, has_head = _split_hf_params(
            model_dir, counts, n_layers)
        tied = not has_head
        sizes_from = "safetensors"
    elif arch in _LLAMA_LIKE:
        layer_params, embedding_params, output_params = _llama_params(
            config, hidden, n_layers, n_head, n_head_kv, head_dim, tied, whole)
        sizes_from = "config"
    else:
        raise ModelInfoError(f"{model_dir}: no safetensors files to size the blocks of a "
                             f"{arch!r} model (block arithmetic is known only for "
                             f"{', '.join(_LLAMA_LIKE)})")
    name = config.get("_name_or_path") or model_dir.name
    return ModelInfo(
        path=str(model_dir), architecture=arch, name=str(name), n_layers=n_layers,
        layer_bytes=tuple(p * bytes_per_param for p in layer_params),
        embedding_bytes=embedding_params * bytes_per_param,
        output_bytes=output_params * bytes_per_param, output_tied=tied,
        context_length=context, n_embd=hidden, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim, head_dim_v=head_dim, sizes_from=sizes_from)


def _dtype_bytes(model_dir: Path, dtype: str, config: Mapping[str, Any]) -> int:
    wanted = dtype.lower()
    if wanted == "auto":
        wanted = str(config.get("torch_dtype") or "float32").lower()
    wanted = _HF_DTYPE_ALIASES.get(wanted, wanted)
    if wanted not in HF_DTYPES:
        raise ModelInfoError(f"{model_dir}: unknown dtype {dtype!r} (known: auto, "
                             f"{', '.join(HF_DTYPES)})")
    return HF_DTYPES[wanted]


def llama_block_params(hidden: int, intermediate: int, n_head: int, n_head_kv: int,
                       head_dim: int | None = None, attention_bias: bool = False,
                       mlp_bias: bool = False) -> int:
    """Parameters of one Llama decoder block: q and o projections (hidden x heads*head_dim), k
    and v (hidden x kv_heads*head_dim), gate/up/down (3 x hidden x intermediate), two RMS
    norms (hidden each)."""
    head_dim = hidden // n_head if head_dim is None else head_dim
    q = n_head * head_dim
    kv = n_head_kv * head_dim
    params = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    if attention_bias:
        params += q + 2 * kv + hidden
    if mlp_bias:
        params += 2 * intermediate + hidden
    return params


def _llama_params(config: Mapping[str, Any], hidden: int, n_layers: int, n_head: int,
                  n_head_kv: int, head_dim: int, tied: bool,
                  whole: Callable[[str], int]) -> tuple[list[int], int, int]:
    block = llama_block_params(hidden, whole("intermediate_size"), n_head, n_head_kv, head_dim,
                               bool(config.get("attention_bias", False)),
                               bool(config.get("mlp_bias", False)))
    embedding = whole("vocab_size") * hidden
    output = hidden + (0 if tied else embedding)  # final norm, and lm_head unless tied
    return [block] * n_layers, embedding, output


def _safetensors_param_counts(model_dir: Path) -> dict[str, int] | None:
    """Parameters per tensor name from the safetensors headers, or None when the directory
    has no complete set of safetensors files (then the caller falls back to arithmetic)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelInfoError(f"{index}: cannot read its weight_map ({exc})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelInfoError(f"{index}: no weight_map")
        files = [model_dir / str(name) for name in sorted(set(weight_map.values()))]
        if not all(f.is_file() for f in files):
            return None  # index without shards (not downloaded yet)
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            return None
    counts: dict[str, int] = {}
    for file in files:
        for name, params in _safetensors_header(file):
            counts[name] = params
    return counts


def _safetensors_header(file: Path) -> Iterable[tuple[str, int]]:
    """(tensor name, parameters) from one safetensors file: an 8-byte little-endian length,
    then that many bytes of JSON; the weights after it are never read."""
    try:
        with open(file, "rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) != 8:
                raise ModelInfoError(f"{file}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw_length)
            if length > _MAX_SAFETENSORS_HEADER:
                raise ModelInfoError(f"{file}: not a safetensors file (header of {length} "
                                     "bytes)")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise ModelInfoError(f"{file}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ModelInfoError(f"{file}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelInfoError(f"{file}: not a safetensors file (header is not an object)")
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelInfoError(f"{file}: tensor {name} has no valid shape")
        out.append((str(name), math.prod(shape)))
    return out


def _split_hf_params(model_dir: Path, counts: Mapping[str, int],
                     n_layers: int) -> tuple[list[int], int, int, bool]:
    """(parameters per block, embedding, output head, whether an lm_head is stored)."""
    layers = [0] * n_layers
    embedding = output = 0
    has_head = False
    for name, params in counts.items():
        block = _HF_BLOCK.search(name)
        if block:
            index = int(block.group(1))
            if index >= n_layers:
                raise ModelInfoError(f"{model_dir}: tensor {name} names block {index} but "
                                     f"config.json says {n_layers} blocks")
            layers[index] += params
        elif "lm_head" in name:
            output += params
            has_head = True
        elif _HF_FINAL_NORM.search(name):
            output += params
        else:
            embedding += params
    return layers, embedding, output, has_head


def describe_bytes(value: int | float, round_up: bool = False) -> str:
    """Bytes as an operator reads them: GiB from 1 GiB, else MiB or KiB with one decimal, or
    whole bytes. `round_up` never shows a shortfall smaller than it is."""
    if abs(value) < 1 << 10:
        return f"{math.ceil(value) if round_up else round(value)} B"
    unit, size = next((u, s) for u, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
                      if abs(value) >= s or u == "KiB")
    scaled = value / size
    if round_up:
        scaled = math.ceil(scaled * 10 - 1e-9) / 10
    return f"{scaled:.1f} {unit}"
