"""Cold start with and without pre-warmed weight caches (run as root).

Two rpc-server workers, each in its own network namespace behind a tbf-shaped link (200 mbit/s
by default) to the coordinator's namespace; a model of ~340 MiB whose tensors above 10 MiB
carry >= 90% of the bytes; fresh caches each round. Time from the start of the round to the
first generated token:
  (a) llama.cpp's own cold load (everything crosses the links)
  (c) pre-warm from the node's own copy of the model (torbiz's cut_on_node: the tensors are
      cut out of the node's file on the node, in parallel), then the load
  (d) everything warm (the caches (c) left), the load only
and the bytes that crossed each worker's link (its interface's rx counter).
Then the same through torbiz itself on sshd nodes in namespaces of their own (bench/
cold_start_sshd.py): `up` cold, (b) the pre-warm pushed over SSH to both workers in parallel
then `up`, `up` warm, a warm coordinator restart, and a recovery after killing a worker onto a
pre-warmed standby vs onto a cold one (`[plan] standby`).

    sudo .venv/bin/python bench/cold_start.py [--rate 200mbit]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.cold_start_sshd import SshdRow, sshd_rounds  # noqa: E402
from bench.faults import Namespaces, Procs, _healthy, _wait_port  # noqa: E402
from core.config import NodeConfig  # noqa: E402
from core.demo_model import write_demo_model  # noqa: E402
from core.engines.llama_rpc import warm  # noqa: E402
from core.engines.llama_rpc.build import find_cached_binary  # noqa: E402
from core.engines.llama_rpc.manifest import HASH_THRESHOLD, Manifest, load_manifest  # noqa: E402
from core.reach.transport import LocalTransport  # noqa: E402
from core.supervision.load_log import tensor_split_for  # noqa: E402


def rx_bytes(ns: str, dev: str) -> int:
    import subprocess

    out = subprocess.run(["ip", "netns", "exec", ns, "cat",
                          f"/sys/class/net/{dev}/statistics/rx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--only", choices=("direct", "sshd", "recovery"), default=None,
                        help="run only the direct rounds, only the rounds through torbiz, or "
                        "only the warm restart and the recoveries (with `up` warm first)")
    args = parser.parse_args()
    rpc, server = find_cached_binary("ggml-rpc-server"), find_cached_binary("llama-server")
    if not (rpc and server):
        raise SystemExit("bench: llama.cpp not built: run `torbiz-tui build-llama`")
    workdir = Path(tempfile.mkdtemp(prefix="torbiz-cold-"))
    workers = 2
    model = write_demo_model(workdir / "big.gguf", seed=3, n_layer=4, n_embd=1024, n_head=8,
                             n_head_kv=8, n_ff=11264, n_vocab=8192)
    manifest = load_manifest(model)
    big = sum(t.size for t in manifest.tensors if t.size > HASH_THRESHOLD)
    share = big / manifest.size
    spaces = Namespaces(workers, args.rate)
    procs = Procs()
    rows: list[tuple[str, float, float, list[int]]] = []
    spans = [(0, 2), (2, 2)]
    try:
        if args.only in ("sshd", "recovery"):
            raise _Skip
        spaces.up()
        port = 8080

        def round_(label: str, prewarm: bool, fresh: bool) -> None:
            caches = [workdir / f"state{i + 1}" for i in range(workers)]
            if fresh:
                for c in caches:
                    shutil.rmtree(c, ignore_errors=True)
            for c in caches:
                c.mkdir(exist_ok=True)
            devs = [f"{spaces._tag}w{i + 1}" for i in range(workers)]
            rx0 = [rx_bytes(ns, d) for ns, d in zip(spaces.workers, devs, strict=True)]
            started = time.monotonic()
            warm_s = 0.0
            if prewarm:
                async def cut_all() -> None:
                    await asyncio.gather(*(
                        warm.cut_on_node(LocalTransport(NodeConfig(f"w{i + 1}", "localhost")),
                                         NodeConfig(f"w{i + 1}", "localhost"), str(caches[i]),
                                         str(model), manifest.for_span(
                                             *spans[i], spans[i][0] + spans[i][1] >= 4),
                                         lambda p: None)
                        for i in range(workers)))
                asyncio.run(cut_all())
                warm_s = time.monotonic() - started
            worker_procs = [procs.start(
                ["ip", "netns", "exec", ns, str(rpc), "-H", spaces.address(i), "-p", "50052",
                 "-c", "-t", "1"], workdir / f"worker{i + 1}.log",
                {"LLAMA_CACHE": str(caches[i] / "cache")}) for i, ns in enumerate(spaces.workers)]
            for i, ns in enumerate(spaces.workers):
                _wait_port(ns, spaces.address(i), 50052)
            ngl, split = tensor_split_for([2, 2])
            proc = procs.start(
                ["ip", "netns", "exec", spaces.coordinator, str(server), "-m", str(model), "-c",
                 "512", "--host", "127.0.0.1", "--port", str(port), "-ngl", str(ngl), "-ts",
                 ",".join(map(str, split)), "--fit", "off", "--rpc",
                 ",".join(f"{spaces.address(i)}:50052" for i in range(workers)), "-t", "1"],
                workdir / "coordinator.log")
            while not _healthy(spaces.coordinator, port):
                if proc.poll() is not None or time.monotonic() - started > 600:
                    raise SystemExit(f"bench: llama-server did not load ({label}); see "
                                     f"{workdir / 'coordinator.log'}")
                time.sleep(0.1)
            import subprocess
            subprocess.run(["ip", "netns", "exec", spaces.coordinator, "curl", "-s", "-o",
                            "/dev/null", f"http://127.0.0.1:{port}/completion", "-d",
                            '{"prompt":"hello","n_predict":1}'], check=True)
            took = time.monotonic() - started
            crossed = [rx_bytes(ns, d) - r for ns, d, r in
                       zip(spaces.workers, devs, rx0, strict=True)]
            procs.stop(proc)
            for w in worker_procs:
                procs.stop(w)
            rows.append((label, took, warm_s, crossed))
            print(f"  {label}: {took:.2f} s", file=sys.stderr, flush=True)

        round_("(a) llama.cpp cold load", prewarm=False, fresh=True)
        round_("(c) pre-warm from node copies + load", prewarm=True, fresh=True)
        round_("(d) all warm", prewarm=False, fresh=False)
    except _Skip:
        pass
    finally:
        procs.stop_all()
        spaces.down()
    _ = httpx
    sshd_rows = [] if args.only == "direct" else asyncio.run(
        sshd_rounds(model, args.rate, workdir / "sshd", args.only == "recovery"))
    if rows:
        print_direct(rows, manifest, spans, share, workers, args.rate)
    if sshd_rows:
        print_sshd(sshd_rows, manifest, args.rate)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


class _Skip(Exception):
    pass


def print_direct(rows: list[tuple[str, float, float, list[int]]], manifest: Manifest,
                 spans: list[tuple[int, int]], share: float, workers: int, rate: str) -> None:
    cold = rows[0][1]
    per_worker = [sum(t.size for t in manifest.tensors
                      if t.block is not None and s[0] <= t.block < s[0] + s[1]) for s in spans]
    print(f"\nmodel {manifest.size / 2**20:.0f} MiB, {share:.0%} in tensors > 10 MiB; "
          f"{workers} workers, each in its own namespace behind tbf {rate}; time from "
          "start to the first token:")
    print(f"  {'round':<40} {'total':>8} {'pre-warm':>9} {'a/this':>7}  bytes over each link")
    for label, took, warm_s, crossed in rows:
        print(f"  {label:<40} {took:7.2f}s {warm_s:8.2f}s {cold / took:6.2f}x  "
              + ", ".join(f"{c / 2**20:.1f} MiB ({c / p:.0%} of its blocks)"
                          for c, p in zip(crossed, per_worker, strict=True)))


def print_sshd(rows: list[SshdRow], manifest: Manifest, rate: str) -> None:
    cold = rows[0].took
    restart = next((r.took for r in rows if r.label.startswith("warm restart (")), None)
    watched = next((r.took for r in rows if r.label.startswith("warm restart, sup")), None)
    print(f"\nthrough torbiz: sshd nodes node1, node2 (workers) and node3 (standby), each in "
          f"network + PID namespaces of its own behind tbf {rate}; no node has a copy of the "
          "model (pre-warms push over SSH); time to the first token:")
    print(f"  {'round':<40} {'total':>8} {'pre-warm':>9} {'vs first':>9} "
          f"{'vs restart':>10} {'vs superv.':>10}  bytes over each link")
    blank = " " * 10
    for r in rows:
        recovery = r.label.startswith("recovery")
        vs_restart = f"{r.took / restart:9.2f}x" if restart and recovery else blank
        vs_watched = f"{r.took / watched:9.2f}x" if watched and recovery else blank
        crossed = ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in r.crossed.items())
        print(f"  {r.label:<40} {r.took:7.2f}s {r.prewarm_s:8.2f}s {cold / r.took:8.2f}x "
              f"{vs_restart} {vs_watched}  {crossed}")
    for r in rows:
        if r.note:
            print(f"  {r.label}: {r.note}")
    _ = manifest


if __name__ == "__main__":
    sys.exit(main())
