"""The help screen: every key and every command, generated from the bindings themselves."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

HelpSection = tuple[str, list[tuple[str, str]]]  # (title, [(keys, what they do)])


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, title: str, sections: list[HelpSection]) -> None:
        super().__init__()
        self.title_text = title
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(self._render_sections(), id="help-text")
        yield Footer()

    def on_mount(self) -> None:
        body = self.query_one("#help-body")
        body.border_title = self.title_text
        body.focus()

    def _render_sections(self) -> Table:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(justify="right", style="bold", no_wrap=True)
        grid.add_column()
        for index, (title, rows) in enumerate(self.sections):
            if index:
                grid.add_row("", "")
            grid.add_row("", Text(title, style="bold underline"))
            for keys, what in rows:
                grid.add_row(Text(keys, style="bold"), Text(what))
        return grid

    def action_close(self) -> None:
        self.dismiss(None)
