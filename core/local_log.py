"""Reading the end of a log file on this machine, bounded: the coordinator's load log, the Petals
client's log. (Logs on nodes are read by core/reach/detached.py, on the node.)"""

from __future__ import annotations

from pathlib import Path

START_MARK = b"torbiz-start"  # written by detached.spawn before each start


def tail_bytes(path: Path, max_bytes: int) -> bytes:
    """The last `max_bytes` of the file; b"" when it cannot be read."""
    try:
        with open(path, "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - max_bytes))
            return log.read()
    except OSError:
        return b""


def since_last_start(path: Path, max_bytes: int) -> bytes:
    """What the process wrote since its last start, within the last `max_bytes`."""
    data = tail_bytes(path, max_bytes)
    return data[max(0, data.rfind(START_MARK)):]


def tail_lines(path: Path, max_bytes: int = 8192) -> list[str]:
    """The non-blank lines of the file's last `max_bytes`."""
    text = tail_bytes(path, max_bytes).decode(errors="replace")
    return [line for line in text.splitlines() if line.strip()]
