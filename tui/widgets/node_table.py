"""The node table: one row per node, diffed by row key, never rebuilt."""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual import on
from textual.message import Message
from textual.widgets import DataTable

from core.status import STATES, NodeStatus

from ..text import sanitize

# States of ours, shown while the core has not spoken yet or is busy on the node.
PROBING = "probing"  # until the first refresh says what the node really is
STOPPING = "stopping"  # while a stop is in flight (the core reports only the outcome)

# (column key, label, fixed width or None for automatic)
COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("name", "NODE", None),
    ("host", "HOST", None),
    ("backend", "BACKEND", None),
    ("state", "STATE", 11),
    ("pid", "PID", 8),
    ("endpoint", "ENDPOINT", None),
    ("error", "ERROR", 48),
)


class NodeTable(DataTable[Text]):
    """Rows keyed by node name; `show_node` changes only the cells whose text changed."""

    COMPONENT_CLASSES = {f"node-table--{state}" for state in (*STATES, PROBING, STOPPING)}

    @dataclass
    class NodeSelected(Message):
        """The cursor moved to another node."""

        name: str

    def __init__(self) -> None:
        super().__init__(cursor_type="row")
        self._shown: dict[str, dict[str, str]] = {}
        self._selected: str | None = None

    def on_mount(self) -> None:
        self.border_title = "nodes"
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    @property
    def selected(self) -> str | None:
        return self._selected

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
        text = Text(sanitize(value), no_wrap=True, overflow="ellipsis")
        if key == "state":
            text.stylize(self.get_component_rich_style(f"node-table--{value}", partial=True,
                                                       default=Style()))
        return text

    def show_node(self, status: NodeStatus) -> None:
        cells = self._cells(status)
        shown = self._shown.get(status.name)
        if shown is None:
            self.add_row(*(self._text(k, cells[k]) for k, _, _ in COLUMNS), key=status.name)
        else:
            for key, value in cells.items():
                if shown[key] != value:
                    self.update_cell(status.name, key, self._text(key, value))
        self._shown[status.name] = cells

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        name = event.row_key.value
        if name is not None and name != self._selected:
            self._selected = name
            self.post_message(self.NodeSelected(name))
