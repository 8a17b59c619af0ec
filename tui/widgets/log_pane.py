"""The log pane: the selected node's worker log, sanitized, as plain Text, capped in lines."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.widgets import RichLog

from ..text import sanitize

MAX_LINES = 5_000


class LogPane(RichLog):
    """Shows one source at a time; lines that arrive for any other source are dropped."""

    COMPONENT_CLASSES = {"log-pane--note"}

    def __init__(self) -> None:
        super().__init__(max_lines=MAX_LINES, markup=False, highlight=False, wrap=False,
                         auto_scroll=True)
        self.source: str | None = None

    def follow(self, source: str, title: str) -> None:
        """Start showing `source`: the old lines go."""
        self.source = source
        self.border_title = Text(sanitize(title))
        self.clear()

    def add_lines(self, source: str, lines: Iterable[str]) -> None:
        if source != self.source:
            return  # a stale batch from a stream that was just switched away from
        for line in lines:
            self.write(Text(sanitize(line)))

    def add_note(self, source: str, note: str) -> None:
        """A line of ours (not the node's), styled apart from the log."""
        if source == self.source:
            style = self.get_component_rich_style("log-pane--note", partial=True)
            self.write(Text(sanitize(note), style=style))
