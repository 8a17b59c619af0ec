"""`torbiz-tui provision NODE --petals`: build the working Petals environment on a node.

The recipe is scripts/petals-env.sh (the one place that knows the five fixes). This copies it to
the node with the patched hivemind wheel built here (pure Python plus a static x86-64 p2pd, so
the node skips the build step that needs the wheel's donor), then runs it there into the venv
the node's `python` key names, streaming its progress lines. The node needs the package index
(pip); nothing is mocked and nothing is installed outside that venv.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from core.config import NodeConfig
from core.engines.petals import commands as backend
from core.reach.shell import path_word, quote
from core.reach.transport import SshTransport, Transport, TransportError

SCRIPT = Path(__file__).resolve().parent / "petals-env.sh"
REMOTE_DIR = ".cache/torbiz/provision"  # relative to the remote user's home (SFTP's cwd)
EXIT_MARK = "TORBIZ-EXIT "


class ProvisionError(Exception):
    pass


def local_wheels() -> Path:
    venv = Path(os.environ.get("TORBIZ_PETALS_VENV") or "~/.cache/torbiz/petals-venv")
    default = venv.expanduser().parent / "petals-wheels"
    return Path(os.environ.get("TORBIZ_PETALS_WHEELS") or default).expanduser()


def node_venv(node: NodeConfig) -> str:
    """The venv directory of the node's python (`.../bin/python` -> `...`)."""
    python = backend.node_python(node)
    parts = python.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != "bin":
        raise ProvisionError(f"{node.name}: python {python!r} is not <venv>/bin/python: set the "
                             "node's python key to the venv's python")
    return "/".join(parts[:-2])


def _files() -> list[Path]:
    if not SCRIPT.is_file():
        raise ProvisionError(f"{SCRIPT} is missing from this install: reinstall torbiz-tui")
    wheels = sorted(local_wheels().glob("hivemind-*.whl"))
    if not wheels:
        raise ProvisionError(f"no hivemind wheel in {local_wheels()}: run scripts/petals-env.sh "
                             "here first (it builds the wheel the nodes reuse)")
    # The recipe reuses a wheel only beside its `.torbiz-ok` mark (written after its checks).
    ok = wheels[-1].with_name(wheels[-1].name + ".torbiz-ok")
    return [SCRIPT, wheels[-1], *([ok] if ok.is_file() else [])]


async def _copy(transport: Transport, files: list[Path]) -> None:
    if transport.is_local:
        target = Path.home() / REMOTE_DIR
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        for file in files:
            await asyncio.to_thread(shutil.copy2, file, target / file.name)
        return
    if not isinstance(transport, SshTransport):
        raise ProvisionError("provisioning needs an SSH or local node")
    await transport.connect()
    try:
        async with transport.connection.start_sftp_client() as sftp:
            await sftp.makedirs(REMOTE_DIR, exist_ok=True)
            await sftp.put([str(f) for f in files], REMOTE_DIR)
    except (OSError, Exception) as exc:  # asyncssh.SFTPError and connection errors
        raise TransportError(transport.label, f"copying the Petals files failed ({exc})") \
            from None


async def provision_petals(transport: Transport, node: NodeConfig,
                           progress: Callable[[str], None]) -> str:
    """Copy the recipe and the hivemind wheel, run the recipe on the node; returns the venv.
    Raises ProvisionError with the recipe's last lines when it fails."""
    venv = node_venv(node)
    files = await asyncio.to_thread(_files)
    progress(f"{node.name}: copying {', '.join(f.name for f in files)} to ~/{REMOTE_DIR}")
    await _copy(transport, files)
    remote = f'"$HOME"/{quote(REMOTE_DIR)}'
    script = (f"TORBIZ_PETALS_WHEELS={remote} bash {remote}/{quote(SCRIPT.name)} "
              f"{path_word(venv)} < /dev/null 2>&1; echo {EXIT_MARK}$?")
    tail: list[str] = []
    status = None
    async for line in transport.stream_lines(script):
        if line.startswith(EXIT_MARK):
            status = line[len(EXIT_MARK):].strip()
            break
        tail = (tail + [line])[-15:]
        progress(f"{node.name}: {line}")
    if status != "0":
        raise ProvisionError(f"{node.name}: the Petals recipe failed (exit {status}):\n"
                             + "\n".join(tail))
    return venv
