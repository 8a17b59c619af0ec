"""Petals block budget, command lines, config and block map: no Petals process involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import ConfigError, NodeConfig, load_config, parse_config
from core.engines.petals import commands as backend
from core.engines.petals import dht
from core.engines.petals import placement as petals_placement
from core.planning.planner import NodeBudget, PlanRefused, plan_layers
from core.reach.probe import NodeProbe

GIB = 1 << 30
# Peer ids of the shape hivemind makes (base58 sha2-256 multihashes).
PEER_A = "QmbyV4BASLJCFiCfKz37eNwFX8y6hefQ7LGpzvEwJQzNft"
PEER_B = "QmSXDk2v6kPu4BXW7UE6BsE4rB3k7Y1yJ11a9owiH52Ti4"

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "torch_dtype": "float16", "tie_word_embeddings": False}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80}

# petals.server.block_utils.get_block_size(config, "memory", dtype=...) of Petals 2.2.0.post1,
# run in its venv on DistributedLlamaConfig(**the values above): round(params x bytes x 1.01).
PETALS_BLOCK_SIZE = {("7b", "float32"): 817_628_774, ("7b", "bfloat16"): 408_814_387,
                     ("70b", "float32"): 3_456_843_776, ("70b", "bfloat16"): 1_728_421_888}


def _config(tmp_path: Path, model: dict, *, nodes: int = 2, dtype: str = "bfloat16",
            extra: str = "") -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(model))
    text = [f'[cluster]\nname = "p"\nstate_dir = "{tmp_path / "state"}"',
            f'[model]\nhf = "{model_dir}"',
            f'[petals]\ntorch_dtype = "{dtype}"\nnum_handlers = 2\n{extra}',
            '[plan]\npolicy = "spread"\nreserve_gb = 1']
    for i in range(nodes):
        text.append(f'[[nodes]]\nname = "n{i}"\nhost = "10.0.0.{i + 1}"\nbackend = "petals"\n'
                    f"rpc_port = 31337")
    path = tmp_path / "cluster.toml"
    path.write_text("\n\n".join(text) + "\n")
    return path


def _probe(free_gib: float) -> NodeProbe:
    return NodeProbe(node="n", os="Linux", arch="x86_64", cores=8,
                     ram_total_bytes=int(free_gib * GIB),
                     ram_available_bytes=int(free_gib * GIB), gpus=(), clock_offset_s=0.0,
                     rtt_s=0.001, worker_binary=None, worker_version=None, errors=())


@pytest.mark.parametrize(("name", "model"), [("7b", LLAMA2_7B), ("70b", LLAMA2_70B)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_bytes_match_petals_get_block_size(tmp_path: Path, name: str, model: dict,
                                                 dtype: str) -> None:
    info = petals_placement.petals_model(load_config(_config(tmp_path, model, dtype=dtype)))
    assert info.sizes_from == "config"
    assert set(info.layer_bytes) == {PETALS_BLOCK_SIZE[name, dtype]}
    assert info.embedding_bytes == 0 and info.output_bytes == 0  # the client holds those


def test_attention_cache_matches_petals_server_arithmetic(tmp_path: Path) -> None:
    # petals.server.server: 2 * hidden_size * attn_cache_tokens // num_key_value_groups * bytes
    config = load_config(_config(tmp_path, LLAMA2_70B, extra="attn_cache_tokens = 8192"))
    info = petals_placement.petals_model(config)
    petals_cache = 2 * 8192 * 8192 // (64 // 8) * 2
    assert info.kv_bytes(1, 8192, petals_placement.cache_type("bfloat16")) == petals_cache


async def test_plan_70b_over_four_cpu_nodes(tmp_path: Path) -> None:
    path = _config(tmp_path, LLAMA2_70B, nodes=4)
    config = load_config(path)
    placement = await petals_placement.make_petals_placement(
        config, {f"n{i}": _probe(48) for i in range(4)})
    spans = placement.spans()
    assert [s[1] for s in spans] == [0, 20, 40, 60] and {s[2] for s in spans} == {20}
    per_block = PETALS_BLOCK_SIZE["70b", "bfloat16"] + 2 * 8192 * 8192 // 8 * 2
    overhead = petals_placement.process_bytes(config)
    assert placement.predicted_bytes("n0") == 20 * per_block + overhead
    # Each node: 48 GiB free - 1 GiB reserve - the server process >= 20 blocks, < 80.
    assert placement.budgets[0].budget_bytes == 47 * GIB - overhead
    text = petals_placement.format_petals_placement(placement)
    assert "0:20 (20)" in text and "60:80 (20)" in text


async def test_plan_refuses_when_the_swarm_is_too_small(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, LLAMA2_70B, nodes=2))
    with pytest.raises(PlanRefused) as refused:
        await petals_placement.make_petals_placement(config, {"n0": _probe(48), "n1": _probe(48)})
    assert refused.value.missing_bytes > 0


def test_plan_layers_is_the_same_planner(tmp_path: Path) -> None:
    info = petals_placement.petals_model(load_config(_config(tmp_path, LLAMA2_7B)))
    block = PETALS_BLOCK_SIZE["7b", "bfloat16"]
    plan = plan_layers(info, [NodeBudget("a", 10 * block, 0), NodeBudget("b", 100 * block, 0)],
                       context=1, cache_type="bf16", policy="spread")
    assert [a.n_layers for a in plan.assignments] == [9, 23]


def test_server_args_cpu_new_swarm_then_join(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, LLAMA2_7B))
    node = config.node("n0")
    first = backend.server_args(config, node, "/s/n0", "/m", (0, 16), [])
    assert first[:3] == ["-m", "petals.cli.run_server", "/m"]
    assert "--new_swarm" in first and "--initial_peers" not in first
    for flag, value in (("--block_indices", "0:16"), ("--device", "cpu"),
                        ("--torch_dtype", "bfloat16"), ("--host_maddrs", "/ip4/10.0.0.1/tcp/31337"),
                        ("--announce_maddrs", "/ip4/10.0.0.1/tcp/31337"),
                        ("--identity_path", "/s/n0/identity.key"), ("--dht_prefix", "torbiz-p")):
        assert first[first.index(flag) + 1] == value
    assert "--quant_type" not in first and "--throughput" in first
    peer = backend.multiaddr(node, PEER_A)
    joiner = backend.server_args(config, config.node("n1"), "/s/n1", "/m", (16, 32), [peer])
    assert "--new_swarm" not in joiner
    assert joiner[joiner.index("--initial_peers") + 1] == f"/ip4/10.0.0.1/tcp/31337/p2p/{PEER_A}"
    gpu = backend.server_args(config, node, "/s/n0", "/m", (0, 16), [], gpu=True)
    assert "--device" not in gpu  # GPU nodes keep Petals' defaults


def test_configured_initial_peers_never_make_a_new_swarm(tmp_path: Path) -> None:
    peer = f"/ip4/10.0.0.9/tcp/31337/p2p/{PEER_B}"
    config = load_config(_config(tmp_path, LLAMA2_7B, extra=f'initial_peers = ["{peer}"]'))
    args = backend.server_args(config, config.node("n0"), "/s", "/m", (0, 1), [])
    assert "--new_swarm" not in args and args[args.index("--initial_peers") + 1] == peer


@pytest.mark.parametrize(("table", "message"), [
    ({"torch_dtype": "float16"}, "torch_dtype"),
    ({"initial_peers": ["10.0.0.1:31337"]}, "initial_peers"),
    ({"num_handlers": 0}, "num_handlers"),
    ({"dht_prefix": "a b"}, "dht_prefix"),
    ({"bogus": 1}, "unknown key"),
])
def test_petals_config_errors(table: dict, message: str) -> None:
    data = {"petals": table, "nodes": [{"name": "a", "host": "10.0.0.1", "backend": "petals"}]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, Path("/x/c.toml"))


def test_petals_node_needs_an_ipv4_address(tmp_path: Path) -> None:
    # Refused when the file loads, not when the server starts.
    with pytest.raises(ConfigError, match="needs an IPv4 address"):
        parse_config({"nodes": [{"name": "a", "host": "node.example", "backend": "petals"}]},
                     tmp_path / "c.toml")
    with pytest.raises(ValueError, match="IPv4"):
        backend.listen_address(NodeConfig(name="a", host="node.example", backend="petals"))


def test_block_map_marks_dead_and_missing_blocks_unserved(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, LLAMA2_7B))
    swarm = {"n_blocks": 4, "peer_ids": {"n0": "Qa", "n1": "Qb"},
             "plan": {"n0": [0, 2], "n1": [2, 2]}}

    def server(peer: str, alive: bool = True, state: str = "ONLINE") -> dict:
        return {"peer_id": peer, "state": state, "alive": alive, "throughput": 1.0,
                "version": "2.2.0.post1"}

    snapshot = dht.Snapshot(0.0, ((server("Qa"),), (server("Qa"),),
                                           (server("Qb", alive=False),), ()))
    blocks, unserved = dht.block_map(config, swarm, snapshot)
    assert unserved == (2, 3)
    assert blocks[0].servers[0].node == "n0"
    n0 = dht.node_share(config, swarm, blocks, config.node("n0"))
    assert (n0.first_layer, n0.layers, n0.state, n0.planned_first, n0.planned_layers) == \
        (0, 2, "ONLINE", 0, 2)
    n1 = dht.node_share(config, swarm, blocks, config.node("n1"))
    assert (n1.first_layer, n1.layers, n1.state) == (2, 1, "dead")


def test_explain_server_log_clock() -> None:
    text = backend.explain_server_log(["... local time must be within 3 seconds  of others"])
    assert "NTP" in text and "chronyc makestep" in text


def test_provision_venv_of_the_node_python() -> None:
    from core.config import NodeConfig
    from core.engines.petals.provision import ProvisionError, node_venv

    assert node_venv(NodeConfig("a", "10.0.0.1", backend="petals")) == \
        "~/.cache/torbiz/petals-venv"
    assert node_venv(NodeConfig("a", "10.0.0.1", python="/opt/p/bin/python")) == "/opt/p"
    with pytest.raises(ProvisionError, match="bin/python"):
        node_venv(NodeConfig("a", "10.0.0.1", python="/usr/bin/python3.11/x"))


def test_a_cluster_is_one_backend() -> None:
    data = {"nodes": [{"name": "a", "host": "10.0.0.1", "backend": "petals"},
                      {"name": "b", "host": "10.0.0.2"}]}
    with pytest.raises(ConfigError, match="mixes llama-rpc and petals"):
        parse_config(data, Path("/x/c.toml"))
