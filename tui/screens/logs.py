"""The full-screen logs: a node's worker log, the coordinator's log or the dashboard's own event
log, with follow, search and wrap."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Static

from tui.log_stream import LogSource, SourceKind, follow_forever
from tui.text import sanitize
from tui.widgets.log_view import LogView

__all__ = ["LogSource", "LogSources", "LogsScreen"]


class LogSources(Protocol):
    """What the screen reads its logs from (tui.log_stream.ClusterLogs)."""

    @property
    def live(self) -> bool: ...  # False: no streams, only the event log

    @property
    def event_log(self) -> Iterable[str]: ...

    def title(self, source: LogSource) -> str: ...

    def open(self, source: LogSource, history: int) -> AsyncIterator[str]: ...


class LogsScreen(ModalScreen[None]):
    """Opaque and modal: the main screen's keys do not apply here, only these."""

    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="Back to the dashboard (or close the search)"),
        Binding("f", "toggle_follow", "Follow", tooltip="Follow new lines on or off"),
        Binding("slash", "search", "Search", tooltip="Search this log (any case)"),
        Binding("n", "next_match", "Next", tooltip="Next match of the search"),
        Binding("N", "previous_match", "Previous", tooltip="Previous match of the search"),
        Binding("w", "toggle_wrap", "Wrap", tooltip="Wrap long lines on or off"),
        Binding("1", "source('node')", "Node", tooltip="The selected node's worker log"),
        Binding("2", "source('coordinator')", "Coordinator", tooltip="The coordinator's log"),
        Binding("3", "source('events')", "Events",
                tooltip="The dashboard's event log: every notice of this session"),
    ]

    @dataclass
    class Lines(Message):
        source: str
        lines: list[str]

    @dataclass
    class Note(Message):
        source: str
        text: str

    def __init__(self, source: LogSource, node: str | None, history: int,
                 sources: LogSources) -> None:
        super().__init__()
        self.source = source
        self.node = node  # what `1` shows: the node selected on the dashboard
        self.history = history
        self.sources = sources

    def compose(self) -> ComposeResult:
        yield Static(id="logs-title")
        yield LogView(self.history)
        yield Input(placeholder="search (enter to find, escape to close)", id="logs-search",
                    compact=True)
        yield Footer()

    def on_mount(self) -> None:
        self.view.focus()
        # Scrolling up turns following off in the view: the title says so at once.
        self.watch(self.view, "following", lambda _: self._show_title(), init=False)
        self.show_source(self.source)

    @property
    def view(self) -> LogView:
        return self.query_one(LogView)

    # ---- sources ----------------------------------------------------------------------------

    def show_source(self, source: LogSource) -> None:
        self.source = source
        view = self.view
        view.clear()
        view.following = True
        if source.kind == "events":
            view.append(self.sources.event_log)
            self.workers.cancel_group(self, "logs-screen")
        elif self.sources.live:
            self._stream(source)
        self._show_title()
        self.refresh_bindings()

    def _show_title(self) -> None:
        view = self.view
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(sanitize(self.sources.title(self.source)), style="bold")
        text.append(f"   {view.line_count} lines (max {view.max_lines})")
        text.append("   follow " + ("on" if view.following else "off"))
        text.append("   wrap " + ("on" if view.wrap else "off"))
        if view.search_term:
            position, count = view.match_position()
            text.append(f"   search “{sanitize(view.search_term)}”: ")
            text.append(f"{position}/{count}" if count else "no match")
        self.query_one("#logs-title", Static).update(text)

    @work(exclusive=True, group="logs-screen", exit_on_error=False)
    async def _stream(self, source: LogSource) -> None:
        key = source.key
        await follow_forever(lambda history: self.sources.open(source, history), self.history,
                             lambda lines: self.post_message(self.Lines(key, lines)),
                             lambda note: self.post_message(self.Note(key, note)))

    @on(Lines)
    def _lines(self, message: Lines) -> None:
        if message.source == self.source.key:
            self.view.append(sanitize(line) for line in message.lines)
            self._show_title()

    @on(Note)
    def _note(self, message: Note) -> None:
        if message.source == self.source.key:
            self.view.append([sanitize(message.text)], note=True)

    def add_event(self, line: str) -> None:
        """A new line of the event log (called by the app for every notice)."""
        if self.source.kind == "events":
            self.view.append([line])
            self._show_title()

    # ---- keys -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("next_match", "previous_match"):
            return True if self.is_mounted and self.view.search_term else None
        if action == "source":
            kind = parameters[0] if parameters else None
            if kind == "node" and self.node is None:
                return None
            return None if kind == self.source.kind and (
                kind != "node" or self.source.node == self.node) else True
        return True

    def action_back(self) -> None:
        search = self.query_one("#logs-search", Input)
        if search.has_class("-open"):
            search.remove_class("-open")
            self.view.focus()
            return
        self.dismiss(None)

    def action_toggle_follow(self) -> None:
        self.view.following = not self.view.following
        self._show_title()

    def action_toggle_wrap(self) -> None:
        self.view.wrap = not self.view.wrap
        self._show_title()

    def action_search(self) -> None:
        search = self.query_one("#logs-search", Input)
        search.add_class("-open")
        search.value = self.view.search_term
        search.focus()

    @on(Input.Submitted, "#logs-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        event.input.remove_class("-open")
        self.view.set_search(event.value)
        self.view.focus()
        self._show_title()
        self.refresh_bindings()

    def action_next_match(self) -> None:
        self.view.next_match(forward=True)
        self._show_title()

    def action_previous_match(self) -> None:
        self.view.next_match(forward=False)
        self._show_title()

    def action_source(self, kind: str) -> None:
        if kind == "node" and self.node is not None:
            self.show_source(LogSource("node", self.node))
        elif kind in ("coordinator", "events"):
            self.show_source(LogSource(cast(SourceKind, kind)))
