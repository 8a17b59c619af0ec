"""The node filter: a one-line input under the table, shown by `/`."""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input


class NodeFilter(Input):
    """Filters as you type; enter keeps the filter and goes back to the table, escape clears
    it."""

    BINDINGS = [Binding("escape", "clear", "Clear filter", tooltip="Clear the filter and close it")]

    @dataclass
    class FilterChanged(Message):
        text: str

    @dataclass
    class FilterDone(Message):
        """The operator left the filter (enter keeps it, escape cleared it)."""

    def __init__(self) -> None:
        super().__init__(placeholder="filter nodes: name, host, state, error ...", compact=True)

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.FilterChanged(event.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.FilterDone())

    def open(self) -> None:
        self.add_class("-open")
        self.focus()

    def close(self) -> None:
        self.remove_class("-open")

    @property
    def is_open(self) -> bool:
        return self.has_class("-open")

    def action_clear(self) -> None:
        self.value = ""
        self.post_message(self.FilterChanged(""))
        self.post_message(self.FilterDone())
