"""Repeated log lines collapse: a line identical to the previous one is not shown again; the
run is one line with its count, `<line> (x20)`. One rule for every log pane and `logs -f`."""

from __future__ import annotations


def counted(line: str, count: int) -> str:
    return line if count <= 1 else f"{line} (x{count})"


class Repeats:
    """Feed lines in order. `feed` says how many times in a row this line has come (1: a new
    line, to show; more: a repeat, whose shown line becomes `counted(line, count)`). A stream
    that cannot rewrite what it printed asks `ended()` before printing a new line: the summary
    of the run that just ended, if it repeated."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.count = 0
        self._summary: str | None = None

    def feed(self, line: str) -> int:
        if line == self.last:
            self.count += 1
            return self.count
        self._summary = counted(self.last, self.count) if self.last is not None \
            and self.count > 1 else None
        self.last, self.count = line, 1
        return 1

    def ended(self) -> str | None:
        """The run before the line just fed, as one line with its count (None: no repeats)."""
        summary, self._summary = self._summary, None
        return summary

    def pending(self) -> str | None:
        """The run still going, if it repeated (for a stream that ends)."""
        return counted(self.last, self.count) if self.last is not None and self.count > 1 \
            else None

    def reset(self) -> None:
        self.last, self.count, self._summary = None, 0, None
