"""A Petals cluster over real SSH for tests: the sshd test bed runs inside a loopback-only network
namespace (tests.petals_swarm.Netns), so every Petals process its sessions start is in it too,
and the `torbiz-tui` commands run there as well (`ip netns exec`), as a user's shell would.

Nothing Petals-side runs in the tests' own interpreter: the model is written by the Petals venv's
python, and the servers, the DHT monitor and the generation client are started by the product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.cluster_files import toml_text
from tests.petals_swarm import PETALS_ENV, Netns, petals_python

REPO = Path(__file__).resolve().parent.parent

# A tiny random Llama and a byte-level BPE tokenizer trained on a few sentences (no hub).
_MAKE_MODEL = r"""
import json, sys, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out, spec = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(spec.pop("seed"))
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=spec["vocab_size"],
                              special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
text = ["the quick brown fox jumps over the lazy dog", "a swarm of small machines",
        "petals serves blocks of a model", "hello world, how are you today?"] * 20
tok.train_from_iterator(text, trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>")
fast.save_pretrained(out)
config = LlamaConfig(**spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
print("TORBIZ-JSON " + json.dumps({"vocab": len(fast)}))
"""


def tiny_llama_spec(layers: int = 4, hidden: int = 64, intermediate: int = 128,
                    heads: int = 4, vocab: int = 1000, seed: int = 0) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "max_position_embeddings": 512,
            "initializer_range": 0.1, "torch_dtype": "float32", "seed": seed}


def write_model(ns: Netns, out: Path, spec: dict[str, Any]) -> Path:
    python = petals_python()
    assert python is not None
    proc = subprocess.run(ns.argv([str(python), "-c", _MAKE_MODEL, str(out), json.dumps(spec)]),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **PETALS_ENV})
    assert "TORBIZ-JSON" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def petals_cluster_file(tmp_path: Path, sshd: Any, model: Path, *, port: int = 31337,
                        name: str = "pt", prefix: str = "tbzpetals",
                        policy: str = "spread") -> Path:
    python = petals_python()
    nodes = [{"name": n.name, "host": n.host, "ssh_port": n.port, "backend": "petals",
              "rpc_port": port, "python": str(python), "reserve_gb": 0}
             for n in sshd.nodes]
    text = toml_text(
        {"name": name, "state_dir": str(tmp_path / "state")}, nodes,
        ssh={"user": "root", "identity_file": str(sshd.client_key),
             "known_hosts": str(sshd.known_hosts), "config_file": "", "connect_timeout": 5},
        model={"hf": str(model)},
        petals={"dht_prefix": prefix, "python": str(python), "num_handlers": 2},
        plan={"policy": policy})
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def cli(ns: Netns, config: Path, *args: str,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`torbiz-tui -c CONFIG ARGS` run inside the namespace with the project's interpreter."""
    return subprocess.run(ns.argv([sys.executable, "-m", "tui.cli", "-c", str(config), *args]),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL)


def core_call(ns: Netns, config: Path, code: str, timeout: float = 120) -> str:
    """Run `code` (with `cluster`, an open core.cluster.Cluster, and `asyncio`) inside the
    namespace; returns its stdout."""
    script = ("import asyncio, json, sys\nfrom core.cluster import Cluster\n"
              "from core.config import load_config\n"
              "async def main():\n    cluster = Cluster(load_config(sys.argv[1]))\n"
              "    try:\n" + "".join(f"        {line}\n" for line in code.splitlines())
              + "    finally:\n        await cluster.close()\nasyncio.run(main())\n")
    proc = subprocess.run(ns.argv([sys.executable, "-c", script, str(config)]),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout
