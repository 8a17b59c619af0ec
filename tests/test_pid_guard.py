"""`stop` signals only the process torbiz started: a pidfile that cannot be verified (no start
time, a reused pid, pid 1, a symlink) is refused with a sentence and nothing is killed; a state
directory another user could change is refused; state is private. Real shells and processes,
including a node whose tools are all BusyBox's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from core.config import NodeConfig
from core.reach import detached
from core.reach.shell import quote
from core.reach.transport import CommandResult, LocalTransport
from core.state_file import read_json, write_json

NODE = NodeConfig(name="n", host="127.0.0.1", transport="local")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _local() -> LocalTransport:
    return LocalTransport(NODE)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process this test owns, in a group of its own: what a planted pidfile points at."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _state(tmp_path: Path, name: str = "state") -> Path:
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return path


def _start_ticks(pid: int) -> str:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()
    return fields[19]


def _alive(proc: subprocess.Popen[bytes] | int) -> bool:
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- records that cannot be verified -----------------------------------------------------

@pytest.mark.parametrize("start_file", [None, "", "Thu Jan  1 00:00:00 1970"])
async def test_a_planted_pid_without_a_start_time_is_never_signalled(
        tmp_path: Path, victim: subprocess.Popen[bytes], start_file: str | None) -> None:
    """What every BusyBox node used to record (`ps -o lstart` fails there: empty pid.start),
    and what another user could plant: a bare pid. `down` used to kill whatever had it."""
    state = _state(tmp_path)
    (state / "pid").write_text(f"{victim.pid}\n")
    if start_file is not None:
        (state / "pid.start").write_text(start_file)
    transport = _local()
    stopped = await detached.stop(transport, str(state), grace=0.5)
    assert _alive(victim)
    if start_file:  # a legacy record whose start time does not match: another process
        assert stopped.state == "unverified" and "now belongs to another process" in \
            stopped.error, stopped
        return
    assert stopped.state == "unverified" and stopped.pid == victim.pid, stopped
    assert "nothing was signalled" in stopped.error and "records no start time" in stopped.error
    assert f"ps -p {victim.pid}" in stopped.error and str(state / "pid") in stopped.error
    status = await detached.status(transport, str(state))
    assert status.state == "unverified" and status.pid == victim.pid
    again = await detached.spawn(transport, str(state), ["sleep", "30"])
    assert again.state == "unverified"  # nor started twice beside something unknown
    assert (state / "pid").read_text() == f"{victim.pid}\n"
    assert _alive(victim)


async def test_a_reused_pid_is_not_signalled(tmp_path: Path,
                                             victim: subprocess.Popen[bytes]) -> None:
    """Our process ended and the kernel gave its pid to another one: same boot, another start
    time. Status says ours is dead; stop refuses with a sentence and kills nothing."""
    state = _state(tmp_path)
    ticks = int(_start_ticks(victim.pid))
    (state / "pid").write_text(f"{victim.pid} proc {ticks - 1} {BOOT_ID}\n")
    transport = _local()
    assert (await detached.status(transport, str(state))).state == "dead"
    stopped = await detached.stop(transport, str(state), grace=0.5)
    assert stopped.state == "unverified" and "now belongs to another process" in stopped.error
    assert _alive(victim)


async def test_a_record_from_before_a_reboot_is_gone(tmp_path: Path,
                                                     victim: subprocess.Popen[bytes]) -> None:
    state = _state(tmp_path)
    other_boot = "00000000-0000-4000-8000-000000000000"
    (state / "pid").write_text(f"{victim.pid} proc {_start_ticks(victim.pid)} {other_boot}\n")
    transport = _local()
    assert (await detached.status(transport, str(state))).state == "dead"
    stopped = await detached.stop(transport, str(state), grace=0.5)
    assert stopped.state == "none" and not stopped.error
    assert not (state / "pid").exists()  # a stale record is cleared ...
    assert _alive(victim)  # ... and nothing signalled


@pytest.mark.parametrize("record", ["garbage", "-1", "0", "00042", "99999999999", "1 2 3"])
async def test_garbage_records_signal_nothing(tmp_path: Path, record: str) -> None:
    state = _state(tmp_path)
    (state / "pid").write_text(record + "\n")
    stopped = await detached.stop(_local(), str(state), grace=0.5)
    assert stopped.state == "unverified" and "nothing was signalled" in stopped.error, stopped


class _PidNamespace(LocalTransport):
    """Runs each script in a new pid namespace (its own /proc) beside a victim process: there
    `kill -TERM -1` reaches only the victim, and the answer says whether it survived. With
    `plant`, the pidfile is first made to name pid 1 with its true start time and boot id."""

    def __init__(self, plant_dir: Path | None) -> None:
        super().__init__(NODE)
        self.plant_dir = plant_dir
        self.last = CommandResult(0, "", "")

    async def run(self, script: str, *, timeout: float = 30.0) -> CommandResult:
        plant = ""
        if self.plant_dir is not None:
            plant = ('s=$(cat /proc/1/stat); s=${s##*") "}; set -- $s; shift 19; '
                     f'echo "1 proc $1 $(cat /proc/sys/kernel/random/boot_id)" > '
                     f'{quote(str(self.plant_dir / "pid"))}; ')
        inside = (f"sleep 60 & v=$!; {plant}( {script}\n); "
                  "kill -0 $v 2>/dev/null && echo VICTIM-ALIVE; kill $v 2>/dev/null; exit 0")
        self.last = await super().run(
            f"exec unshare --pid --fork --mount-proc sh -c {quote(inside)}", timeout=timeout)
        return self.last


@pytest.mark.parametrize("well_formed", [False, True])
async def test_pid_1_is_never_signalled(tmp_path: Path, well_formed: bool) -> None:
    """A planted pid 1 would mean `kill -TERM -1`: every process of this login. Tried in a
    pid namespace of its own, where that can only reach a victim the test started."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a pid namespace needs root and unshare (util-linux)")
    state = _state(tmp_path)
    (state / "pid").write_text("1\n")
    transport = _PidNamespace(state if well_formed else None)
    probe = await LocalTransport(NODE).run("unshare --pid --fork --mount-proc true")
    if not probe.ok:
        pytest.skip(f"no pid namespaces here: {probe.stderr.strip()}")
    stopped = await detached.stop(transport, str(state), grace=0.5)
    assert "VICTIM-ALIVE" in transport.last.stdout, transport.last
    assert stopped.state == "unverified" and stopped.pid == 1, stopped
    assert "nothing was signalled" in stopped.error


