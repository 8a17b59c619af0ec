"""Petals servers on nodes: the node's Python, the server's command line, its identity (so its
multiaddr is known before it starts), and what its log says when it dies.

A Petals server runs `python -m petals.cli.run_server` from a venv on the node (built by
scripts/petals-env.sh): Petals pins old libraries, so it never shares an interpreter with the
dashboard. Left alone Petals reaches out (version check, speedtest, the PUBLIC swarm's bootstrap
peers when given no peers): every server here gets `--new_swarm` or explicit `--initial_peers`,
a fixed `--throughput` (no speedtest) and explicit `--block_indices`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from core.config import ClusterConfig, NodeConfig
from core.peer_address import valid_multiaddr, valid_peer_id
from core.reach.shell import path_word, quote, quote_argv
from core.text import terminal_safe

DEFAULT_PYTHON = "~/.cache/torbiz/petals-venv/bin/python"
IDENTITY_NAME = "identity.key"
JSON_MARK = "TORBIZ-JSON "

# Environment of every Petals process: no hub, no telemetry, unbuffered logs.
SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "ignore",
}

# Run by the node's Petals python: make the identity file if missing, print the peer id and the
# versions the preflight compares. One JSON line.
_PREPARE = r"""
import json, os, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
    import petals
    out["petals"] = petals.__version__
    import hivemind
    out["hivemind"] = hivemind.__version__
    from hivemind.p2p import P2P, PeerID
    path = sys.argv[1]
    if path:
        if not os.path.exists(path):
            P2P.generate_identity(path)
        with open(path, "rb") as f:
            out["peer_id"] = PeerID.from_identity(f.read()).to_base58()
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"[:300]
print("TORBIZ-JSON " + json.dumps(out))
"""


# ---- peer ids and multiaddrs: checked before they reach another node's command line ---------
# (the rules are in core/peer_address.py, which the config loader uses too)
#
# A peer id comes from a node (its identity file, read by its own Python) or from the swarm
# file on this machine; a multiaddr from the swarm file or the cluster file. Either goes into
# the next node's `--initial_peers`: only the shapes hivemind makes are let through.

def _refused_peer(node: NodeConfig, what: str, text: str) -> ValueError:
    shape = ("a base58 peer id like Qm..." if what == "peer id" else
             "a multiaddr like /ip4/10.0.0.5/tcp/31337/p2p/Qm...")
    return ValueError(f"{node.name}: refusing {what} {terminal_safe(text)[:120]!r}: it is not "
                      f"{shape} (from the swarm file, a node, or [petals] initial_peers)")


@dataclass(frozen=True)
class PetalsNodeInfo:
    """What the node's Petals python said: versions, and the peer id of its identity file."""

    python: str = ""
    torch: str = ""
    petals: str = ""
    hivemind: str = ""
    peer_id: str = ""
    error: str = ""


def node_python(node: NodeConfig) -> str:
    return node.python or DEFAULT_PYTHON


def bind_address(node: NodeConfig) -> str:
    """The IPv4 address the server listens on and announces: the node's own address, never a
    wildcard (peers must be told where to connect)."""
    if node.ipv4 is not None:
        return node.ipv4
    raise ValueError(f"{node.name}: a Petals node needs an IPv4 address in host or rpc_host "
                     f"(the swarm announces it), got {node.rpc_host or node.host!r}")


def listen_address(node: NodeConfig) -> tuple[str, int]:
    return bind_address(node), node.rpc_port


def server_exposure(node: NodeConfig) -> str | None:
    """A sentence when this node's Petals server listens (and announces itself) beyond its
    loopback, else None."""
    host, port = listen_address(node)
    if ipaddress.IPv4Address(host).is_loopback:
        return None
    return (f"{node.name}: the Petals server listens on {host}, port {port}, and announces "
            "that address in the swarm's DHT; Petals has no authentication: anyone who reaches "
            "it can join the swarm, send it prompts and serve blocks to its clients")


