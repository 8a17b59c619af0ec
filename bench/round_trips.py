"""How many round trips llama.cpp makes to each RPC worker per generated token: one worker on
this machine holding every block, reached through tests/latency_relay.py adding D ms each
way; the time per token (llama-server's own timing) grows by (round trips) x 2D. Prints the
slope; the figure is perf.ROUND_TRIPS_PER_TOKEN.

    python bench/round_trips.py [--delays 0,5,10,20]"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.demo_model import write_demo_model  # noqa: E402
from core.engines.llama_rpc.build import find_cached_binary  # noqa: E402
from core.engines.llama_rpc.calibrate import timed_decode  # noqa: E402
from core.planning.model_info import read_gguf_info  # noqa: E402
from tests.latency_relay import LatencyRelay  # noqa: E402


async def measure(model: Path, delays: list[float], port: int) -> list[tuple[float, float]]:
    rpc = find_cached_binary("rpc-server")
    server = find_cached_binary("llama-server")
    assert rpc and server, "torbiz-tui build-llama first"
    proc = subprocess.Popen([str(rpc), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    n = read_gguf_info(model).n_layers
    rows = []
    try:
        time.sleep(1.0)
        for delay in delays:
            relay = LatencyRelay("127.0.0.1", port, delay_s=delay / 1000)
            listen = await relay.start()
            try:
                run = await timed_decode(str(server), model, 512, f"127.0.0.1:{listen}", n)
            finally:
                await relay.stop()
            rows.append((delay, run.token_seconds))
            print(f"D = {delay:4.1f} ms each way: {run.token_seconds * 1000:7.2f} ms a token",
                  flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays", default="0,5,10,20")
    parser.add_argument("--port", type=int, default=50911)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_demo_model(Path(tmp) / "m.gguf", n_layer=4, n_embd=256)
        rows = asyncio.run(measure(model, [float(d) for d in args.delays.split(",")],
                                   args.port))
    xs = [2 * d / 1000 for d, _ in rows]  # one round trip adds 2D
    ys = [t for _, t in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = covariance / sum((x - mx) ** 2 for x in xs)
    print(f"round trips per worker per token: {slope:.2f} (least squares over {len(rows)} "
          "delays)")


if __name__ == "__main__":
    main()
