"""Pre-warm under faults, on real sshd nodes each in network + PID (+ mount) namespaces of
their own: the CLI killed half-way (no file under a hash name is incomplete; a re-run sends only
what is missing), the node's disk filling up (no partial file; the node and the space named),
a node without a C compiler (the dd and python3 fallbacks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.engines.llama_rpc.manifest import HEX16, Manifest, fnv1a_range, load_manifest
from tests.cluster_files import ssh_cluster_file
from tests.netns_nodes import NamespacedNodes
from tests.sshd_cluster import SSHD

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 MB, two blocks: 7 tensors above 10 MiB (ffn matrices, output), ~82 MB in all."""
    from core.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "big.gguf", n_layer=2,
                            n_embd=1024, n_head=8, n_head_kv=8, n_ff=5632, n_vocab=8192)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NamespacedNodes]]:
    if os.geteuid() != 0 or not os.access(SSHD, os.X_OK):
        pytest.skip("needs root and sshd (network, PID and mount namespaces)")
    made: list[NamespacedNodes] = []
    yield made
    for n in made:
        n.stop()


def start(made: list[NamespacedNodes], tmp_path: Path, cls: type[NamespacedNodes] =
          NamespacedNodes) -> NamespacedNodes:
    n = cls(tmp_path / "nodes", 1)
    made.append(n)
    n.start()
    return n


def cli_cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tui.cli", "-c", str(cfg), *args]


