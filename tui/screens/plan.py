"""The plan preview (`p`): which blocks would go where and each node's memory budget, made
from the model file and the nodes' free memory now; nothing is started."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static


class PlanScreen(ModalScreen[bool]):
    """Dismissed with True when the operator asks to bring the cluster up with this plan."""

    BINDINGS = [Binding("escape,p,q", "close", "Close"),
                Binding("u", "up", "Up with this plan")]

    def __init__(self, text: str, *, refused: bool, read_only: bool) -> None:
        super().__init__()
        self.text = text
        self.refused = refused
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="plan-body"):
            yield Static(Text(self.text, style="bold red" if self.refused else ""),
                         id="plan-text")
        yield Footer()

    def on_mount(self) -> None:
        body = self.query_one("#plan-body")
        body.border_title = "plan refused" if self.refused else "plan (nothing started)"
        body.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "up":
            return not (self.read_only or self.refused)
        return True

    def action_close(self) -> None:
        self.dismiss(False)

    def action_up(self) -> None:
        self.dismiss(True)
