"""hivemind puts its daemon's unix sockets in /tmp (`/tmp/hivemind-p2pd-*.sock`, a class
constant), and leaves them there when a process is killed or a DHT fails to join. The side
scripts move them into a private directory that the dashboard made and deletes when the
script ends, so nothing of ours accumulates in the shared /tmp."""

from __future__ import annotations

import os


def use_private_sockets(directory: str | None) -> None:
    """Before any DHT is made (its process forks from this one and inherits the prefix)."""
    if not directory:
        return
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise SystemExit(f"socket directory {directory} is not a directory")
    from hivemind.p2p.p2p_daemon import P2P

    P2P._UNIX_SOCKET_PREFIX = f"/unix{os.path.abspath(directory)}/hivemind-"