# ---- the state directory and its files ---------------------------------------------------

def _nobody() -> int:
    return 65534


@pytest.mark.parametrize("problem", ["other owner", "world-writable", "group-writable",
                                     "sticky but world-writable", "symlink", "parent writable"])
async def test_a_state_dir_others_can_change_is_refused(tmp_path: Path, problem: str) -> None:
    if os.geteuid() != 0 and problem == "other owner":
        pytest.skip("giving a directory away needs root")
    parent = tmp_path / "p"
    parent.mkdir(mode=0o700)
    state = parent / "state"
    state.mkdir(mode=0o700)
    if problem == "other owner":
        os.chown(state, _nobody(), _nobody())
    elif problem == "world-writable":
        state.chmod(0o777)
    elif problem == "group-writable":
        state.chmod(0o770)
    elif problem == "sticky but world-writable":
        state.chmod(0o1777)
    elif problem == "symlink":
        real = parent / "real"
        real.mkdir(mode=0o700)
        state.rmdir()
        state.symlink_to(real)
    else:
        parent.chmod(0o777)
    transport = _local()
    started = await detached.spawn(transport, str(state), ["sleep", "30"])
    assert started.state == "unverified" and started.pid is None, started
    assert "refusing to use the state directory" in started.error
    assert not (state / "pid").exists() and not (state / "log").exists()
    assert (await detached.status(transport, str(state))).state == "unverified"
    assert (await detached.stop(transport, str(state))).state == "unverified"


async def test_a_sticky_world_writable_parent_like_tmp_is_fine(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o1777)
    state = str(parent / "a" / "state")
    transport = _local()
    started = await detached.spawn(transport, state, ["sleep", "30"])
    try:
        assert started.state == "running", started
    finally:
        await detached.stop(transport, state)


async def test_state_files_are_private_and_links_are_never_followed(tmp_path: Path) -> None:
    transport = _local()
    state = tmp_path / "deep" / "er" / "state"
    started = await detached.spawn(transport, str(state), ["sleep", "30"])
    try:
        assert started.state == "running" and started.pid
        for path in (tmp_path / "deep", tmp_path / "deep" / "er", state):
            assert path.stat().st_mode & 0o777 == 0o700, path
        for name in ("pid", "log"):
            assert (state / name).stat().st_mode & 0o777 == 0o600, name
        umask = next(line for line in Path(f"/proc/{started.pid}/status").read_text()
                     .splitlines() if line.startswith("Umask:"))
        assert umask.split()[1] == "0077"  # what the worker itself writes is private too
    finally:
        assert (await detached.stop(transport, str(state))).state == "none"

    secret = tmp_path / "elsewhere"
    secret.write_text("not a log\n")
    (state / "log").unlink()
    (state / "log").symlink_to(secret)
    refused = await detached.spawn(transport, str(state), ["sleep", "30"])
    assert refused.state == "none" and "symbolic link" in refused.error, refused
    assert secret.read_text() == "not a log\n"
    assert await detached.log_tail(transport, str(state)) == \
        ["torbiz: the log is a symbolic link; not read"]

    (state / "pid").symlink_to(secret)
    assert (await detached.stop(transport, str(state))).state == "unverified"
    assert (await detached.status(transport, str(state))).state == "unverified"
    assert secret.read_text() == "not a log\n"


async def test_an_existing_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "old"
    state.mkdir(mode=0o755)  # as an older torbiz made it
    state.chmod(0o755)
    transport = _local()
    assert (await detached.status(transport, str(state))).state == "none"
    assert state.stat().st_mode & 0o777 == 0o700


