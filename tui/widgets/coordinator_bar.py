"""The coordinator bar: llama-server's state, URL, pid and error on one line; an engine with no
coordinator names its serving side (a Petals swarm) instead."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from core.status import STATES, STOPPED, CoordinatorStatus
from core.status_text import coordinator_state_text
from tui.model import PROBING, STOPPING, CoordinatorRow, Serving
from tui.text import css_name, sanitize


class CoordinatorBar(Static):
    COMPONENT_CLASSES = {
        f"coordinator-bar--{css_name(name)}"
        for name in (*STATES, PROBING, STOPPING, "label", "error")
    }

    status: reactive[CoordinatorRow] = reactive(CoordinatorRow(CoordinatorStatus(), STOPPED))
    serving: Serving | None = None  # no coordinator: the bar names the swarm

    def watch_status(self, status: CoordinatorRow) -> None:
        def style(name: str) -> Style:
            return self.get_component_rich_style(f"coordinator-bar--{css_name(name)}",
                                                 partial=True,
                                                 default=Style())

        text = Text(no_wrap=True, overflow="ellipsis")
        if self.serving is not None:
            text.append(self.serving.title, style=style("label"))
            if self.serving.name:
                text.append(" ")
                text.append(sanitize(self.serving.name), style="bold")
            text.append(f"   no coordinator: clients join the {self.serving.label} "
                        "(torbiz-tui generate)", style=style("label"))
            self.update(text)
            return
        text.append("coordinator ", style=style("label"))
        shown = (coordinator_state_text(status.status) if status.state == status.status.state
                 else status.state)
        text.append(shown, style=style(status.state))
        text.append("   ")
        text.append(sanitize(status.url) or "-")
        text.append("   pid ", style=style("label"))
        text.append(str(status.pid) if status.pid else "-")
        if status.error:
            text.append("   ")
            text.append(sanitize(status.error), style=style("error"))
        self.update(text)
