"""The Petals environment built by scripts/petals-env.sh really works, on CPU, with nothing mocked:
a private two-server swarm of a tiny random Llama goes ONLINE, a DHT client lists every block's
server, a greedy generation through the swarm matches local transformers token for token, and
after stopping nothing is left. Everything Petals-side runs in a network namespace with only
loopback (tests/petals_swarm.py).

Skipped, with the reason, when the Petals venv does not exist ($TORBIZ_PETALS_VENV or
~/.cache/torbiz/petals-venv) or network namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import psutil
import pytest

from tests.petals_swarm import Netns, PetalsSwarm, skip_reason

_SKIP = skip_reason()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

PROMPT = [1, 17, 243, 99, 512, 8, 731, 64]
NEW_TOKENS = 16


def _hivemind_sockets() -> set[str]:
    return set(glob.glob("/tmp/hivemind-*.sock"))


def _unix_listeners() -> set[str]:
    paths = set()
    for conn in psutil.net_connections(kind="unix"):
        if isinstance(conn.laddr, str) and conn.laddr:
            paths.add(conn.laddr)
    return paths


def _processes_using(path: Path) -> list[str]:
    """Processes anywhere on the machine whose command line names `path` (our model dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(path) in part for part in (proc.info["cmdline"] or [])):
            found.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'])[:120]}")
    return found


def test_private_swarm_online_listed_generates_and_leaves_nothing(tmp_path: Path) -> None:
    sockets_before = _hivemind_sockets()
    timings: dict[str, float] = {}
    with PetalsSwarm(tmp_path / "swarm") as swarm:
        ns: Netns = swarm.ns
        ns_name = ns.name
        # The namespace has loopback only: nothing Petals does can leave this machine.
        assert swarm.ns.interfaces() == ["lo"]

        model = swarm.write_tiny_llama(num_layers=4)
        assert (model / "model.safetensors").is_file()

        # First server: a new swarm; its multiaddr is known before it starts (identity + port).
        t0 = time.time()
        a = swarm.start_server("a", (0, 2), initial_peers=None)
        announced = a.wait_for_log(r"Running a server on \['([^']+)'", timeout=120).group(1)
        assert announced == a.maddr
        timings["first_dht_up_s"] = time.time() - t0
        # Second server joins through the first one's multiaddr.
        b = swarm.start_server("b", (2, 4), initial_peers=[a.maddr])

        online = swarm.wait_online(timeout=150)
        timings["time_to_online_s"] = online["at"] - t0

        # A DHT client lists every block's server: exactly the planned one, ONLINE.
        listing = swarm.dht_list(repeat=5)
        timings["dht_client_start_s"] = listing["dht_start_s"]
        timings["dht_list_ms_first"] = listing["list_ms"][0]
        timings["dht_list_ms_best"] = min(listing["list_ms"])
        assert len(listing["blocks"]) == swarm.num_blocks
        for index, block in enumerate(listing["blocks"]):
            owner = a if a.blocks[0] <= index < a.blocks[1] else b
            assert list(block["servers"]) == [owner.peer_id], (index, block)
            info = block["servers"][owner.peer_id]
            assert info["state"] == "ONLINE"
            assert (info["start"], info["end"]) == owner.blocks
            assert info["version"] == "2.2.0.post1"
            assert info["torch_dtype"] == "float32"
            assert info["quant_type"] == "none"  # CPU: no quantization, nothing mocked

        # Greedy generation through the swarm == local transformers, token for token.
        gen = swarm.generate(PROMPT, NEW_TOKENS)
        assert len(gen["local"]) == len(PROMPT) + NEW_TOKENS
        for run in gen["runs"]:
            assert run["tokens"] == gen["local"]
        assert gen["max_logit_diff"] < 1e-3, gen["max_logit_diff"]
        timings["client_start_s"] = gen["client_start_s"]
        timings["tokens_per_s_first"] = NEW_TOKENS / gen["runs"][0]["seconds"]
        timings["tokens_per_s"] = NEW_TOKENS / gen["runs"][1]["seconds"]
        for server in (a, b):
            assert "rpc_inference.open" in server.log(), server.log_tail()

        # Stop: SIGINT to each main pid; the group is killed only if something stays.
        groups = {s.name: [p.pid for p in s.tree()] for s in (a, b)}
        for server in (a, b):
            pss = 0
            for proc in server.tree():
                try:
                    pss += proc.memory_full_info().pss
                except psutil.Error:
                    continue
            timings[f"pss_{server.name}_mib"] = pss / 2**20
        assert all(len(pids) > 2 for pids in groups.values()), groups  # main, p2pd, handlers...
        for server in (b, a):
            report = server.stop()
            timings[f"stop_{server.name}_s"] = report["seconds"]
            assert report["sigint"], report
            assert report["offline_announced"], server.log_tail()
            assert report["killed"] == [], report  # SIGINT alone ended the whole tree
            assert not server.group()
            timings[f"stop_{server.name}_processes"] = report["processes"]
        assert swarm.ns.processes() == []
    # Leaving the swarm deleted the namespace, and nothing of ours runs anywhere.
    assert swarm.leftovers == []
    assert not ns.exists() and not Path("/run/netns", ns_name).exists()
    assert not _processes_using(model)
    for pids in groups.values():
        assert not [p for p in pids if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    # hivemind leaves one /tmp/hivemind-p2pclient-*.sock per connection handler process (its
    # P2P.replicate() never unlinks): files only, nobody listens on them (4 here: two servers x
    # --num_handlers 2). Any other Petals process on the machine (another run, a bench) makes
    # such files in the same /tmp meanwhile, so the count is measured, not asserted (asserting
    # it failed once beside bench/petals_budget.py: 10). Only files nobody listens on are removed.
    litter = _hivemind_sockets() - sockets_before
    for path in litter - _unix_listeners():
        Path(path).unlink(missing_ok=True)
    timings["socket_files_left_by_hivemind"] = len(litter)

    print("\npetals smoke: " + json.dumps({k: round(v, 3) for k, v in timings.items()}))
