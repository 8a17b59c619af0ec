"""Repeated log lines collapse into one line with a count: the core rule, a log pane, `logs -f`."""

from __future__ import annotations

from textual.app import App, ComposeResult

from core.log_lines import Repeats
from tui.widgets.log_view import LogView

FAIL = "node2: log stream failed: SSH connection lost"


def test_a_run_of_one_line_is_counted_and_ends_as_one_summary() -> None:
    repeats = Repeats()
    shown = []
    for line in ["start", *[FAIL] * 20, "back"]:
        if repeats.feed(line) > 1:
            continue
        summary = repeats.ended()
        if summary is not None:
            shown.append(summary)
        shown.append(line)
    assert shown == ["start", FAIL, f"{FAIL} (x20)", "back"]
    assert repeats.pending() is None
    repeats.feed("back")
    assert repeats.pending() == "back (x2)"


class _Pane(App[None]):
    def compose(self) -> ComposeResult:
        yield LogView()


async def test_a_log_pane_shows_a_repeat_once_with_its_count() -> None:
    app = _Pane()
    async with app.run_test() as pilot:
        view = app.query_one(LogView)
        view.append(["start"])
        for _ in range(20):
            view.append([FAIL])
        view.append(["back", "back"])
        await pilot.pause()
        assert view.plain_lines() == ["start", f"{FAIL} (x20)", "back (x2)"]
        view.wrap = True
        view.append([FAIL, FAIL])
        await pilot.pause()
        assert view.plain_lines()[-1] == f"{FAIL} (x2)"
        assert view.line_count == 4
