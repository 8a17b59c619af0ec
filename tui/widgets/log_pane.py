"""The log pane: the selected node's worker log, sanitized, as plain text, capped in lines."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text

from tui.text import sanitize
from tui.widgets.log_view import MAX_LINES, LogView

__all__ = ["MAX_LINES", "LogPane"]


class LogPane(LogView):
    """Shows one source at a time; lines that arrive for any other source are dropped."""

    def __init__(self, max_lines: int = MAX_LINES) -> None:
        super().__init__(max_lines)
        self.source: str | None = None

    def follow(self, source: str, title: str) -> None:
        """Start showing `source`: the old lines go."""
        self.source = source
        self.border_title = Text(sanitize(title))
        self.clear()
        self.following = True

    def add_lines(self, source: str, lines: Iterable[str]) -> None:
        if source != self.source:
            return  # a stale batch from a stream that was just switched away from
        self.append(sanitize(line) for line in lines)

    def add_note(self, source: str, note: str) -> None:
        """A line of ours (not the node's), styled apart from the log."""
        if source == self.source:
            self.append([sanitize(note)], note=True)
