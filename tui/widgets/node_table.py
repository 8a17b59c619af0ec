"""The node table: one row per node, diffed by row key, never rebuilt.

A line-API widget rather than Textual's DataTable: DataTable keys every render cache on one
table-wide counter, so a single `update_cell` re-renders every visible cell (measured in
bench/dashboard.py: 64 updates a second cost half a core). Here a changed cell re-renders its
own row only; every other row is a cached strip.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from core.status import FAILED, NOT_RESPONDING, READY, STARTING, STATES, STOPPED, UNREACHABLE
from core.status_text import SLOW
from tui.model import PROBING, STOPPING, NodeRow, node_cells
from tui.redraw import TABLE_INTERVAL, until_next_slot
from tui.text import css_name

# A glyph before each state, so state reads without colour too; busy states spin.
GLYPHS: dict[str, str] = {READY: "●", STOPPED: "○", FAILED: "✖", UNREACHABLE: "⚠",
                          NOT_RESPONDING: "◌", SLOW: "◔"}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SPINNING = frozenset({STARTING, STOPPING, PROBING})
SPIN_INTERVAL = 1 / 8

# (column key, label, fixed width or None: as wide as the widest value, at most AUTO_MAX)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("name", "NODE", None),
    ("host", "HOST", None),
    ("backend", "BACKEND", None),
    ("device", "DEVICE", None),
    ("free", "FREE", 9),
    ("layers", "LAYERS", None),
    ("state", "STATE", 16),
    ("latency", "RTT", 6),
    ("share", "TOKEN TIME", 12),
    ("uptime", "UP", 6),
    ("endpoint", "ENDPOINT", None),
    ("error", "ERROR", 48),
)
UPTIME_INTERVAL = 15.0  # seconds between uptime redraws (they show whole minutes)
AUTO_MAX = 32
FLEXIBLE, FLEXIBLE_MIN = "error", 12
PADDING = 1  # cells each side of a value
FILTERED = ("name", "host", "backend", "device", "state", "endpoint", "error")


class NodeTable(ScrollView, can_focus=True):
    """Rows keyed by node name, in their first order; `show_row` redraws only the row that
    changed. A filter hides the rows that do not match; what every node shows is kept for all
    nodes, filtered or not."""

    COMPONENT_CLASSES = {
        "node-table--header", "node-table--cursor",
        *(f"node-table--{css_name(state)}" for state in (*STATES, SLOW, PROBING, STOPPING)),
    }
    BINDINGS = [Binding("enter", "open", "Logs", show=False)]

    cursor_row: reactive[int] = reactive(0, init=False)

    @dataclass
    class NodeSelected(Message):
        """The cursor moved to another node."""

        name: str

    @dataclass
    class NodeOpened(Message):
        """Enter (or a click on the selected row): show its log full screen."""

        name: str

    @dataclass
    class CountsChanged(Message):
        """How many nodes are in each state changed (or how many the filter shows)."""

        counts: dict[str, int]
        shown: int
        total: int

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict[str, dict[str, str]] = {}  # every node, in first-seen order
        self._rows: list[str] = []  # the visible nodes, in that order
        self._index: dict[str, int] = {}  # visible node -> row number
        self._strips: dict[str, Strip] = {}  # rendered rows, without the cursor
        self._widths = {key: width or len(label) for key, label, width in COLUMNS}
        self._header: Strip | None = None
        self._selected: str | None = None
        self._filter = ""
        self._counts: Counter[str] = Counter()
        self._spinning: set[str] = set()
        self._frame = 0
        self._spin_timer: Timer | None = None
        self._dirty: set[str] = set()
        self._base: Style | None = None
        self._cursor_style: Style | None = None
        self._dirty_timer: Timer | None = None
        self._data: dict[str, NodeRow] = {}  # what each row draws, for the uptime ticks

    def on_mount(self) -> None:
        self.border_title = "nodes"
        if self.app.animation_level != "none":  # snapshots and tests see a still frame
            self._spin_timer = self.set_interval(SPIN_INTERVAL, self._spin, pause=True)
            self.set_interval(UPTIME_INTERVAL, self._tick_uptimes)
        self._update_size()

    # ---- what the table shows ---------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[str]:
        """The nodes shown, top to bottom."""
        return list(self._rows)

    @property
    def selected(self) -> str | None:
        """The node under the cursor now (not when its message is handled: a key pressed right
        after `j` acts on the row the cursor moved to)."""
        if not self._rows:
            return None
        return self._rows[min(max(self.cursor_row, 0), len(self._rows) - 1)]

    @property
    def filter_text(self) -> str:
        return self._filter

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def state_of(self, name: str) -> str | None:
        """The state text the table shows for `name` (what the operator sees)."""
        row = self._shown.get(name)
        return row["state"] if row else None

    def get_cell(self, name: str, key: str) -> Text:
        """The cell as drawn (glyph and all), for tests and tools."""
        return self._cell(key, self._shown[name][key])

    def _tick_uptimes(self) -> None:
        for row in self._data.values():
            if row.status.started_at is not None:
                self.show_row(row)

    def _cell(self, key: str, value: str) -> Text:
        if key != "state":
            return Text(value, no_wrap=True, end="")
        glyph = SPINNER[self._frame % len(SPINNER)] if value in SPINNING \
            else GLYPHS.get(value, " ")
        return Text(f"{glyph} {value}", no_wrap=True, end="",
                    style=self.get_component_rich_style(f"node-table--{css_name(value)}",
                                                        partial=True,
                                                        default=Style()))

    def _matches(self, cells: dict[str, str]) -> bool:
        needle = self._filter.casefold()
        return not needle or any(needle in cells[key].casefold() for key in FILTERED)

    def show_row(self, row: NodeRow) -> None:
        name = row.name
        self._data[name] = row
        cells = node_cells(row)
        shown = self._shown.get(name)
        if shown == cells:
            return
        if shown is None or shown["state"] != cells["state"]:
            if shown is not None:
                self._counts[shown["state"]] -= 1
            self._counts[cells["state"]] += 1
            counts_changed = True
        else:
            counts_changed = False
        self._shown[name] = cells
        self._strips.pop(name, None)
        self._set_spinning(name, cells["state"] in SPINNING)
        was_visible = name in self._index
        visible = self._matches(cells)
        widened = self._widen(cells)
        if visible != was_visible:
            self._layout_rows()
        elif visible and not widened:
            self._mark_dirty(name)
        if counts_changed or visible != was_visible:
            self._post_counts()

    def _widen(self, cells: dict[str, str]) -> bool:
        """Auto columns grow to fit a longer value (they never shrink while shown)."""
        grew = False
        for key, _, fixed in COLUMNS:
            if fixed is None:
                wanted = min(AUTO_MAX, len(cells[key]) + (2 if key == "state" else 0))
                if wanted > self._widths[key]:
                    self._widths[key] = wanted
                    grew = True
        if grew:
            self._strips.clear()
            self._header = None
            self._update_size()
            self.refresh()
        return grew

    def _layout_rows(self) -> None:
        """The visible rows changed: renumber them and keep the cursor on its node."""
        before = self.selected
        self._rows = [name for name, cells in self._shown.items() if self._matches(cells)]
        self._index = {name: row for row, name in enumerate(self._rows)}
        self._update_size()
        if before in self._index:
            self._set_cursor(self._index[before])
        else:
            self._set_cursor(min(self.cursor_row, max(0, len(self._rows) - 1)))
        self.refresh()

    def _post_counts(self) -> None:
        self.post_message(self.CountsChanged({k: v for k, v in self._counts.items() if v},
                                             len(self._rows), len(self._shown)))

    # ---- filter and selection ---------------------------------------------------------------

    def set_filter(self, text: str) -> None:
        """Show only the nodes whose name, host, backend, state, endpoint or error contains
        `text` (any case); "" shows all."""
        if text == self._filter:
            return
        self._filter = text
        before = list(self._rows)
        self._layout_rows()
        if self._rows != before:
            self._post_counts()

    def select(self, name: str) -> bool:
        """Move the cursor to `name`; False when the filter hides it."""
        if name not in self._index:
            return False
        self._set_cursor(self._index[name])
        return True

    def _set_cursor(self, row: int) -> None:
        row = min(max(row, 0), max(0, len(self._rows) - 1))
        if row != self.cursor_row:
            self.cursor_row = row
        else:
            self._note_selection()
        self._scroll_cursor_into_view()

    def watch_cursor_row(self, old: int, new: int) -> None:
        for row in (old, new):
            if 0 <= row < len(self._rows):
                self._refresh_row(self._rows[row])
        self._note_selection()

    def _note_selection(self) -> None:
        name = self.selected
        if name is not None and name != self._selected:
            self._selected = name
            self.post_message(self.NodeSelected(name))

    def _scroll_cursor_into_view(self) -> None:
        # The header keeps the first line: height - 1 rows show, from row scroll_y on.
        shown = max(1, self.size.height - 1)
        top = int(self.scroll_y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False, force=True)
        elif self.cursor_row >= top + shown:
            self.scroll_to(y=self.cursor_row - shown + 1, animate=False, force=True)

    def action_cursor_down(self) -> None:
        self._set_cursor(self.cursor_row + 1)

    def action_cursor_up(self) -> None:
        self._set_cursor(self.cursor_row - 1)

    # The container's scroll keys move the cursor instead.
    def action_scroll_down(self) -> None:
        self.action_cursor_down()

    def action_scroll_up(self) -> None:
        self.action_cursor_up()

    def action_page_down(self) -> None:
        self._set_cursor(self.cursor_row + max(1, self.size.height - 2))

    def action_page_up(self) -> None:
        self._set_cursor(self.cursor_row - max(1, self.size.height - 2))

    def action_scroll_home(self) -> None:
        self._set_cursor(0)

    def action_scroll_end(self) -> None:
        self._set_cursor(len(self._rows) - 1)

    def action_open(self) -> None:
        if self.selected is not None:
            self.post_message(self.NodeOpened(self.selected))

    def on_click(self, event: events.Click) -> None:
        row = int(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self._rows):
            if row == self.cursor_row:
                self.action_open()
            else:
                self._set_cursor(row)

    # ---- spinner ----------------------------------------------------------------------------

    def _set_spinning(self, name: str, spinning: bool) -> None:
        if spinning:
            self._spinning.add(name)
        else:
            self._spinning.discard(name)
        if self._spin_timer is not None:
            if self._spinning:
                self._spin_timer.resume()
            else:
                self._spin_timer.pause()

    def _spin(self) -> None:
        self._frame += 1
        for name in self._spinning:
            self._strips.pop(name, None)
            if name in self._index:
                self._mark_dirty(name)

    # ---- rendering --------------------------------------------------------------------------

    def _table_width(self) -> int:
        return sum(width + 2 * PADDING for width in self._widths.values())

    def _update_size(self) -> None:
        # The last column (the error) takes the width the others leave, but at least its own.
        others = sum(w + 2 * PADDING for k, w in self._widths.items() if k != FLEXIBLE)
        flexible = max(FLEXIBLE_MIN, self.size.width - others - 2 * PADDING)
        if flexible != self._widths[FLEXIBLE]:
            self._widths[FLEXIBLE] = flexible
            self._strips.clear()
            self._header = None
        self.virtual_size = Size(self._table_width(), len(self._rows) + 1)

    def on_resize(self) -> None:
        self._update_size()
        self.refresh()

    def _mark_dirty(self, name: str) -> None:
        """A row's data changed: redraw it on the next slot of the shared redraw clock, so a
        burst of updates is one frame (the cursor, moved by the operator, redraws at once)."""
        self._dirty.add(name)
        if self._dirty_timer is None:
            self._dirty_timer = self.set_timer(until_next_slot(TABLE_INTERVAL),
                                               self._redraw_dirty)

    def _redraw_dirty(self) -> None:
        self._dirty_timer = None
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            self._refresh_row(name)

    def _refresh_row(self, name: str) -> None:
        """Repaint the line of `name` if it is on screen (a region off it would repaint
        whatever lies there: other widgets)."""
        row = self._index.get(name)
        if row is not None:
            y = row + 1 - int(self.scroll_y)
            if 1 <= y < self.size.height:
                self.refresh(Region(0, y, self.size.width, 1))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._header = None
        self._base = self._cursor_style = None

    def _line(self, cells: list[Text]) -> Strip:
        line = Text(no_wrap=True, end="")
        for (key, _, _), cell in zip(COLUMNS, cells, strict=True):
            width = self._widths[key]
            cell.truncate(width, overflow="ellipsis", pad=True)
            line.append(" " * PADDING)
            line.append_text(cell)
            line.append(" " * PADDING)
        line.stylize_before(self.rich_style)
        return Strip(line.render(self.app.console), line.cell_len)

    def _row_strip(self, name: str) -> Strip:
        strip = self._strips.get(name)
        if strip is None:
            cells = self._shown[name]
            strip = self._line([self._cell(key, cells[key]) for key, _, _ in COLUMNS])
            self._strips[name] = strip
        return strip

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if self._base is None:  # computing the widget's style walks its ancestors: once
            self._base = self.rich_style
        base = self._base
        scroll_x = int(self.scroll_x)
        if y == 0:
            if self._header is None:
                style = self.get_component_rich_style("node-table--header")
                header = self._line([Text(label, style=style) for _, label, _ in COLUMNS])
                self._header = Strip(Segment.apply_style(header, post_style=style))
            return self._header.crop_extend(scroll_x, scroll_x + width, base)
        row = int(self.scroll_y) + y - 1
        if row >= len(self._rows):
            return Strip.blank(width, base)
        strip = self._row_strip(self._rows[row])
        if row == self.cursor_row:
            if self._cursor_style is None:
                cursor = self.get_component_rich_style("node-table--cursor")
                self._cursor_style = cursor if self.has_focus \
                    else Style(bgcolor=cursor.bgcolor, dim=True)
            strip = Strip(Segment.apply_style(strip.extend_cell_length(width),
                                              post_style=self._cursor_style))
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def on_focus(self) -> None:
        self._refresh_cursor()

    def on_blur(self) -> None:
        self._refresh_cursor()

    def _refresh_cursor(self) -> None:
        self._cursor_style = None  # focused and blurred cursors differ
        if self._rows:
            self._refresh_row(self._rows[min(self.cursor_row, len(self._rows) - 1)])
