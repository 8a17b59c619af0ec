"""A node that answers with hundreds of megabytes (a hostile node, a runaway tool, a dead
worker's log that is one huge line) costs this process a bounded amount of memory: reads stop
at the cap, long lines are cut. Memory is measured as the growth of the peak RSS
(ru_maxrss) of a fresh Python process around the one call: a bound, not a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.reach.transport import MAX_LINE, MAX_OUTPUT

GROWTH_LIMIT_KB = 100 * 1024
HUGE = 300_000_017  # an odd size, to find the command among the processes
LINE = 200_000_000

_MEASURE = r"""
import asyncio, contextlib, json, resource, sys
from core.config import NodeConfig, SshOptions
from core.reach import detached
from core.reach.transport import LocalTransport, SshTransport

spec = json.loads(sys.argv[1])
if spec["ssh"]:
    s = spec["ssh"]
    transport = SshTransport(NodeConfig(name="n", host=s["host"], ssh_port=s["port"],
        ssh=SshOptions(user="root", identity_file=s["key"], known_hosts=s["known_hosts"],
                       config_file=None)))
else:
    transport = LocalTransport(NodeConfig(name="n", host="127.0.0.1", transport="local"))

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

async def main():
    await transport.run("true")  # connected, everything imported
    stream = transport.stream_lines("echo warm")
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    await detached.log_tail(transport, "/nonexistent")
    before = peak()
    what = spec["what"]
    if what == "run":
        r = await transport.run(spec["script"], timeout=120)
        out = {"stdout": len(r.stdout), "stderr": len(r.stderr), "status": r.exit_status,
               "truncated": getattr(r, "truncated", None)}
    elif what == "tail":
        lines = await detached.log_tail(transport, spec["state"], 20, raw=spec.get("raw", False))
        out = {"lines": [len(line) for line in lines], "last": lines[-1][-20:]}
    else:
        lines = []
        stream = transport.stream_lines(detached.follow_script(spec["state"], 20))
        async with contextlib.aclosing(stream):
            async for line in stream:
                lines.append(line)
                if line == "last":
                    break
        out = {"lines": [len(line) for line in lines], "first": lines[0], "last": lines[-1]}
    out["growth_kb"] = peak() - before
    await transport.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(spec)],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["growth_kb"] < GROWTH_LIMIT_KB, result
    return result


def _ssh_spec(sshd_cluster: Any) -> dict[str, Any]:
    sshd = sshd_cluster(count=1)
    node = sshd.nodes[0]
    return {"host": node.host, "port": node.port, "key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts)}


def _left_running(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and \
                any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture(params=["local", "ssh"])
def reach(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    if request.param == "local":
        return None
    return _ssh_spec(request.getfixturevalue("sshd_cluster"))


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_300_mb_answer_stops_at_the_cap(reach: dict[str, Any] | None, stream: str) -> None:
    redirect = " >&2" if stream == "stderr" else ""
    result = _measure({"ssh": reach, "what": "run",
                       "script": f"head -c {HUGE} /dev/zero{redirect}; echo never-here"})
    assert result["truncated"] and result["status"] == -1
    assert result[stream] == MAX_OUTPUT
    deadline = time.monotonic() + 5  # the command is stopped, not left writing into nothing
    while _left_running(str(HUGE)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _left_running(str(HUGE))


def _huge_line_log(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with open(state / "log", "wb") as f:
        f.write(b"first\n")
        block = b"x" * (1 << 20)
        for _ in range(LINE // len(block)):
            f.write(block)
        f.write(block[:LINE % len(block)])
        f.write(b"\nlast\n")
    return state


def test_a_200_mb_line_in_a_log_tail_is_cut(reach: dict[str, Any] | None,
                                            tmp_path: Path) -> None:
    state = _huge_line_log(tmp_path)
    result = _measure({"ssh": reach, "what": "tail", "state": str(state)})
    assert result["lines"][-1] == 4 and result["last"] == "last"
    assert all(n <= MAX_LINE for n in result["lines"])
    no_newline = state / "log"
    with open(no_newline, "r+b") as f:  # a dead worker's last line, never ended
        f.truncate(len(b"first\n") + LINE)
    result = _measure({"ssh": reach, "what": "tail", "state": str(state)})
    assert result["lines"] == [MAX_LINE]


def test_a_200_mb_streamed_line_is_cut_and_the_stream_goes_on(reach: dict[str, Any] | None,
                                                              tmp_path: Path) -> None:
    state = _huge_line_log(tmp_path)
    result = _measure({"ssh": reach, "what": "stream", "state": str(state)})
    assert result["first"] == "first" and result["last"] == "last"
    assert len(result["lines"]) == 3 and result["lines"][1] <= MAX_LINE + 2  # " …"
