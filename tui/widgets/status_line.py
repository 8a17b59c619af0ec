"""The status line: how many nodes are ready, starting, failed ...; the filter; staleness."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.timer import Timer
from textual.widgets import Static

from core.status import FAILED, NOT_RESPONDING, READY, STARTING, STOPPED, UNREACHABLE
from core.status_text import SLOW
from tui.model import PROBING, STOPPING
from tui.redraw import TABLE_INTERVAL, until_next_slot
from tui.text import css_name, sanitize

# In the order they are shown; a state with no node is still shown when it matters most.
ORDER = (READY, SLOW, STARTING, STOPPING, FAILED, NOT_RESPONDING, UNREACHABLE, STOPPED,
         PROBING)
ALWAYS = (READY, STARTING, FAILED)


class StatusLine(Static):
    COMPONENT_CLASSES = {f"status-line--{css_name(name)}" for name in (*ORDER, "label", "stale")}

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}
        self._shown = 0
        self._total = 0
        self._filter = ""
        self._stale = False
        self._draw_timer: Timer | None = None
        self._drawn: Text | None = None

    def on_mount(self) -> None:
        self._draw()

    def show_counts(self, counts: dict[str, int], shown: int, total: int) -> None:
        self._counts, self._shown, self._total = counts, shown, total
        if self._draw_timer is None:  # they change with most node updates: redraw on the clock
            self._draw_timer = self.set_timer(until_next_slot(TABLE_INTERVAL), self._draw)

    def show_filter(self, text: str) -> None:
        self._filter = text
        self._draw()

    def show_stale(self, stale: bool) -> None:
        if stale != self._stale:
            self._stale = stale
            self._draw()

    def _style(self, name: str) -> Style:
        return self.get_component_rich_style(f"status-line--{css_name(name)}", partial=True,
                                             default=Style())

    def _draw(self) -> None:
        if self._draw_timer is not None:
            self._draw_timer.stop()
            self._draw_timer = None
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{self._total} node{'s' if self._total != 1 else ''}", style="bold")
        for state in ORDER:
            count = self._counts.get(state, 0)
            if count or state in ALWAYS:
                text.append("  ·  ", style=self._style("label"))
                text.append(f"{count} {state}", style=self._style(state) if count else "")
        if self._filter:
            text.append("  ·  ", style=self._style("label"))
            text.append(f"filter “{sanitize(self._filter)}”: {self._shown} of {self._total} "
                        "shown", style=self._style("label"))
        if self._stale:
            text.append("  ·  ", style=self._style("label"))
            text.append("stale: the last refresh failed", style=self._style("stale"))
        if text != self._drawn:
            self._drawn = text
            self.update(text, layout=False)  # one line, always: no layout pass
