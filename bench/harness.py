"""What bench/overhead.py and bench/placement.py share: clusters started with the real
`torbiz-tui` command, llama.cpp processes started by hand in process groups of their own,
generation tokens/s from llama-server's own timings, and cleanup on every exit (Ctrl-C too).

Everything listens on 127.0.0.1; every process this starts is stopped by its process group
(`torbiz-tui down` for the ones torbiz-tui started, which kills their groups from the pidfiles).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.demo_model import write_demo_model  # noqa: E402
from core.supervision.load_log import LoadReport, parse_load_log  # noqa: E402
from tests.cluster_files import free_port, toml_text  # noqa: E402

TORBIZ = [sys.executable, "-c", "import sys; from tui.cli import main; sys.exit(main())"]
# Big enough that a token costs milliseconds of arithmetic, not only RPC round trips: about
# 23 MiB of f16 weights per block (n_embd 1024, n_ff 2816), 8 MiB each for embedding and output.
MODEL_SHAPE: dict[str, int] = {"n_embd": 1024, "n_head": 8, "n_head_kv": 4, "n_ff": 2816,
                               "n_vocab": 4096}


def write_model(path: Path, n_layer: int) -> Path:
    """A deterministic random-weight llama (the demo model's generator, larger shape)."""
    return write_demo_model(path, n_layer=n_layer, **MODEL_SHAPE)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` below still cleans up."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


class ProcessGroups:
    """Processes started by hand, each the leader of its own process group; stop() signals
    the groups (TERM, then KILL after a grace period) and nothing else."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], log: Path, cwd: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 5.0) -> None:
        for proc in reversed(self.procs):  # the coordinator (started last) first
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(proc.pid, signal.SIGKILL)  # strays left in the group, if any
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"bench: pid {proc.pid} survived SIGKILL", file=sys.stderr)
        self.procs.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            # Connect and close with RST: a plain close after connecting can kill an idle
            # rpc-server with SIGPIPE (see ARCHITECTURE.md); never send it bytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"llama-server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout:g} s")


def generation_rate(client: httpx.Client, url: str, tokens: int) -> float:
    """Tokens/s of one greedy completion of exactly `tokens` tokens, as llama-server timed its
    own decoding (prompt processing and HTTP excluded)."""
    reply = client.post(f"{url}/v1/completions", json={
        "prompt": "hello world, the cluster", "max_tokens": tokens, "temperature": 0,
        "ignore_eos": True, "cache_prompt": False})
    reply.raise_for_status()
    timings = reply.json()["timings"]
    if int(timings["predicted_n"]) != tokens:
        raise RuntimeError(f"{url}: asked for {tokens} tokens, got {timings['predicted_n']}")
    return float(timings["predicted_per_second"])


def alternate(urls: dict[str, str], tokens: int, repeat: int, warmup: int = 2,
              progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """`warmup` requests each, then `repeat` rounds, the order reversed every other round
    (A B, B A, ...) so a drift in the machine's load hits every setup alike."""
    rates: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    with httpx.Client(timeout=600, trust_env=False) as client:
        for _ in range(warmup):
            for name in names:
                generation_rate(client, urls[name], tokens)
        for attempt in range(repeat):
            for name in (names if attempt % 2 == 0 else names[::-1]):
                rates[name].append(generation_rate(client, urls[name], tokens))
            if progress:
                progress(f"round {attempt + 1}/{repeat}: " + ", ".join(
                    f"{n} {rates[n][-1]:.1f}" for n in names))
    return rates


def torbiz(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TORBIZ_API_KEY"}
    result = subprocess.run([*TORBIZ, "-c", str(config), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise RuntimeError(f"torbiz-tui {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return result


class TorbizCluster:
    """A cluster file of local-transport workers on 127.0.0.1, brought up with
    `torbiz-tui up` (or `up --force`) and always taken down with `torbiz-tui down`."""

    def __init__(self, work: Path, name: str, model: Path, nodes: list[dict[str, Any]],
                 plan: dict[str, Any], context: int,
                 coordinator_args: Sequence[str] = ()) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.name = work, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = work / "state"
        self.nodes = [{"host": "127.0.0.1", "transport": "local", "rpc_port": free_port(),
                       **n} for n in nodes]
        self.config = work / "cluster.toml"
        self.config.write_text(toml_text(
            {"name": name, "state_dir": str(self.state)}, self.nodes,
            model={"gguf": str(model), "context": context},
            coordinator={"host": "127.0.0.1", "port": self.port,
                         **({"extra_args": list(coordinator_args)} if coordinator_args else {})},
            plan=plan))
        self.started = False
        self.up_output = ""

    def up(self, *args: str) -> None:
        self.started = True  # even a failed `up` may leave workers: `down` stops them
        result = torbiz(self.config, "up", *args)
        self.up_output = result.stderr

    def down(self) -> None:
        if self.started:
            result = torbiz(self.config, "down", check=False)
            if result.returncode != 0:
                print(f"bench: torbiz-tui down ({self.name}): {result.stderr.strip()}",
                      file=sys.stderr)
            self.started = False

    def status(self) -> dict[str, Any]:
        return dict(json.loads(torbiz(self.config, "status", "--json", check=False).stdout))

    def coordinator_log(self) -> Path:
        return self.state / self.name / "_coordinator" / "log"

    def load_report(self) -> LoadReport:
        return parse_load_log(self.coordinator_log().read_text(errors="replace").splitlines())


def cmdline(pid: int) -> list[str]:
    """The argv a running process was started with."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0")[:-1]]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(25th, 75th) percentile, by linear interpolation."""
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
    return at(0.25), at(0.75)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
