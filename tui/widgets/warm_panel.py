"""The pre-warm's progress on the dashboard (`w`): a title, then one line per node while the
caches fill (what the CLI's `cache warm` prints), then each node's outcome; hidden otherwise."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.text import sanitize


class WarmPanel(Static):
    """Hidden unless a pre-warm runs or has just finished."""

    def show_lines(self, title: str, lines: list[str]) -> None:
        text = Text(sanitize(title), style="bold")
        for line in lines:
            text.append("\n" + sanitize(line))
        self.update(text)
        self.add_class("-shown")

    def hide(self) -> None:
        self.remove_class("-shown")
