"""The coordinator's load progress: what it is doing and a bar while it loads the model.

Indeterminate until the core reports a fraction (the load log's stages, issue 3); call
`show_fraction` with 0..1 then.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, ProgressBar

from tui.text import sanitize


class LoadProgress(Horizontal):
    """Hidden unless the coordinator is starting."""

    def compose(self) -> ComposeResult:
        yield Label("loading the model", id="load-label")
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="load-bar")

    def start(self) -> None:
        self.add_class("-loading")

    def stop(self) -> None:
        self.remove_class("-loading")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self.query_one(Label).update("loading the model")

    def show_detail(self, detail: str) -> None:
        self.query_one(Label).update(Text(sanitize(detail), no_wrap=True))

    def show_fraction(self, fraction: float | None) -> None:
        """0..1 makes the bar determinate; None makes it indeterminate again."""
        bar = self.query_one(ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=max(0.0, min(1.0, fraction)) * 100)