def test_state_json_files_are_private_and_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"secret": 1}))
    link = tmp_path / "state" / "swarm.json"
    link.parent.mkdir()
    link.symlink_to(target)
    assert read_json(link) is None  # a planted link is not read through ...
    (tmp_path / "state" / "swarm.json.tmp").symlink_to(target)
    write_json(link, {"mine": 2})  # ... nor written through (neither it nor the partial)
    assert json.loads(target.read_text()) == {"secret": 1}
    assert not link.is_symlink() and read_json(link) == {"mine": 2}
    assert link.stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "new" / "dir" / "x.json"
    write_json(fresh, {})
    assert fresh.parent.stat().st_mode & 0o777 == 0o700


# ---- BusyBox --------------------------------------------------------------------------------

@pytest.fixture
def busybox_transport(tmp_path: Path) -> LocalTransport:
    """A local node whose every tool is a BusyBox applet (sh, ps, setsid, awk, ...)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox missing: apt-get install busybox")
    applets = tmp_path / "busybox-bin"
    applets.mkdir()
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in listed.stdout.split():
        (applets / name).symlink_to(busybox)
    return LocalTransport(NODE, env={"PATH": str(applets)})


async def test_busybox_node_starts_checks_and_stops_a_real_process(
        tmp_path: Path, busybox_transport: LocalTransport) -> None:
    transport = busybox_transport
    tools = await transport.run("readlink -f \"$(command -v ps)\"; ps -o lstart= -p $$")
    assert tools.stdout.split()[0].endswith("busybox") and not tools.ok  # no -p, no lstart
    state = str(tmp_path / "bb" / "state")
    started = await detached.spawn(transport, state, ["sleep", "60"])
    assert started.state == "running" and started.pid, started
    pid = started.pid
    try:
        assert (Path(state) / "pid").read_text().split() == \
            [str(pid), "proc", _start_ticks(pid), BOOT_ID]
        status = await detached.status(transport, state)
        assert status.state == "running" and status.pid == pid
        assert status.elapsed_s is not None and 0 <= status.elapsed_s < 60
        again = await detached.spawn(transport, state, ["sleep", "60"])
        assert again.state == "running" and again.pid == pid  # found, not started twice

        # The pid now "belongs to another process": BusyBox used to fail open here.
        record = (Path(state) / "pid").read_text().split()
        (Path(state) / "pid").write_text(f"{pid} proc {int(record[2]) + 7} {record[3]}\n")
        refused = await detached.stop(transport, state, grace=0.5)
        assert refused.state == "unverified" and _alive(pid)
        (Path(state) / "pid").write_text(" ".join(record) + "\n")

        stopped = await detached.stop(transport, state, grace=2.0)
        assert stopped.state == "none" and stopped.pid == pid and not stopped.error
        assert not _alive(pid)
        assert (await detached.status(transport, state)).state == "none"
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)


async def test_busybox_node_stops_a_tree_that_left_its_group(
        tmp_path: Path, busybox_transport: LocalTransport) -> None:
    transport = busybox_transport
    state = str(tmp_path / "bbtree")
    started = await detached.spawn(
        transport, state, ["sh", "-c", "setsid sleep 61 & trap '' INT; sleep 60; wait"])
    assert started.state == "running" and started.pid
    pid = started.pid
    deadline = time.monotonic() + 10
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and len(children) < 2:
        children = psutil.Process(pid).children(recursive=True)
        time.sleep(0.05)
    assert len(children) == 2
    try:
        stopped = await detached.stop(transport, state, signal="INT", grace=1.0, tree=True)
        assert stopped.state == "none" and not stopped.error, stopped
        assert not any(_alive(p.pid) for p in [psutil.Process(pid), *children]
                       if p.is_running())
    finally:
        for proc in children:
            if proc.is_running():
                proc.kill()


async def test_a_legacy_record_with_an_lstart_still_stops(tmp_path: Path) -> None:
    """Workers started by an older torbiz (pid, and `ps -o lstart` in pid.start) on a node with
    GNU ps are still found and stopped."""
    if subprocess.run(["ps", "-o", "lstart=", "-p", str(os.getpid())],
                      capture_output=True).returncode != 0:
        pytest.skip("this ps has no -o lstart")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        state = _state(tmp_path)
        (state / "pid").write_text(f"{proc.pid}\n")
        lstart = subprocess.run(["ps", "-o", "lstart=", "-p", str(proc.pid)],
                                capture_output=True, text=True, check=True).stdout
        (state / "pid.start").write_text(lstart)
        transport = _local()
        assert (await detached.status(transport, str(state))).state == "running"
        stopped = await detached.stop(transport, str(state), grace=2.0)
        assert stopped.state == "none" and stopped.pid == proc.pid, stopped
        proc.wait(timeout=5)
        assert not (state / "pid.start").exists()
    finally:
        proc.kill()
        proc.wait()
