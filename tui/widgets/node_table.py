"""The node table: one row per node, diffed by row key, never rebuilt."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual import on
from textual.coordinate import Coordinate
from textual.message import Message
from textual.timer import Timer
from textual.widgets import DataTable

from core.status import FAILED, READY, STARTING, STATES, STOPPED, UNREACHABLE, NodeStatus

from ..text import sanitize

# States of ours, shown while the core has not spoken yet or is busy on the node.
PROBING = "probing"  # until the first refresh says what the node really is
STOPPING = "stopping"  # while a stop is in flight (the core reports only the outcome)

# A glyph before each state, so state reads without colour too; busy states spin.
GLYPHS = {READY: "●", STOPPED: "○", FAILED: "✖", UNREACHABLE: "⚠"}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SPINNING = frozenset({STARTING, STOPPING, PROBING})
SPIN_INTERVAL = 1 / 8

# (column key, label, fixed width or None for automatic)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("name", "NODE", None),
    ("host", "HOST", None),
    ("backend", "BACKEND", None),
    ("state", "STATE", 13),
    ("pid", "PID", 8),
    ("endpoint", "ENDPOINT", None),
    ("error", "ERROR", 48),
)
FILTERED = ("name", "host", "backend", "state", "endpoint", "error")


class NodeTable(DataTable[Text]):
    """Rows keyed by node name; `show_node` changes only the cells whose text changed.

    A filter removes the rows that do not match and adds them back in their first order; what
    every node shows is kept for all nodes, filtered or not."""

    COMPONENT_CLASSES = {f"node-table--{state}" for state in (*STATES, PROBING, STOPPING)}

    @dataclass
    class NodeSelected(Message):
        """The cursor moved to another node."""

        name: str

    @dataclass
    class NodeOpened(Message):
        """Enter on a node: show its log full screen."""

        name: str

    @dataclass
    class CountsChanged(Message):
        """How many nodes are in each state changed (or how many the filter shows)."""

        counts: dict[str, int]
        shown: int
        total: int

    def __init__(self) -> None:
        super().__init__(cursor_type="row")
        self._shown: dict[str, dict[str, str]] = {}
        self._order: dict[str, int] = {}
        self._visible: set[str] = set()
        self._selected: str | None = None
        self._filter = ""
        self._counts: Counter[str] = Counter()
        self._spinning: set[str] = set()
        self._frame = 0
        self._spin_timer: Timer | None = None

    def on_mount(self) -> None:
        self.border_title = "nodes"
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)
        if self.app.animation_level != "none":  # snapshots and tests see a still frame
            self._spin_timer = self.set_interval(SPIN_INTERVAL, self._spin, pause=True)

    # ---- what the table shows ---------------------------------------------------------------

    @property
    def selected(self) -> str | None:
        """The node under the cursor now (not when its message is handled: a key pressed right
        after `j` acts on the row the cursor moved to)."""
        if not self.row_count:
            return None
        row = min(max(self.cursor_row, 0), self.row_count - 1)
        name = self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value
        return name if name in self._visible else None

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

    def _cells(self, status: NodeStatus) -> dict[str, str]:
        return {
            "name": status.name,
            "host": status.host,
            "backend": status.backend,
            "state": status.state,
            "pid": str(status.pid) if status.pid else "-",
            "endpoint": status.endpoint,
            "error": status.error,
        }

    def _text(self, key: str, value: str) -> Text:
        if key != "state":
            return Text(sanitize(value), no_wrap=True, overflow="ellipsis")
        glyph = SPINNER[self._frame % len(SPINNER)] if value in SPINNING \
            else GLYPHS.get(value, " ")
        text = Text(f"{glyph} {sanitize(value)}", no_wrap=True, overflow="ellipsis")
        text.stylize(self.get_component_rich_style(f"node-table--{value}", partial=True,
                                                   default=Style()))
        return text

    def _matches(self, cells: dict[str, str]) -> bool:
        needle = self._filter.casefold()
        return not needle or any(needle in cells[key].casefold() for key in FILTERED)

    def show_node(self, status: NodeStatus) -> None:
        name = status.name
        cells = self._cells(status)
        shown = self._shown.get(name)
        self._order.setdefault(name, len(self._order))
        visible = self._matches(cells)
        was_visible = name in self._visible
        if shown is None or shown["state"] != cells["state"]:
            if shown is not None:
                self._counts[shown["state"]] -= 1
            self._counts[cells["state"]] += 1
            counts_changed = True
        else:
            counts_changed = False
        if visible and not was_visible:
            self._add_row(name, cells)
            if any(self._order[other] > self._order[name] for other in self._visible):
                self._sort_rows()
        elif not visible and was_visible:
            self.remove_row(name)
            self._visible.discard(name)
        elif visible and shown is not None:
            for key, value in cells.items():
                if shown[key] != value:
                    self.update_cell(name, key, self._text(key, value))
        self._shown[name] = cells
        self._set_spinning(name, cells["state"] in SPINNING)
        if counts_changed or visible != was_visible:
            self._post_counts()
        if not visible or self._selected is None:
            self._reconcile_cursor()

    def _add_row(self, name: str, cells: dict[str, str]) -> None:
        self.add_row(*(self._text(k, cells[k]) for k, _, _ in COLUMNS), key=name)
        self._visible.add(name)

    def _sort_rows(self) -> None:
        if self.row_count > 1:
            order = self._order
            self.sort("name", key=lambda name: order.get(name.plain, 0))

    def _post_counts(self) -> None:
        self.post_message(self.CountsChanged({k: v for k, v in self._counts.items() if v},
                                             len(self._visible), len(self._shown)))

    # ---- filter and selection ---------------------------------------------------------------

    def set_filter(self, text: str) -> None:
        """Show only the nodes whose name, host, backend, state, endpoint or error contains
        `text` (any case); "" shows all."""
        if text == self._filter:
            return
        self._filter = text
        changed = False
        for name in sorted(self._shown, key=self._order.__getitem__):
            cells = self._shown[name]
            if self._matches(cells) and name not in self._visible:
                self._add_row(name, cells)
                changed = True
            elif not self._matches(cells) and name in self._visible:
                self.remove_row(name)
                self._visible.discard(name)
                changed = True
        if changed:
            self._sort_rows()
            self._post_counts()
        self._reconcile_cursor()

    def select(self, name: str) -> bool:
        """Move the cursor to `name`; False when the filter hides it."""
        if name not in self._visible:
            return False
        self.move_cursor(row=self.get_row_index(name))
        self._note_selection(name)
        return True

    def _reconcile_cursor(self) -> None:
        """Keep the selection on a visible row: the one selected before when it still shows."""
        if not self._visible:
            return
        if self._selected in self._visible:
            index = self.get_row_index(self._selected)
            if index != self.cursor_row:
                self.move_cursor(row=index)
            return
        row = min(max(self.cursor_row, 0), self.row_count - 1)
        name = self.coordinate_to_cell_key((row, 0)).row_key.value
        if name is not None:
            self.move_cursor(row=row)
            self._note_selection(name)

    def _note_selection(self, name: str) -> None:
        if name != self._selected:
            self._selected = name
            self.post_message(self.NodeSelected(name))

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        name = event.row_key.value
        if name is not None:
            self._note_selection(name)

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.NodeOpened(event.row_key.value))

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
        for name in self._spinning & self._visible:
            self.update_cell(name, "state", self._text("state", self._shown[name]["state"]))