def cli(cfg: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_cmd(cfg, *args), capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def rpc_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "t" / "node1" / "cache" / "rpc"


def node_ls(n: NamespacedNodes, d: Path) -> dict[str, int]:
    """name -> size of the files in d as the node sees it (its own mount namespace)."""
    out = subprocess.run(
        ["nsenter", "-t", str(n._init("node1").pid), "-m", "sh", "-c",
         'cd "$1" 2>/dev/null || exit 0; for f in .[!.]* *; do [ -f "$f" ] && '
         'echo "$f $(wc -c < "$f")"; done; exit 0', "sh", str(d)],
        capture_output=True, text=True, check=True).stdout
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


def rx_bytes(n: NamespacedNodes) -> int:
    far = n.veths["node1"][1]
    out = subprocess.run(["ip", "netns", "exec", n.namespaces["node1"], "cat",
                          f"/sys/class/net/{far}/statistics/rx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def span_tensors(manifest: Manifest) -> dict[str, int]:
    return {t.hash: t.size for t in manifest.for_span(0, manifest.n_layer, True)}


def assert_only_complete(d: Path, manifest: Manifest) -> dict[str, int]:
    """Every file under a hash name holds exactly its tensor's bytes; returns them."""
    wanted = manifest.by_hash()
    complete = {}
    for p in d.iterdir():
        if HEX16.match(p.name):
            t = wanted[p.name]
            assert p.stat().st_size == t.size, f"{p.name}: incomplete file under a hash name"
            assert fnv1a_range(p, 0, t.size) == p.name
            complete[p.name] = p.stat().st_size
    return complete


def test_prewarm_killed_half_way_then_resumed(tmp_path: Path, nodes: list[NamespacedNodes],
                                              big_model: Path) -> None:
    n = start(nodes, tmp_path)
    n.shape("node1", "100mbit")  # ~82 MB to push: about 7 s
    cfg = ssh_cluster_file(tmp_path, n, big_model,
                           node_overrides={"node1": {"model_path": str(tmp_path / "none")}})
    manifest = load_manifest(big_model)
    d = rpc_dir(tmp_path)
    run = subprocess.Popen(cli_cmd(cfg, "cache", "warm"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            files = {p.name: p.stat().st_size for p in d.iterdir()} if d.is_dir() else {}
            parts = [s for name, s in files.items() if name.startswith(".part-")]
            if any(HEX16.match(name) for name in files) and parts and parts[0] > 4 << 20:
                break
            time.sleep(0.03)
        assert run.poll() is None, "the pre-warm ended before it could be killed"
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        run.wait(10)
    time.sleep(1.0)  # the node's side sees the connection end
    complete = assert_only_complete(d, manifest)
    parts = {p.name[6:]: p.stat().st_size for p in d.iterdir() if p.name.startswith(".part-")}
    assert complete and parts, (complete, parts)
    assert all(s < manifest.by_hash()[h].size for h, s in parts.items())
    before = {h: (d / h).stat().st_ino for h in complete}
    want = span_tensors(manifest)
    missing = {h: s for h, s in want.items() if h not in complete}

    rx0 = rx_bytes(n)
    again = cli(cfg, "cache", "warm")
    crossed = rx_bytes(n) - rx0
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"node1: {len(missing)} tensor(s)" in again.stdout, again.stdout
    assert f"{len(complete)} already warm" in again.stdout, again.stdout
    assert {h: (d / h).stat().st_ino for h in complete} == before  # not rewritten
    assert assert_only_complete(d, manifest) == want
    assert not [p for p in d.iterdir() if p.name.startswith(".part-")]
    # Only what was missing crossed, the partial file resumed (SSH adds a few %).
    resumed = sum(missing.values()) - sum(parts.values())
    assert crossed < resumed * 1.05 + (1 << 20), (crossed, resumed, parts)


def test_full_disk_during_prewarm(tmp_path: Path, nodes: list[NamespacedNodes],
                                  big_model: Path) -> None:
    n = start(nodes, tmp_path)
    cfg = ssh_cluster_file(tmp_path, n, big_model,
                           node_overrides={"node1": {"model_path": str(tmp_path / "none")}})
    manifest = load_manifest(big_model)
    cache = rpc_dir(tmp_path).parent
    cache.mkdir(parents=True)
    enter = ["nsenter", "-t", str(n._init("node1").pid), "-m"]

    # Too small from the start: refused before a byte is written.
    subprocess.run([*enter, "mount", "-t", "tmpfs", "-o", "size=20m,mode=700", "tmpfs",
                    str(cache)], check=True)
    small = cli(cfg, "cache", "warm")
    assert small.returncode == 1
    assert "error: node1: not enough disk space for its cache at" in small.stdout, small.stdout
    assert "free" in small.stdout and "no partial file was left" in small.stdout
    assert node_ls(n, rpc_dir(tmp_path)) == {}
    subprocess.run([*enter, "umount", str(cache)], check=True)

    # Room at the start, the disk fills up half-way (something else writes there).
    subprocess.run([*enter, "mount", "-t", "tmpfs", "-o", "size=150m,mode=700", "tmpfs",
                    str(cache)], check=True)
    n.shape("node1", "100mbit")
    run = subprocess.Popen(cli_cmd(cfg, "cache", "warm"), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.poll() is None:
            if any(HEX16.match(name) for name in node_ls(n, rpc_dir(tmp_path))):
                break
            time.sleep(0.05)
        subprocess.run([*enter, "sh", "-c", 'cat /dev/zero > "$1"/filler', "sh", str(cache)],
                       check=False, capture_output=True)
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    assert run.returncode == 1, out
    assert "error: node1: not enough disk space for its cache at" in out, out
    assert f"{rpc_dir(tmp_path)}: needs" in out and "free" in out
    left = node_ls(n, rpc_dir(tmp_path))
    assert not [f for f in left if not HEX16.match(f)], left  # no .part- file
    wanted = manifest.by_hash()
    assert left and all(wanted[h].size == s for h, s in left.items()), left


class NoCompilerNodes(NamespacedNodes):
    """Nodes whose sessions find no C compiler on PATH and keep their tools in a home of
    their own (so no tensor tool compiled earlier is found)."""

    def _write_config(self, name: str, host: str) -> None:
        super()._write_config(name, host)
        d = self.node_dir(name)
        bin_dir, home = d / "bin", d / "home"
        bin_dir.mkdir(exist_ok=True)
        home.mkdir(exist_ok=True)
        compilers = {"cc", "gcc", "c89", "c99", "clang", "tcc"}
        for tool in Path("/usr/bin").iterdir():
            if tool.name not in compilers and not tool.name.endswith(("-gcc", "-cc")) \
                    and not tool.name.startswith(("gcc-", "x86_64-linux-gnu-gcc", "clang-")):
                with contextlib.suppress(FileExistsError):
                    (bin_dir / tool.name).symlink_to(tool)
        conf = d / "sshd_config"  # sshd honours only the first SetEnv line: extend it
        conf.write_text(conf.read_text().replace(
            "SetEnv SHLVL=1", f"SetEnv SHLVL=1 PATH={bin_dir} HOME={home}"))


def test_node_without_cc_cuts_with_dd_and_hashes_with_python3(
        tmp_path: Path, nodes: list[NamespacedNodes], big_model: Path) -> None:
    n = start(nodes, tmp_path, NoCompilerNodes)
    home = n.node_dir("node1") / "home"
    cfg = ssh_cluster_file(tmp_path, n, big_model)
    manifest = load_manifest(big_model)
    node = n.nodes[0]
    seen = subprocess.run(
        ["ssh", "-i", str(n.client_key), "-o", f"UserKnownHostsFile={n.known_hosts}",
         "-o", "BatchMode=yes", "-p", str(node.port), f"root@{node.host}",
         'echo "$HOME"; command -v cc || echo nocc; command -v dd python3'],
        capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert seen[:2] == [str(home), "nocc"] and len(seen) == 4, seen
    warm = cli(cfg, "cache", "warm", "--verify", timeout=600)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "from its node copy" in warm.stdout, warm.stdout
    assert not list((home / ".cache").rglob("tensor_tool-*"))  # no compiler, no tool
    assert assert_only_complete(rpc_dir(tmp_path), manifest) == span_tensors(manifest)
    # python3 re-hashes: a same-size corrupt file is found and moved aside.
    victim = next(iter(span_tensors(manifest)))
    data = bytearray((rpc_dir(tmp_path) / victim).read_bytes())
    data[7] ^= 0xFF
    (rpc_dir(tmp_path) / victim).write_bytes(bytes(data))
    verified = cli(cfg, "cache", "--verify", timeout=600)
    assert f"cache file {victim}" in verified.stdout and "hash mismatch" in verified.stdout, \
        verified.stdout
    assert not (rpc_dir(tmp_path) / victim).exists()


async def test_doctor_warns_of_wrong_cache_files(tmp_path: Path, big_model: Path) -> None:
    from core.cluster import Cluster
    from core.config import load_config
    from core.operations import doctor
    from tests.cluster_files import free_port, toml_text

    manifest = load_manifest(big_model)
    d = tmp_path / "state" / "doc" / "w0" / "cache" / "rpc"
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml_text({"name": "doc", "state_dir": str(tmp_path / "state")},
                             [{"name": "w0", "host": "127.0.0.1", "transport": "local",
                               "rpc_port": free_port()}], model={"gguf": str(big_model)}))

    async def cache_check() -> tuple[str, str]:
        cluster = Cluster(load_config(cfg))
        try:
            report = await doctor(cluster)
        finally:
            await cluster.close()
        found = [c for c in report.checks if c.part == "w0" and c.name == "cache"]
        assert len(found) == 1, report.checks
        return found[0].level, found[0].message

    assert (await cache_check())[0] == "ok"
    t1, t2 = manifest.cacheable()[:2]
    d.mkdir(parents=True)
    with open(big_model, "rb") as f:
        f.seek(t1.offset)
        (d / t1.hash).write_bytes(f.read(t1.size))  # right
        f.seek(t2.offset)
        (d / t2.hash).write_bytes(f.read(t2.size - 1))  # truncated
    level, message = await cache_check()
    assert level == "warning"
    assert f"{t2.hash} ({t2.name}) is truncated" in message
    assert "run `torbiz-tui cache warm w0`" in message
    assert (d / t2.hash).exists()  # the doctor only looks
    (d / t2.hash).unlink()
    assert await cache_check() == ("ok", "1 tensor(s) of the model cached, sizes right")


def test_prewarm_keeps_within_cache_limit(tmp_path: Path, big_model: Path) -> None:
    """Over the limit: tensors of no configured model go first, oldest first, then the model's
    tensors outside the node's span; the span alone above the limit is refused."""
    from tests.cluster_files import free_port, toml_text

    manifest = load_manifest(big_model)
    span = span_tensors(manifest)
    d = tmp_path / "state" / "lim" / "w0" / "cache" / "rpc"
    d.mkdir(parents=True)
    mib = 1 << 20
    for i, name in enumerate(["00000000000000aa", "00000000000000bb", "00000000000000cc"]):
        (d / name).write_bytes(b"z" * 4 * mib)  # of no configured model
        os.utime(d / name, (1_000_000 + i, 1_000_000 + i))  # aa oldest
    os.utime(d, None)

    def config(limit_bytes: int) -> Path:
        cfg = tmp_path / "c.toml"
        cfg.write_text(toml_text(
            {"name": "lim", "state_dir": str(tmp_path / "state")},
            [{"name": "w0", "host": "127.0.0.1", "transport": "local", "rpc_port": free_port(),
              "cache_limit_gb": limit_bytes / (1 << 30)}],
            model={"gguf": str(big_model)}, plan={"policy": "spread",
                                                  "coordinator_layers": False}))
        return cfg

    too_small = cli(config(sum(span.values()) - mib), "cache", "warm")
    assert too_small.returncode == 1
    assert "error: w0: its planned blocks need" in too_small.stdout, too_small.stdout
    assert "above its cache_limit_gb" in too_small.stdout
    assert sorted(p.name for p in d.iterdir()) == ["00000000000000aa", "00000000000000bb",
                                                   "00000000000000cc"]

    # Room for the span and two of the three foreign files: the oldest goes.
    fits = cli(config(sum(span.values()) + 9 * mib), "cache", "warm")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "evicted 1 file(s), 4.0 MiB" in fits.stdout and "00000000000000aa" in fits.stdout, \
        fits.stdout
    assert {p.name for p in d.iterdir()} == set(span) | {"00000000000000bb", "00000000000000cc"}
