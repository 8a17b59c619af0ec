"""Faults on a real cluster, and what the workers' tensor caches save on a slow link.

Part 1, a table on a loopback cluster (real sshd per node from tests/sshd_cluster.py, real
rpc-servers, a real llama-server with the demo model, core.supervision.supervisor with recovery on,
and a
client sending one short completion after another): for each fault, when it was noticed, when
the cluster served again, and how many requests failed.

Part 2, the coordinator's cold load against its reload on warm caches (`rpc-server -c`). The
cache skips only tensors over 10 MiB and loopback hides transfer time, so each worker runs in
a network namespace of its own, linked to the coordinator's namespace by a veth pair shaped
with `tbf` (this kernel has no netem), and the model's big tensors are 12-20 MiB. Every
address lives inside namespaces this script creates (10.213.N.0/24); they, and every process
started here, are removed on exit, Ctrl-C included.

    sudo .venv/bin/python bench/faults.py [--rate 200mbit] [--skip-faults] [--skip-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from core import operations  # noqa: E402
from core.cluster import Cluster  # noqa: E402
from core.config import load_config  # noqa: E402
from core.demo_model import ensure_demo_model, write_demo_model  # noqa: E402
from core.engines.llama_rpc.build import find_cached_binary  # noqa: E402
from core.planning.placement import make_placement  # noqa: E402
from core.reach.probe import probe_node  # noqa: E402
from core.supervision.load_log import tensor_split_for  # noqa: E402
from core.supervision.recovery_record import RecoveryResult  # noqa: E402
from core.supervision.supervisor import Detection, Supervisor  # noqa: E402
from tests.cluster_files import ssh_cluster_file  # noqa: E402
from tests.sshd_cluster import SshdCluster  # noqa: E402

# ---- part 1: faults on a loopback cluster -------------------------------------------------------


@dataclass
class Row:
    fault: str
    detected: float | None = None  # seconds after the fault
    recovered: float | None = None  # seconds after the fault until requests succeed again
    lost: int = 0
    sent: int = 0
    note: str = ""
    attempts: int = 0  # failed attempts of the lost requests (retries included)


@dataclass
class Client:
    """One short completion after another, as a patient client would send them: a request
    that fails is retried every 0.2 s until it succeeds. A request is lost when any attempt
    failed (its answer was lost, or it was refused); retries are counted apart."""

    url: str
    failures: list[float] = field(default_factory=list)  # failed attempts
    successes: list[float] = field(default_factory=list)
    requests: list[tuple[float, int]] = field(default_factory=list)  # (answered at, failures)

    async def run(self) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            while True:
                failed = 0
                while True:
                    try:
                        response = await client.post(f"{self.url}/v1/chat/completions",
                                                     json=body)
                        ok = response.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    (self.successes if ok else self.failures).append(time.monotonic())
                    if ok:
                        break
                    failed += 1
                    await asyncio.sleep(0.2)  # a down server refuses at once: do not spin
                self.requests.append((time.monotonic(), failed))

    def since(self, t: float) -> tuple[int, int, int]:
        """(requests lost, requests sent, failed attempts) since t."""
        recent = [failed for answered, failed in self.requests if answered >= t]
        return sum(1 for f in recent if f), len(recent), sum(recent)


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def _plan_up(cluster: Cluster) -> None:
    names = [n.name for n in cluster.config.nodes]
    probes = await asyncio.gather(*(probe_node(cluster.transport(n)) for n in names))
    placement = await make_placement(cluster.config, dict(zip(names, probes, strict=True)))
    await operations.up(cluster, spans=placement.plan.rpc_spans())


async def fault_table(workdir: Path) -> list[Row]:
    sshd = SshdCluster(workdir / "sshd", 3, prefix="127.213.7")
    sshd.start()
    model = ensure_demo_model(workdir / "demo.gguf")
    config = load_config(ssh_cluster_file(workdir, sshd, model, name="bench-faults"))
    cluster = Cluster(config)
    detections: list[Detection] = []
    recoveries: list[RecoveryResult] = []

    def report(item: Detection | RecoveryResult) -> None:
        (recoveries if isinstance(item, RecoveryResult) else detections).append(item)

    supervisor = Supervisor(cluster, interval=0.5, recover=True)
    rows: list[Row] = []
    try:
        await _plan_up(cluster)
        watching = asyncio.create_task(supervisor.run(report))
        client = Client(cluster.coordinator.url)
        traffic = asyncio.create_task(client.run())
        await asyncio.sleep(2)

        def detected_after(part: str, t0: float) -> float | None:
            hit = next((d for d in detections if d.part == part and d.at >= t0), None)
            return hit.at - t0 if hit else None

        async def served_again(t0: float, timeout: float = 90) -> float | None:
            ok = await _until(lambda: any(s > t0 and s > max(client.failures, default=0)
                                          for s in client.successes), timeout)
            return (max(client.successes) - t0) if ok else None

        # 1. a worker killed with -9 while requests run
        victim = cluster.nodes["node3"].pid
        assert victim
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        await _until(lambda: bool(recoveries), 90)
        recovered = await served_again(t0)
        failed, sent, attempts = client.since(t0)
        note = recoveries[-1].reason if recoveries else "no recovery"
        rows.append(Row("worker kill -9 (node3)", detected_after("node3", t0), recovered,
                        failed, sent, note, attempts))
        await asyncio.sleep(2)

        # 2. a node's sshd killed (its connections dropped), back after 5 s
        t0 = time.monotonic()
        sshd.stop_node("node1", drop_connections=True)
        await _until(lambda: cluster.nodes["node1"].state == "unreachable", 10)
        await asyncio.sleep(5)
        sshd.start_node("node1")
        back = time.monotonic()
        await _until(lambda: cluster.nodes["node1"].state == "ready", 30)
        reattached = time.monotonic() - back
        failed, sent, attempts = client.since(t0)
        rows.append(Row("sshd killed (node1), back after 5 s", detected_after("node1", t0),
                        None, failed, sent,
                        f"worker kept serving; SSH reattached {reattached:.1f} s after sshd "
                        "returned (backoff)", attempts))
        await asyncio.sleep(1)

        # 3. the coordinator killed with -9
        count = len(recoveries)
        pid = cluster.coordinator.pid
        assert pid
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: len(recoveries) > count, 90)
        recovered = await served_again(t0)
        failed, sent, attempts = client.since(t0)
        rows.append(Row("coordinator kill -9", detected_after("coordinator", t0), recovered,
                        failed, sent, recoveries[-1].reason if len(recoveries) > count
                        else "no recovery", attempts))
        await asyncio.sleep(1)

        # 4. a second dashboard (a fresh Cluster in this process: what a restarted dashboard
        # does first) reads the cluster mid-run and starts the coordinator: it reattaches
        t0 = time.monotonic()
        before = {n: s.pid for n, s in cluster.nodes.items() if s.state == "ready"}
        assert config.source is not None
        again = Cluster(load_config(config.source))
        try:
            seen = await again.status()
            coordinator = await again.start_coordinator()
            same = ({n.name: n.pid for n in seen.nodes if n.state == "ready"} == before
                    and coordinator.pid == cluster.coordinator.pid)
        finally:
            await again.close()
        await asyncio.sleep(2)
        failed, sent, attempts = client.since(t0)
        rows.append(Row("dashboard restarted mid-run", None, None, failed, sent,
                        "reattached to the same pids" if same else "PIDS DIFFER", attempts))
        traffic.cancel()
        watching.cancel()
        await asyncio.gather(traffic, watching, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await cluster.close()
            await cluster.down()
        await cluster.close()
        sshd.stop()
    return rows


async def hung_table(workdir: Path, rate: str, delay_ms: float = 50) -> list[Row]:
    """Frozen, cut-off and thinned nodes: each node an sshd in network + PID namespaces of its
    own (tests/netns_nodes.py), the rest as fault_table. `screen` is what the core reported
    (and so what the table, `status` and `watch` show) for the node and the coordinator."""
    from core.status import READY
    from core.status_text import node_state_text
    from tests.netns_nodes import NamespacedNodes

    nodes = NamespacedNodes(workdir / "nodes", 3)
    nodes.start()
    # node1's SSH and RPC cross a latency relay (0 ms until its link is slowed).
    relayed = nodes.relay("node1", 0)
    model = ensure_demo_model(workdir / "demo.gguf")
    config = load_config(ssh_cluster_file(workdir, nodes, model, name="bench-hung",
                                          node_overrides={"node1": relayed}))
    cluster = Cluster(config)
    detections: list[Detection] = []
    recoveries: list[RecoveryResult] = []

    def report(item: Detection | RecoveryResult) -> None:
        (recoveries if isinstance(item, RecoveryResult) else detections).append(item)

    supervisor = Supervisor(cluster, interval=0.5, recover=True)
    rows: list[Row] = []
    try:
        await _plan_up(cluster)
        watching = asyncio.create_task(supervisor.run(report))
        client = Client(cluster.coordinator.url)
        traffic = asyncio.create_task(client.run())
        await asyncio.sleep(2)

        async def fault(label: str, name: str, hit: Callable[[], None],
                        heal: Callable[[], None]) -> None:
            count = len(recoveries)
            t0 = time.monotonic()
            states: set[str] = set()
            hit()
            ok = await _until(lambda: (states.add(f"{cluster.nodes[name].state}/"
                                                  f"{cluster.coordinator.state}") or False)
                              or len(recoveries) > count, 30)
            d = next((x.at - t0 for x in detections if x.part == name and x.at >= t0), None)
            recovered = None
            if ok:
                await _until(lambda: any(t > t0 and t > max(client.failures, default=0)
                                         for t in client.successes), 30)
                recovered = max(client.successes) - t0
            failed, sent, attempts = client.since(t0)
            rows.append(Row(label, d, recovered, failed, sent,
                            "node/coordinator seen: " + ", ".join(sorted(states))
                            + (f"; {recoveries[-1].reason}" if ok else "; no recovery"),
                            attempts))
            t1 = time.monotonic()
            pid = cluster.nodes[name].pid
            heal()
            back = await _until(lambda: cluster.nodes[name].state == READY, 30)
            rows.append(Row(f"{label}: back", None, None, *client.since(t1)[:2],
                            (f"{name} ready after {time.monotonic() - t1:.1f} s, "
                             + ("same worker pid" if cluster.nodes[name].pid == pid
                                else "worker restarted (it died meanwhile)"))
                            if back else f"{name} not ready after 30 s"))
            await asyncio.sleep(2)

        await fault("node frozen (SIGSTOP all, node2)", "node2",
                    lambda: nodes.freeze("node2"), lambda: nodes.thaw("node2"))
        await operations.rebalance(cluster)
        await asyncio.sleep(2)
        await fault("link down (node3's veth)", "node3",
                    lambda: nodes.link_down("node3"), lambda: nodes.link_up("node3"))
        await operations.rebalance(cluster)
        await asyncio.sleep(2)
        t0 = time.monotonic()
        nodes.shape("node1", rate)
        nodes.delay("node1", delay_ms)
        shown: set[str] = set()
        for _ in range(40):
            shown.add(node_state_text(cluster.nodes["node1"]))
            await asyncio.sleep(0.2)
        failed, sent, attempts = client.since(t0)
        bad = [d for d in detections if d.part == "node1" and d.at >= t0]
        rows.append(Row(f"link slowed (node1, tbf {rate} + {delay_ms:g} ms each way)", None,
                        None, failed, sent,
                        f"screen: node1 {'/'.join(sorted(shown))}, RTT "
                        f"{cluster.nodes['node1'].probe_ms} ms; "
                        f"{len(bad)} detections, {len(recoveries)} recoveries in all", attempts))
        traffic.cancel()
        watching.cancel()
        await asyncio.gather(traffic, watching, return_exceptions=True)
    finally:
        for name in nodes.names:
            nodes.thaw(name)
            nodes.link_up(name)
        with contextlib.suppress(Exception):
            await cluster.close()
            await cluster.down()
        await cluster.close()
        nodes.stop()
    return rows


def print_fault_table(rows: list[Row]) -> None:
    def sec(value: float | None) -> str:
        return f"{value:.2f} s" if value is not None else "-"

    table = [("fault", "detected after", "recovered after", "requests lost", "note")]
    table += [(r.fault, sec(r.detected), sec(r.recovered),
               f"{r.lost} of {r.sent}" + (f" ({r.attempts} failed tries)" if r.attempts else ""),
               r.note) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t[:4], widths, strict=True)) + "  " + t[4])


# ---- part 2: cold load vs warm caches over shaped links ------------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Namespaces:
    """A coordinator namespace and one namespace per worker, a tbf-shaped veth pair between the
    coordinator and each worker; addresses only inside them."""

    def __init__(self, workers: int, rate: str) -> None:
        tag = f"tzb{os.getpid() % 100000}"
        self.coordinator = f"{tag}-c"
        self.workers = [f"{tag}-w{i + 1}" for i in range(workers)]
        self.rate = rate
        self._tag = tag
        self.created: list[str] = []

    def address(self, index: int) -> str:
        return f"10.213.{index + 1}.2"

    def up(self) -> None:
        for ns in (self.coordinator, *self.workers):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.workers):
            near, far = f"{self._tag}c{i + 1}", f"{self._tag}w{i + 1}"
            _run("ip", "-n", self.coordinator, "link", "add", near, "type", "veth", "peer",
                 "name", far, "netns", ns)
            _run("ip", "-n", self.coordinator, "addr", "add", f"10.213.{i + 1}.1/24", "dev", near)
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", far)
            for where, dev in ((self.coordinator, near), (ns, far)):
                _run("ip", "-n", where, "link", "set", dev, "up")
                _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root",
                     "tbf", "rate", self.rate, "burst", "64kb", "latency", "50ms")

    def down(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL, check=False)
        self.created.clear()


class Procs:
    """Processes started here, each in its own process group; stopped by group id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def _healthy(ns: str, port: int) -> bool:
    result = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null",
                             "-w", "%{http_code}", "--max-time", "1",
                             f"http://127.0.0.1:{port}/health"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() == "200"


