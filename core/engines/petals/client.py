"""Generation through the swarm with Petals' own client, a subprocess of this machine's Petals
python (side/generate.py) answering one JSON line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from core.config import ClusterConfig
from core.engines.petals import commands as backend
from core.engines.petals.local import (
    SIDE,
    PetalsError,
    check_python,
    local_python,
    open_log,
    private_socket_dir,
    remove_socket_dir,
    side_env,
)
from core.engines.petals.swarm_file import read_swarm, swarm_dir, swarm_peers
from core.local_log import tail_lines


async def generate(config: ClusterConfig, prompt: str, new_tokens: int,
                   timeout: float = 300.0) -> dict[str, Any]:
    """Greedy generation through the swarm with Petals' client (a subprocess of this machine's
    Petals python); the answer's text, tokens, seconds and tokens_per_s."""
    swarm = read_swarm(config)
    peers = swarm_peers(config, swarm)
    if not peers:
        raise PetalsError("no swarm to generate with: start it with `torbiz-tui up` first")
    python = local_python(config)
    check_python(python)
    log = swarm_dir(config) / "generate.log"  # its stderr: Petals' client logs, the route
    stderr = open_log(log)
    sock_dir = private_socket_dir()
    try:
        proc = await asyncio.create_subprocess_exec(
            python, str(SIDE / "generate.py"), str(swarm.get("model", config.model.hf)),
            "--peers", json.dumps(peers), "--prefix", str(swarm.get("prefix")),
            "--prompt-stdin", "-n", str(new_tokens), "--dtype", config.petals.torch_dtype,
            "--sock-dir", sock_dir,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env=side_env(), start_new_session=True)
    finally:
        stderr.close()
    # The prompt goes through a pipe, never the command line (other users can read that).
    # The client reads all of stdin before it prints anything: no deadlock.
    assert proc.stdin is not None
    proc.stdin.write(prompt.encode("utf-8"))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await proc.stdin.drain()
    proc.stdin.close()
    try:
        answer = await asyncio.wait_for(_read_answer(proc, log), timeout)
    except asyncio.TimeoutError:
        answer = None
    finally:
        # The client exits by itself once it answered; a client stuck at exit or in a request
        # must not outlive the command (its DHT process and p2pd are in its process group).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        remove_socket_dir(sock_dir)
    if answer is None:
        raise PetalsError(f"no generation within {timeout:g} s (is every block served? "
                          "`torbiz-tui status --json` shows the block map)")
    if isinstance(answer, dict) and "error" not in answer:
        return answer
    raise PetalsError(str(answer.get("error") if isinstance(answer, dict) else answer))


async def _read_answer(proc: asyncio.subprocess.Process, log: Path) -> Any:
    """The first JSON line on the client's stdout; raises PetalsError with its log's last
    line when it ends without one."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            break
        text = line.decode(errors="replace")
        if text.startswith(backend.JSON_MARK):
            return json.loads(text[len(backend.JSON_MARK):])
    await proc.wait()
    tail = (await asyncio.to_thread(tail_lines, log) or ["no output"])[-1][:300]
    raise PetalsError(f"the Petals client failed (exit {proc.returncode}): {tail} "
                      f"(log: {log})")
