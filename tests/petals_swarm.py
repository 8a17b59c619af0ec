"""A private Petals swarm for tests: real `petals.cli.run_server` processes from the Petals venv
(built by scripts/petals-env.sh), inside a network namespace of their own that has only loopback.

Petals and hivemind reach out on their own (a version check against the package index at every
start, a speedtest, NAT port mapping in p2pd, the PUBLIC swarm's bootstrap peers when given no
peers). Here every Petals process runs in a namespace this harness creates, every server gets
`--new_swarm` or explicit `--initial_peers`, and the namespace is deleted afterwards.

Everything Petals-side runs with the venv's own python (the tests' interpreter never imports
torch, petals or hivemind): small scripts below are passed with `-c` and answer with one JSON line
that starts with `TORBIZ-JSON `.

Servers start in their own session and process group (`start_new_session`), with SIGINT set back
to its default (`env --default-signal=INT,QUIT`: a parent that ignores SIGINT must not make the
server ignore it). Stop: SIGINT to the main pid (Petals announces its blocks offline and exits
in a few seconds), then SIGKILL to the whole group if anything is left. Processes are only ever
signalled by the pid/pgid recorded when this harness started them, or because they live inside
the namespace this harness created.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_ENV = "TORBIZ_PETALS_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "torbiz" / "petals-venv"
STAMP_NAME = ".torbiz-petals-env"  # written by scripts/petals-env.sh when the venv is complete

# Environment for every Petals-side process: no hub, no telemetry, unbuffered logs.
PETALS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONWARNINGS": "ignore",
}

JSON_MARK = "TORBIZ-JSON "


# ---- the Petals environment -----------------------------------------------------------------

def petals_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()


def petals_python() -> Path | None:
    """The Petals venv's python, or None when scripts/petals-env.sh has not finished a venv."""
    venv = petals_venv()
    python = venv / "bin" / "python"
    if python.is_file() and os.access(python, os.X_OK) and (venv / STAMP_NAME).is_file():
        return python
    return None


def skip_reason() -> str | None:
    """Why a swarm cannot run here, as a sentence, or None."""
    # On by default when the Petals venv exists (scripts/setup.sh --with-test-tools builds it).
    # The old "hang under load" was the client never exiting (see _GENERATE and docs/petals.md).
    # TORBIZ_PETALS_TESTS=0 turns them off.
    if os.environ.get("TORBIZ_PETALS_TESTS") == "0":
        return "TORBIZ_PETALS_TESTS=0"
    if petals_python() is None:
        return (f"no Petals environment at {petals_venv()} (build it with scripts/petals-env.sh, "
                f"or point {VENV_ENV} at one)")
    if not shutil.which("ip"):
        return "`ip` (iproute2) is missing: the Petals swarm runs in a network namespace"
    if os.geteuid() != 0:
        return ("network namespaces (ip netns) need root, and the Petals swarm must not touch "
                "the network")
    return None


# ---- the network namespace ------------------------------------------------------------------

