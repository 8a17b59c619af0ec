"""The coordinator bar: llama-server's state, URL, pid and error on one line."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from core.status import STATES, STOPPED, CoordinatorStatus
from tui.text import sanitize


class CoordinatorBar(Static):
    COMPONENT_CLASSES = {
        f"coordinator-bar--{name}"
        for name in (*STATES, "probing", "stopping", "label", "error")
    }

    status: reactive[CoordinatorStatus] = reactive(CoordinatorStatus(STOPPED))
    swarm: str = ""  # a Petals swarm's DHT prefix: no coordinator, the bar names the swarm

    def watch_status(self, status: CoordinatorStatus) -> None:
        def style(name: str) -> Style:
            return self.get_component_rich_style(f"coordinator-bar--{name}", partial=True,
                                                 default=Style())

        text = Text(no_wrap=True, overflow="ellipsis")
        if self.swarm:
            text.append("Petals swarm ", style=style("label"))
            text.append(sanitize(self.swarm), style="bold")
            text.append("   no coordinator: clients join the swarm (torbiz-tui petals-generate)",
                        style=style("label"))
            self.update(text)
            return
        text.append("coordinator ", style=style("label"))
        text.append(status.state, style=style(status.state))
        text.append("   ")
        text.append(sanitize(status.url) or "-")
        text.append("   pid ", style=style("label"))
        text.append(str(status.pid) if status.pid else "-")
        if status.error:
            text.append("   ")
            text.append(sanitize(status.error), style=style("error"))
        self.update(text)
