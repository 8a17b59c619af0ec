"""One clock for throttled redraws: widgets that redraw at most every N seconds wait for the
next multiple of N on the monotonic clock, so their redraws land together in one frame instead
of each starting its own."""

from __future__ import annotations

import time

TABLE_INTERVAL = 0.05  # node rows and the status line: 20 redraws a second at most
LOG_INTERVAL = 0.1  # log panes: 10 a second at most (a multiple of the above: same frames)
FLOOD_INTERVAL = 0.25  # log panes receiving a flood: 4 a second
FLOOD_LINES = 1_000  # lines a second above which a log pane is flooded


def until_next_slot(interval: float) -> float:
    """Seconds from now to the next multiple of `interval` (never 0: at least a tenth of it)."""
    now = time.monotonic()
    wait = interval - (now % interval)
    return wait if wait > interval / 10 else wait + interval