def _net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class Netns:
    """A network namespace with only loopback up. Created by `create()`, removed by `delete()`,
    which first kills whatever still runs inside it (only this harness starts anything there)."""

    def __init__(self, prefix: str = "tbz-petals") -> None:
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.created = False

    def create(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.created = True
        subprocess.run(self.argv(["ip", "link", "set", "lo", "up"]), check=True,
                       capture_output=True)
        return self

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def exists(self) -> bool:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return any(line.split()[0] == self.name for line in listing.splitlines() if line.strip())

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def interfaces(self) -> list[str]:
        out = subprocess.run(self.argv(["ip", "-o", "link", "show"]), check=True,
                             capture_output=True, text=True).stdout
        return [line.split(":")[1].strip() for line in out.splitlines() if line.strip()]

    def processes(self) -> list[psutil.Process]:
        """Every live process whose network namespace is this one."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            return []
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if _net_inode(proc.info["pid"]) == inode:
                found.append(proc)
        return found

    def delete(self) -> list[str]:
        """Kill what is left inside (reported), then remove the namespace."""
        left = []
        for proc in self.processes():
            try:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except psutil.Error:
                pass
        if left:
            psutil.wait_procs([p for p in self.processes()], timeout=5)
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self.created = False
        return left


@contextmanager
def netns() -> Iterator[Netns]:
    ns = Netns().create()
    try:
        yield ns
    finally:
        ns.delete()


# ---- Petals-side scripts (run with the venv's python, inside the namespace) ------------------

_MAKE_MODEL = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, spec = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(spec.pop("seed"))
config = LlamaConfig(**spec)
model = LlamaForCausalLM(config)
model.save_pretrained(out, safe_serialization=True)
params = sum(p.numel() for p in model.parameters())
print("TORBIZ-JSON " + json.dumps({"params": params, "config": config.to_dict()}))
"""

_IDENTITY = r"""
import json, os, sys
from hivemind.p2p import P2P, PeerID
path = sys.argv[1]
if not os.path.exists(path):
    P2P.generate_identity(path)
with open(path, "rb") as f:
    print("TORBIZ-JSON " + json.dumps({"peer_id": PeerID.from_identity(f.read()).to_base58()}))
"""

# One DHT client: for every block, the servers announcing it (state, span, throughput, version).
_DHT_LIST = r"""
import json, sys, time
import hivemind
from petals.data_structures import UID_DELIMITER
from petals.utils.dht import get_remote_module_infos
peers, prefix, n, repeat = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True)
t1 = time.perf_counter()
uids = [f"{prefix}{UID_DELIMITER}{i}" for i in range(n)]
timings = []
for _ in range(max(1, repeat)):
    s = time.perf_counter()
    infos = get_remote_module_infos(dht, uids, latest=True)
    timings.append((time.perf_counter() - s) * 1000)
blocks = []
for info in infos:
    blocks.append({"uid": info.uid, "servers": {
        peer.to_base58(): {"state": s.state.name, "start": s.start_block, "end": s.end_block,
                           "throughput": s.throughput, "version": s.version,
                           "torch_dtype": s.torch_dtype, "quant_type": s.quant_type}
        for peer, s in info.servers.items()}})
dht.shutdown()
print("TORBIZ-JSON " + json.dumps({"dht_start_s": t1 - t0, "list_ms": timings, "blocks": blocks}))
"""

# Watch the DHT until every block is ONLINE at the planned peer; report the wall-clock moment.
_WAIT_ONLINE = r"""
import json, sys, time
import hivemind
from petals.data_structures import UID_DELIMITER
from petals.utils.dht import get_remote_module_infos
peers, prefix = json.loads(sys.argv[1]), sys.argv[2]
want, timeout = json.loads(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
dht, err = None, ""
while dht is None and time.monotonic() < deadline:
    try:
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True, startup_timeout=10)
    except Exception as e:  # the first server's DHT may not listen yet
        err = repr(e)
        time.sleep(0.5)
if dht is None:
    print("TORBIZ-JSON " + json.dumps({"online": False, "error": err}))
    sys.exit(0)
uids = [f"{prefix}{UID_DELIMITER}{i}" for i in range(len(want))]
seen, polls = {}, 0
while time.monotonic() < deadline:
    polls += 1
    infos = get_remote_module_infos(dht, uids, latest=True)
    seen = {i: {p.to_base58(): s.state.name for p, s in info.servers.items()}
            for i, info in enumerate(infos)}
    if all(seen[i].get(peer) == "ONLINE" for i, peer in enumerate(want)):
        print("TORBIZ-JSON " + json.dumps({"online": True, "at": time.time(), "polls": polls,
                                           "seen": seen}))
        break
    time.sleep(0.2)
else:
    print("TORBIZ-JSON " + json.dumps({"online": False, "seen": seen, "polls": polls}))
dht.shutdown()
"""

# Greedy generation through the swarm vs local transformers on the same weights.
_GENERATE = r"""
import json, sys, time
import torch
from transformers import LlamaForCausalLM
from petals import AutoDistributedModelForCausalLM
model_dir, peers, prefix = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
prompt, n_new = json.loads(sys.argv[4]), int(sys.argv[5])
client_config = json.loads(sys.argv[6])
ids = torch.tensor([prompt])
mask = torch.ones_like(ids)
torch.set_num_threads(1)
local = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
with torch.no_grad():
    ref_logits = local(ids).logits
ref = local.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                     pad_token_id=0)
t0 = time.perf_counter()
remote = AutoDistributedModelForCausalLM.from_pretrained(
    model_dir, initial_peers=peers, dht_prefix=prefix, torch_dtype=torch.float32,
    **client_config)
t1 = time.perf_counter()
with torch.no_grad():
    swarm_logits = remote(ids).logits
t2 = time.perf_counter()
runs = []
for _ in range(2):
    s = time.perf_counter()
    out = remote.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                          pad_token_id=0)
    runs.append({"tokens": out[0].tolist(), "seconds": time.perf_counter() - s})
print("TORBIZ-JSON " + json.dumps({
    "local": ref[0].tolist(), "runs": runs, "client_start_s": t1 - t0, "forward_s": t2 - t1,
    "max_logit_diff": (swarm_logits - ref_logits).abs().max().item(),
}), flush=True)
# Petals 2.2.0's inference sessions close in __del__ through hivemind's event loop thread; at
# interpreter finalization that thread no longer runs and the process never exits (the old
# "hang under load": answer printed, sessions closed on the servers, client still there).
# Collect them while the loop runs, stop the DHT, and leave without finalization.
import gc, os
del out
gc.collect()
manager = next(m.sequence_manager for m in remote.modules() if hasattr(m, "sequence_manager"))
manager.shutdown()
manager.dht.shutdown()
os._exit(0)
"""


def _json_answer(proc: subprocess.CompletedProcess[str], what: str) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JSON_MARK):
            return json.loads(line[len(JSON_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"{what}: no answer (exit {proc.returncode}):\n{tail}")


# ---- servers --------------------------------------------------------------------------------

def server_argv(python: str | Path, model: str | Path, *, dht_prefix: str, block_indices: str,
                host: str, port: int, identity_path: str | Path,
                initial_peers: Sequence[str] | None, throughput: float = 1.0,
                num_handlers: int = 2, dtype: str = "float32",
                cache_dir: str | Path | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """The command line of one CPU Petals server. `initial_peers=None` starts a new swarm."""
    maddr = f"/ip4/{host}/tcp/{port}"
    argv = [str(python), "-m", "petals.cli.run_server", str(model),
            "--dht_prefix", dht_prefix,
            "--block_indices", block_indices,          # no random 0-10 s wait, no auto-choice
            "--throughput", repr(float(throughput)),   # no speedtest
            "--device", "cpu", "--torch_dtype", dtype,  # CPU-safe: no float16, no quantization
            "--num_handlers", str(num_handlers),
            "--host_maddrs", maddr, "--announce_maddrs", maddr,
            "--identity_path", str(identity_path)]
    if cache_dir is not None:
        argv += ["--cache_dir", str(cache_dir)]
    if initial_peers is None:
        argv += ["--new_swarm"]
    else:
        if not initial_peers:
            raise ValueError("a joining server needs at least one initial peer")
        argv += ["--initial_peers", *initial_peers]
    return argv + list(extra)


@dataclass
class PetalsServer:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    peer_id: str
    maddr: str
    blocks: tuple[int, int]
    started_at: float
    stop_report: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def group(self) -> list[psutil.Process]:
        """Live (non-zombie) processes of this server's process group."""
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == self.pid:
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            match = rx.search(self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}) before "
                                   f"{pattern!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.name}: no {pattern!r} in {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def tree(self) -> list[psutil.Process]:
        """This server's process group plus every descendant of its main pid. The descendants
        matter: torch's `torch_shm_manager` puts itself in a session of its own, so a signal to
        the group never reaches it (it exits by itself once its clients are gone)."""
        procs = {p.pid: p for p in self.group()}
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                procs.setdefault(child.pid, child)
        except psutil.Error:
            pass
        return list(procs.values())

    def stop(self, grace: float = 15.0) -> dict:
        """SIGINT to the main pid, then wait for the group and every recorded descendant;
        after `grace`, SIGKILL to the group and to the recorded descendants that are left.
        Returns how it went: seconds, the main pid's exit status, what had to be killed."""
        started = time.monotonic()
        report: dict = {"sigint": False, "killed": [], "seconds": 0.0}
        known = self.tree() if self.proc.poll() is None else self.group()

        def alive() -> list[psutil.Process]:
            left = []
            for proc in known + self.group():
                try:
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        left.append(proc)
                except psutil.Error:
                    continue
            return list({p.pid: p for p in left}.values())

        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGINT)
                report["sigint"] = True
            except ProcessLookupError:
                pass
        deadline = started + grace
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not alive():
                break
            time.sleep(0.05)
        report["main_exit"] = self.proc.poll()
        left = alive()
        if left:
            report["killed"] = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left]
            with suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            for proc in left:
                with suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(left, timeout=5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        report["seconds"] = time.monotonic() - started
        report["processes"] = len(known)
        report["offline_announced"] = "are offline" in self.log()
        self.stop_report = report
        return report


class PetalsSwarm:
    """Servers of one private swarm inside one namespace. Use as a context manager: leaving it
    stops every server (SIGINT, then KILL of the group) and deletes the namespace."""

    def __init__(self, workdir: Path, python: Path | None = None, *, dht_prefix: str = "tbztiny",
                 host: str = "127.0.0.1", base_port: int = 31337) -> None:
        py = python or petals_python()
        if py is None:
            raise RuntimeError(skip_reason() or "no Petals environment")
        self.python = py
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dht_prefix = dht_prefix
        self.host = host
        self.base_port = base_port
        self.ns = Netns()
        self.servers: list[PetalsServer] = []
        self.model_dir: Path | None = None
        self.model_config: dict = {}
        self.leftovers: list[str] = []

    # lifecycle
    def __enter__(self) -> PetalsSwarm:
        self.ns.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> list[str]:
        for server in self.servers:
            if server.proc.poll() is None or server.group():
                server.stop()
        self.leftovers = self.ns.delete()
        return self.leftovers

    # helpers run inside the namespace with the venv's python
    def run_py(self, code: str, *args: str, timeout: float = 300,
               what: str = "petals script", env: dict[str, str] | None = None) -> dict:
        full_env = {**os.environ, **PETALS_ENV, **(env or {})}
        try:
            proc = subprocess.run(self.ns.argv([str(self.python), "-c", code, *args]),
                                  capture_output=True, text=True, timeout=timeout, env=full_env,
                                  cwd=self.workdir, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            tail = "\n".join(err.splitlines()[-20:])
            raise RuntimeError(f"{what}: no answer in {timeout:.0f} s:\n{tail}") from None
        return _json_answer(proc, what)

    def write_tiny_llama(self, *, num_layers: int = 4, hidden_size: int = 64,
                         intermediate_size: int = 128, num_heads: int = 4,
                         vocab_size: int = 1000, seed: int = 0) -> Path:
        """A tiny random LlamaForCausalLM saved with save_pretrained (safetensors)."""
        spec = {"vocab_size": vocab_size, "hidden_size": hidden_size,
                "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
                "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
                "max_position_embeddings": 512, "initializer_range": 0.1,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                "torch_dtype": "float32", "seed": seed}
        out = self.workdir / "tiny-llama"
        answer = self.run_py(_MAKE_MODEL, str(out), json.dumps(spec), what="writing the model")
        self.model_dir = out
        self.model_config = answer["config"]
        return out

    @property
    def num_blocks(self) -> int:
        return int(self.model_config["num_hidden_layers"])

    def identity(self, name: str) -> tuple[Path, str]:
        path = self.workdir / f"{name}.identity"
        answer = self.run_py(_IDENTITY, str(path), what="making an identity")
        return path, answer["peer_id"]

    def start_server(self, name: str, blocks: tuple[int, int], *,
                     initial_peers: Sequence[str] | None, num_handlers: int = 2,
                     throughput: float = 1.0, extra: Sequence[str] = ()) -> PetalsServer:
        """Start one server in its own session/process group inside the namespace. Its peer id
        (identity file made first) and port are fixed, so its multiaddr is known before it runs."""
        if self.model_dir is None:
            raise RuntimeError("write_tiny_llama() first")
        if initial_peers is not None and not initial_peers:
            raise ValueError("never start a server without explicit peers: use --new_swarm")
        port = self.base_port + len(self.servers)
        identity_path, peer_id = self.identity(name)
        cwd = self.workdir / name  # configargparse reads ./config.yml: give each server its own cwd
        cwd.mkdir(exist_ok=True)
        argv = server_argv(self.python, self.model_dir, dht_prefix=self.dht_prefix,
                           block_indices=f"{blocks[0]}:{blocks[1]}", host=self.host, port=port,
                           identity_path=identity_path, initial_peers=initial_peers,
                           throughput=throughput, num_handlers=num_handlers,
                           cache_dir=self.workdir / "petals-cache", extra=extra)
        log_path = cwd / "server.log"
        env = {**os.environ, **PETALS_ENV}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self.ns.argv(["env", "--default-signal=INT,QUIT", *argv]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env=env, start_new_session=True)
        server = PetalsServer(name=name, proc=proc, log_path=log_path, peer_id=peer_id,
                              maddr=f"/ip4/{self.host}/tcp/{port}/p2p/{peer_id}",
                              blocks=blocks, started_at=time.time())
        self.servers.append(server)
        return server

    def dht_list(self, peers: Sequence[str] | None = None, repeat: int = 3) -> dict:
        peers = list(peers or [s.maddr for s in self.servers])
        return self.run_py(_DHT_LIST, json.dumps(peers), self.dht_prefix,
                           str(self.num_blocks), str(repeat), timeout=120, what="DHT listing")

    def block_map(self, listing: dict) -> dict[int, dict[str, str]]:
        """{block index: {peer id: state}} from a dht_list() answer."""
        return {i: {peer: info["state"] for peer, info in block["servers"].items()}
                for i, block in enumerate(listing["blocks"])}

    def wait_online(self, timeout: float = 120) -> dict:
        """Watch the DHT (one client process, polling every 0.2 s) until every block is served
        ONLINE by the server planned for it. Returns the watcher's answer; `at` is time.time()."""
        want = [""] * self.num_blocks
        for server in self.servers:
            for i in range(*server.blocks):
                want[i] = server.peer_id
        answer = self.run_py(_WAIT_ONLINE, json.dumps([s.maddr for s in self.servers]),
                             self.dht_prefix, json.dumps(want), str(timeout),
                             timeout=timeout + 60, what="waiting for ONLINE")
        if not answer.get("online"):
            tails = "\n".join(f"--- {s.name} (exit {s.proc.poll()}):\n{s.log_tail(15)}"
                              for s in self.servers)
            raise TimeoutError(f"blocks not ONLINE within {timeout:.0f} s: {answer}\n{tails}")
        return answer

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 max_retries: int = 3) -> dict:
        """Greedy generation through the swarm vs local transformers. The client's timeouts are
        explicit: with Petals' defaults (connect 5 s, request 180 s, retries forever, backoff
        doubling to 60 s) one slow stream open on a loaded machine became a silent hang."""
        if self.model_dir is None:
            raise RuntimeError("write_tiny_llama() first")
        client = {"connect_timeout": 30.0, "request_timeout": 60.0, "max_retries": max_retries}
        return self.run_py(_GENERATE, str(self.model_dir),
                           json.dumps([s.maddr for s in self.servers]), self.dht_prefix,
                           json.dumps(list(prompt)), str(max_new_tokens), json.dumps(client),
                           timeout=300, what="generation through the swarm")
