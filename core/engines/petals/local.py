"""The Petals environment on this machine: its python (DHT monitor, generation client), the
side scripts it runs, and the error every Petals operation raises."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from core.config import ClusterConfig, NodeConfig
from core.engines.base import EngineError
from core.engines.petals import commands as backend

SIDE = Path(__file__).resolve().parent / "side"


class PetalsError(EngineError):
    """A swarm operation that cannot go on, phrased for the operator."""


def local_python(config: ClusterConfig) -> str:
    """This machine's Petals python (monitor, generation): [petals] python, then
    $TORBIZ_PETALS_VENV/bin/python, then the venv scripts/petals-env.sh builds."""
    if config.petals.python:
        return str(Path(config.petals.python).expanduser())
    venv = os.environ.get("TORBIZ_PETALS_VENV") or "~/.cache/torbiz/petals-venv"
    return str(Path(venv).expanduser() / "bin" / "python")


def check_python(python: str) -> None:
    if not Path(python).is_file():
        raise PetalsError(f"no Petals python on this machine at {python}: build it with "
                          "scripts/petals-env.sh (or set [petals] python)")


def open_log(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "ab")  # handed to the child, closed right after the spawn



def petals_nodes(config: ClusterConfig) -> list[NodeConfig]:
    return [n for n in config.nodes if n.backend == "petals"]



def side_env() -> dict[str, str]:
    return {**os.environ, **backend.SERVER_ENV}



def private_socket_dir() -> str:
    """A 0700 directory for hivemind's unix sockets of one side process (see side/sockets.py);
    remove it with remove_socket_dir when the process has ended."""
    return tempfile.mkdtemp(prefix="torbiz-p2p-")


def remove_socket_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
