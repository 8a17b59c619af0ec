"""The command palette (`:`): the dashboard's actions, what only makes sense now, plus
"jump to node NAME" and the logs of every source."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from tui.app import PaletteCommand, TorbizApp


class DashboardCommands(Provider):
    def _commands(self) -> list[PaletteCommand]:
        return cast("TorbizApp", self.app).palette_commands()

    async def discover(self) -> Hits:
        for command in self._commands():
            yield DiscoveryHit(command.title, command.run, help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self._commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), command.run,
                          text=command.title, help=command.help)
