"""The small JSON files torbiz keeps beside its pidfiles (placement, recovery, swarm): read
as a dict or nothing, written whole or not at all (a partial file then a rename).

They are private (0600 in 0700 directories) and never followed through a symbolic link: a link
planted in their place is neither read nor written through."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

MAX_STATE_BYTES = 1 << 22  # a state file is small; more is not ours


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's object, or None when it is missing, unreadable, a symbolic link, or not a
    JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(MAX_STATE_BYTES + 1)[:MAX_STATE_BYTES])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace the file atomically (readers see the old or the new one, never half)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()  # a leftover, or a planted link: O_EXCL below never follows one
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1))
    partial.replace(path)  # rename replaces a link at `path` itself, never its target
