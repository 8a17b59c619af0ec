"""Questions asked before anything that stops work."""

from __future__ import annotations

from typing import Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class ConfirmScreen(ModalScreen[bool]):
    """Asks before anything that stops work; `n`, escape and enter on No all say no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.question), id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


QuitChoice = Literal["leave", "stop"]


class QuitScreen(ModalScreen["QuitChoice | None"]):
    """Quit: leave the cluster running (the default: enter or `l`), stop it first (`s`), or
    stay (escape)."""

    BINDINGS = [
        Binding("l", "choose('leave')", "Leave it running"),
        Binding("s", "choose('stop')", "Stop it, then quit"),
        Binding("escape", "choose('')", "Stay"),
    ]

    def __init__(self, cluster: str, running: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.running = running

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(f"Quit the dashboard. Cluster {self.cluster}: {self.running}."),
                        id="question")
            yield Label(Text("Workers and the coordinator keep running without the dashboard; "
                             "open it again to reattach."), id="hint")
            with Horizontal(id="buttons"):
                yield Button("Leave it running (l)", id="leave", variant="primary")
                yield Button("Stop the cluster (s)", id="stop", variant="error")
                yield Button("Stay (esc)", id="stay")

    def on_mount(self) -> None:
        self.query_one("#leave", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.action_choose(event.button.id if event.button.id in ("leave", "stop") else "")

    def action_choose(self, choice: str) -> None:
        self.dismiss("leave" if choice == "leave" else "stop" if choice == "stop" else None)
