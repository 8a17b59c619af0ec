"""Watch a private Petals swarm's DHT: for every block, the servers announcing it (state, span,
throughput, version, dtype) and whether each server answers a ping now. One JSON line per poll.

A killed server stays ONLINE in the DHT until its record expires (minutes); the ping shows it dead
at once, so `alive` is what callers should trust. Exits, shutting its DHT down, when stdin
closes (its parent is gone).

    python dht_monitor.py --peers '["/ip4/.../p2p/..."]' --prefix P --blocks N [--once]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from functools import partial
from typing import Any

MARK = "TORBIZ-JSON "


def emit(data: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(data) + "\n")
    sys.stdout.flush()


def _watch_stdin(orphaned: threading.Event) -> None:
    # os.read, not sys.stdin: a thread blocked in sys.stdin.read() holds its buffer's lock, and a
    # child forked meanwhile (hivemind's DHT process) deadlocks closing sys.stdin at its start.
    while os.read(0, 4096):
        pass
    orphaned.set()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", required=True, help="JSON list of multiaddrs")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--blocks", type=int, required=True)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--ping-timeout", type=float, default=2.0)
    parser.add_argument("--startup-timeout", type=float, default=20.0)
    parser.add_argument("--sock-dir", help="a private directory for hivemind's unix sockets")
    parser.add_argument("--retry-max", type=float, default=30.0,
                        help="longest wait between two attempts to join (doubling from 1 s)")
    args = parser.parse_args()
    peers = json.loads(args.peers)
    if not peers:
        emit({"error": "no initial peers: the monitor never joins the public swarm"})
        return 2
    orphaned = threading.Event()
    from sockets import use_private_sockets

    use_private_sockets(args.sock_dir)
    import hivemind
    from petals.data_structures import UID_DELIMITER
    from petals.utils.dht import get_remote_module_infos
    from petals.utils.ping import ping_parallel

    if not args.once:
        threading.Thread(target=_watch_stdin, args=(orphaned,), daemon=True).start()
    deadline = time.monotonic() + args.startup_timeout
    dht = None
    backoff = 1.0
    while dht is None:
        try:
            dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True,
                               startup_timeout=min(10.0, args.startup_timeout))
        except Exception as exc:  # no peer listens yet: say so, try again later and later
            emit({"error": f"cannot join the swarm's DHT: {type(exc).__name__}: {exc}"[:300],
                  "retry_in_s": backoff})
            if args.once or time.monotonic() > deadline:
                return 1
            if orphaned.wait(backoff):
                return 0
            backoff = min(args.retry_max, backoff * 2)
    uids = [f"{args.prefix}{UID_DELIMITER}{i}" for i in range(args.blocks)]
    while not orphaned.is_set():
        started = time.perf_counter()
        try:
            infos = get_remote_module_infos(dht, uids, latest=True)
        except Exception as exc:
            emit({"error": f"DHT listing failed: {type(exc).__name__}: {exc}"[:300]})
            infos = None
        if infos is not None:
            listed = time.perf_counter()
            announced = {peer for info in infos for peer, server in info.servers.items()
                         if server.state.name != "OFFLINE"}
            rtts = (dht.run_coroutine(partial(ping_parallel, list(announced),
                                              wait_timeout=args.ping_timeout))
                    if announced else {})
            blocks = []
            for index, info in enumerate(infos):
                servers = []
                for peer, server in info.servers.items():
                    rtt = rtts.get(peer)
                    servers.append({
                        "peer_id": peer.to_base58(), "state": server.state.name,
                        "start": server.start_block, "end": server.end_block,
                        "throughput": server.throughput, "version": server.version,
                        "torch_dtype": server.torch_dtype, "quant_type": server.quant_type,
                        "alive": rtt is not None and math.isfinite(rtt),
                        "ping_ms": round(rtt * 1000, 2) if rtt is not None
                        and math.isfinite(rtt) else None})
                blocks.append({"index": index, "uid": info.uid, "servers": servers})
            emit({"time": time.time(), "list_ms": round((listed - started) * 1000, 2),
                  "blocks": blocks})
        if args.once:
            break
        orphaned.wait(max(0.0, args.interval - (time.perf_counter() - started)))
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
