"""The coordinator bar through a real reload, end to end: the real `torbiz-tui` in tmux on two
real workers and a real llama-server; `u` brings the cluster up, then one worker is killed and
the dashboard's recovery restarts llama-server over the other. Throughout, the pane is
captured again and again, each capture between two reads of llama-server's /health of our
own: the bar must never say `ready` while /health answers 503 (loading) or nothing answers,
and the reload must show as `starting`/`loading`."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.cluster import Cluster
from core.config import load_config
from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from tests.cluster_files import llama_processes_with, toml_text
from tests.test_tui_e2e_tmux import Tmux, tmux
from tests.test_tui_pilot import free_ports

__all__ = ["tmux"]  # a fixture, used by name

pytestmark = pytest.mark.integration

HEALTH_DEADLINE_S = 2.0  # the status check's wait on /health (coordinator.health)
BAR = re.compile(r"coordinator (ready|starting[^│]*?|loading[^│]*?|stopped|stopping|"
                 r"not responding|failed|probing)\s{3}")


@pytest.fixture
def reload_cluster(tmp_path: Path) -> Iterator[Path]:
    if not (find_cached_binary("ggml-rpc-server") and find_cached_binary("llama-server")):
        pytest.skip("llama.cpp not built: run `torbiz-tui build-llama`")
    *rpc_ports, coordinator_port = free_ports(3)
    model = write_demo_model(tmp_path / "m.gguf", n_layer=8, n_embd=512, n_ff=1536)
    nodes = [{"name": name, "host": "127.0.0.1", "transport": "local", "rpc_port": port,
              "threads": 1} for name, port in zip(("alpha", "beta"), rpc_ports, strict=True)]
    path = tmp_path / "cluster.toml"
    path.write_text(toml_text(
        {"name": "reload", "state_dir": str(tmp_path / "state")}, nodes,
        model={"gguf": str(model), "context": 512},
        coordinator={"host": "127.0.0.1", "port": coordinator_port},
        plan={"policy": "spread", "coordinator_layers": False}))
    yield path

    async def down() -> None:
        cluster = Cluster(load_config(path))
        try:
            await cluster.down()
        finally:
            await cluster.close()

    asyncio.run(down())
    assert llama_processes_with([f"-p {port}" for port in rpc_ports]
                                + [f"--port {coordinator_port}"]) == []


def _health(client: httpx.Client, url: str) -> str:
    try:
        return str(client.get(f"{url}/health", timeout=0.5).status_code)
    except httpx.HTTPError:
        return "none"


class Watch:
    """Captures the pane in a loop, each between two /health reads: (before, bar, after,
    the screen)."""

    def __init__(self, tmux: Tmux, url: str) -> None:
        self.tmux, self.url = tmux, url
        self.seen: list[tuple[str, str, str, str]] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(trust_env=False) as client:
            while not self._stop.is_set():
                before = _health(client, self.url)
                screen = self.tmux.screen()
                after = _health(client, self.url)
                found = BAR.search(screen)
                self.times.append(time.monotonic())
                self.seen.append((before, found.group(1).strip() if found else "?", after,
                                  screen))
                time.sleep(0.02)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_the_bar_never_says_ready_over_a_reload_in_tmux(reload_cluster: Path,
                                                        tmux: Tmux) -> None:
    config = load_config(reload_cluster)
    url = f"http://127.0.0.1:{config.coordinator.port}"
    tmux.open_dashboard(reload_cluster)
    tmux.wait_for("2 nodes", "○ stopped", absent="probing")
    tmux.keys("u")
    tmux.wait_for("2 ready", "coordinator ready", timeout=120)
    old = llama_processes_with([f"--port {config.coordinator.port}"])
    assert len(old) == 1
    beta = llama_processes_with([f"-p {config.node('beta').rpc_port}"])
    assert len(beta) == 1

    with Watch(tmux, url) as watch:
        time.sleep(1.0)  # ready before the fault, /health 200
        killed = time.monotonic()
        beta[0].kill()
        deadline = killed + 60
        while time.monotonic() < deadline:
            new = [p for p in llama_processes_with([f"--port {config.coordinator.port}"])
                   if p.pid != old[0].pid]
            if new and watch.seen and watch.seen[-1][1] == "ready" \
                    and watch.seen[-1][2] == "200" and f"pid {new[0].pid}" in watch.seen[-1][3]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not ready again over alpha: {watch.seen[-1][3]}")
        time.sleep(0.5)

    states = [bar for _, bar, _, _ in watch.seen]
    sequence = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    print(f"{len(watch.seen)} captures in {time.monotonic() - killed:.1f} s; bar states "
          f"in order: {sequence}")
    health = sorted({(b, a) for b, _, a, _ in watch.seen})
    print(f"/health before/after a capture, seen: {health}")
    reloading = [shot for shot in watch.seen if shot[1].startswith(("starting", "loading"))]
    assert reloading, sequence
    loading_503 = [shot for shot in reloading if shot[2] == "503"]
    shown = (loading_503 or reloading)[len(loading_503 or reloading) // 2]
    print(f"a capture during the reload (/health {shown[0]} before, {shown[2]} after):\n"
          f"{shown[3]}")
    # Never `ready` while /health answers 503 (loading).
    lies = [(b, bar, a) for b, bar, a, _ in watch.seen if bar == "ready" and a == "503"]
    assert not lies, (lies, sequence)
    # Nothing answering is only known after the status check's /health deadline: a stale
    # `ready` may outlive the coordinator's last answer by that deadline and one pass, no more.
    silent_ready = [t for t, (b, bar, a, _) in zip(watch.times, watch.seen, strict=True)
                    if bar == "ready" and b != "200" and a != "200"]
    if silent_ready:
        print(f"`ready` shown for {silent_ready[-1] - silent_ready[0]:.2f} s after /health "
              "stopped answering")
        assert silent_ready[-1] - silent_ready[0] <= HEALTH_DEADLINE_S + 2.0
    assert sequence[0] == "ready" and sequence[-1] == "ready"