def _wait_port(ns: str, host: str, port: int, timeout: float = 20) -> None:
    """Until the worker listens (a bare connect and close: nothing sent, nothing unread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(["ip", "netns", "exec", ns, "bash", "-c",
                                f"exec 3<>/dev/tcp/{host}/{port}"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: worker {host}:{port} did not listen within {timeout:g} s")


@dataclass
class Load:
    label: str
    seconds: float


def cache_ratio(workdir: Path, rate: str, workers: int, warm_runs: int) -> list[Load]:
    rpc = find_cached_binary("ggml-rpc-server")
    server = find_cached_binary("llama-server")
    if not (rpc and server):
        raise SystemExit("bench: llama.cpp not built: run `torbiz-tui build-llama`")
    model = workdir / "big.gguf"
    # 3 blocks of 12.5 MiB attention and 20 MiB feed-forward matrices (over the 10 MiB cache
    # threshold); deterministic, and the demo model is untouched.
    print("writing the bench model ...", file=sys.stderr, flush=True)
    write_demo_model(model, seed=1, n_layer=workers, n_embd=2560, n_head=20, n_head_kv=4,
                     n_ff=4096, n_vocab=512)
    size_mib = model.stat().st_size / (1 << 20)
    spaces = Namespaces(workers, rate)
    procs = Procs()
    loads: list[Load] = []

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)  # cleaned up like Ctrl-C
    try:
        spaces.up()
        port = 8080
        worker_procs = []
        for i, ns in enumerate(spaces.workers):
            cache = workdir / f"cache{i + 1}"
            cache.mkdir()
            worker_procs.append(procs.start(
                ["ip", "netns", "exec", ns, str(rpc), "-H", spaces.address(i), "-p", "50052",
                 "-c", "-t", "1"], workdir / f"worker{i + 1}.log", {"LLAMA_CACHE": str(cache)}))
        for i, ns in enumerate(spaces.workers):
            _wait_port(ns, spaces.address(i), 50052)

        def load(label: str, endpoints: list[str], layers: list[int]) -> Load:
            ngl, split = tensor_split_for(layers)
            argv = ["ip", "netns", "exec", spaces.coordinator, str(server), "-m", str(model),
                    "-c", "512", "--host", "127.0.0.1", "--port", str(port), "-ngl", str(ngl),
                    "-ts", ",".join(map(str, split)), "--fit", "off", "--rpc",
                    ",".join(endpoints), "-t", "1"]
            started = time.monotonic()
            proc = procs.start(argv, workdir / "coordinator.log")
            while not _healthy(spaces.coordinator, port):
                if proc.poll() is not None:
                    raise SystemExit(f"bench: llama-server exited while loading ({label}); "
                                     f"see {workdir / 'coordinator.log'}")
                if time.monotonic() - started > 600:
                    raise SystemExit(f"bench: {label}: not healthy after 600 s")
                time.sleep(0.1)
            took = time.monotonic() - started
            procs.stop(proc)
            print(f"  {label}: {took:.2f} s", file=sys.stderr, flush=True)
            return Load(label, took)

        endpoints = [f"{spaces.address(i)}:50052" for i in range(workers)]
        every = [1] * workers
        loads.append(load("cold load (empty caches)", endpoints, every))
        warm = [load(f"warm reload #{n + 1}", endpoints, every).seconds
                for n in range(warm_runs)]
        loads.append(Load("warm reload (median)", statistics.median(warm)))
        # Recovery: the last worker dies; its block moves to the first worker, which has never
        # held it, so that block crosses the link while the others come from the caches.
        procs.stop(worker_procs[-1], signal.SIGKILL)
        moved = [1] * (workers - 2) + [2]  # the last survivor takes the lost last block
        loads.append(load(f"recovery reload without w{workers} (1 block moves)",
                          endpoints[:-1], moved))
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        spaces.down()
        signal.signal(signal.SIGTERM, previous)
    print(f"\nmodel {size_mib:.0f} MiB in {workers} blocks (tensors 12.5-20 MiB), each worker "
          f"in its own network namespace behind tbf {rate}:")
    cold = loads[0].seconds
    for entry in loads:
        ratio = cold / entry.seconds if entry.seconds else float("nan")
        print(f"  {entry.label:<44} {entry.seconds:7.2f} s   cold/this = {ratio:.2f}x")
    return loads


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="torbiz-bench-faults-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="200mbit", help="tbf rate of every link (200mbit)")
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--skip-faults", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    parser.add_argument("--skip-hung", action="store_true")
    parser.add_argument("--slow-rate", default="256kbit", help="tbf rate of the slowed link")
    parser.add_argument("--slow-delay-ms", type=float, default=50,
                        help="latency the relay adds each way on the slowed link")
    args = parser.parse_args()
    # Ctrl-C must clean up even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.geteuid() != 0:
        print("bench: needs root (sshd nodes log in as root; network namespaces)",
              file=sys.stderr)
        return 2
    try:
        with _workdir() as workdir:
            if not args.skip_faults:
                print("faults on a 3-node loopback cluster (sshd + rpc-server + llama-server, "
                      "recovery on), a client sending completions throughout:", flush=True)
                print_fault_table(asyncio.run(fault_table(workdir / "faults")))
                print(flush=True)
            if not args.skip_hung:
                print("hung, cut-off and slow nodes (each node in network + PID namespaces of "
                      "its own), a client sending completions throughout:", flush=True)
                (workdir / "hung").mkdir()
                print_fault_table(asyncio.run(hung_table(workdir / "hung", args.slow_rate,
                                                          args.slow_delay_ms)))
                print(flush=True)
            if not args.skip_cache:
                (workdir / "cache").mkdir()
                cache_ratio(workdir / "cache", args.rate, 3, args.warm_runs)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