def identity_path(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/{IDENTITY_NAME}"


def multiaddr(node: NodeConfig, peer_id: str) -> str:
    """The node's multiaddr; ValueError when `peer_id` is not a peer id."""
    if not valid_peer_id(peer_id):
        raise _refused_peer(node, "peer id", peer_id)
    host, port = listen_address(node)
    return f"/ip4/{host}/tcp/{port}/p2p/{peer_id}"


def dht_prefix(config: ClusterConfig) -> str:
    return config.petals.dht_prefix or f"torbiz-{config.name}".replace(".", "-")


def prepare_script(node: NodeConfig, state_dir: str | None) -> str:
    """sh for the node: create the state dir, run the Petals python (identity + versions)."""
    python = path_word(node_python(node))
    ident = path_word(identity_path(state_dir)) if state_dir else "''"
    mkdir = f"mkdir -p {path_word(state_dir)} 2>/dev/null; " if state_dir else ""
    return (f'umask 077; {mkdir}\n'
            f'py={python}; [ -x "$py" ] || {{ echo "TORBIZ-NOPYTHON"; exit 0; }}\n'
            f'cd {path_word(state_dir) if state_dir else "/"} && '
            f'env {" ".join(quote(f"{k}={v}") for k, v in SERVER_ENV.items())} '
            f'"$py" -c {quote(_PREPARE)} {ident} < /dev/null')


def parse_prepare(node: NodeConfig, stdout: str, stderr: str) -> PetalsNodeInfo:
    if "TORBIZ-NOPYTHON" in stdout:
        return PetalsNodeInfo(error=missing_python_hint(node))
    for line in reversed(stdout.splitlines()):
        if line.startswith(JSON_MARK):
            try:
                data = json.loads(line[len(JSON_MARK):])
            except ValueError:
                break
            if isinstance(data, dict):
                info = PetalsNodeInfo(**{k: terminal_safe(str(v))[:300] for k, v in data.items()
                                         if k in PetalsNodeInfo.__dataclass_fields__})
                if info.peer_id and not valid_peer_id(info.peer_id):
                    return PetalsNodeInfo(
                        error=f"the node's Petals python reported {info.peer_id[:80]!r} as "
                              "its peer id, which is not one: check its hivemind, or delete "
                              "its identity.key in the state dir to make a new one")
                return info
    tail = terminal_safe((stderr.strip().splitlines() or ["no answer"])[-1])[:200]
    return PetalsNodeInfo(error=f"the node's Petals python did not answer: {tail}")


def missing_python_hint(node: NodeConfig) -> str:
    return (f"no Petals python at {node_python(node)}: build the environment there with "
            "scripts/petals-env.sh (or `torbiz-tui provision NODE --petals`), or set the "
            "node's python key")


def server_args(config: ClusterConfig, node: NodeConfig, state_dir: str, model_dir: str,
                blocks: tuple[int, int], initial_peers: Sequence[str],
                gpu: bool = False) -> list[str]:
    """`-m petals.cli.run_server ...` (the python comes first, from node_python()). An empty
    `initial_peers` starts a new swarm: never a server without explicit peers. ValueError
    when a peer (from the swarm file, a node, or [petals] initial_peers) is not a multiaddr."""
    first, end = blocks
    if not 0 <= first < end:
        raise ValueError(f"{node.name}: empty block range {first}:{end}")
    petals = config.petals
    host, port = listen_address(node)
    maddr = f"/ip4/{host}/tcp/{port}"
    args = ["-m", "petals.cli.run_server", model_dir,
            "--dht_prefix", dht_prefix(config),
            "--block_indices", f"{first}:{end}",  # no random 0-10 s wait, no auto choice
            "--throughput", repr(float(petals.throughput)),  # no speedtest
            "--num_handlers", str(petals.num_handlers),
            "--attn_cache_tokens", str(petals.attn_cache_tokens),
            "--host_maddrs", maddr, "--announce_maddrs", maddr,
            "--identity_path", identity_path(state_dir)]
    if not gpu:
        # CPU-safe: float16 on CPU is refused by Petals, quantization needs CUDA.
        args += ["--device", "cpu", "--torch_dtype", petals.torch_dtype]
    peers = list(petals.initial_peers) + [p for p in initial_peers
                                          if p not in petals.initial_peers]
    for peer in peers:
        if not valid_multiaddr(peer):
            raise _refused_peer(node, "initial peer", peer)
    if peers:
        args += ["--initial_peers", *peers]
    else:
        args.append("--new_swarm")
    return args


def server_command(config: ClusterConfig, node: NodeConfig, state_dir: str, model_dir: str,
                   blocks: tuple[int, int], initial_peers: Sequence[str]) -> str:
    """For logs and docs: the whole command line, quoted."""
    return quote_argv([node_python(node), *server_args(config, node, state_dir, model_dir,
                                                        blocks, initial_peers)])


def resolve_python_sh(node: NodeConfig) -> str:
    """sh that sets $bin to the node's Petals python or prints `TORBIZ error nopython`."""
    word = path_word(node_python(node))
    return f'bin={word}; [ -x "$bin" ] || {{ echo "TORBIZ error nopython"; exit 0; }}'


def explain_server_log(lines: list[str]) -> str:
    """The sentence that a dead server's log tail supports (terminal-safe)."""
    lines = [terminal_safe(line) for line in lines]
    text = "\n".join(lines)
    if "local time must be within" in text:
        return ("its clock is too far from the swarm's (hivemind: local time must be within a "
                "few seconds of others): sync it with NTP (e.g. chronyc makestep)")
    if "Address already in use" in text or "address already in use" in text:
        return "its port is already in use: stop that program or set another rpc_port"
    if "No module named" in text:
        line = next(ln for ln in reversed(lines) if "No module named" in ln)
        return f"its Petals environment is incomplete ({line.strip()[:160]}): rebuild it with " \
               "scripts/petals-env.sh"
    if "out of memory" in text.lower() or "MemoryError" in text:
        return "it ran out of memory loading its blocks: give it fewer blocks (max_memory_gb)"
    meaningful = [ln.strip() for ln in lines
                  if ln.strip() and not ln.startswith("torbiz-start")]
    if not meaningful:
        return "the Petals server is gone and its log says nothing"
    return ("the Petals server is gone (killed, or crashed); its log's last line: "
            f"{meaningful[-1][:200]!r}")
