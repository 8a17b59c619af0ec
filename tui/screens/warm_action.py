"""`w` on the dashboard: pre-warm the workers' weight caches as `torbiz-tui cache warm` does
(the plan's workers and the standbys, all in parallel), each node's progress in a panel under
the node table, each node's outcome in the event log.

Supervision goes on meanwhile (a pre-warm can take minutes; the dashboard's busy keys would
pause the supervisor's checks), so it is tracked here, not as a busy part of the cluster."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.message import Message

from core import operations
from core.operations import OperationError
from core.status import Level
from core.weight_cache import WarmProgress, WarmResult
from core.weight_cache_view import progress_line, result_lines
from tui.model import WHOLE_CLUSTER
from tui.screens.cluster_workers import ClusterWorkers
from tui.widgets.warm_panel import WarmPanel

PROGRESS_EVERY_S = 0.25  # a node's progress lines drawn at most this often
SHOWN_AFTER_S = 30.0  # the outcome stays this long


class WarmAction(ClusterWorkers):
    """The screen's pre-warm: its key, its worker, its messages, its panel."""

    @dataclass
    class WarmUpdated(Message):
        progress: WarmProgress

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, WarmAction.WarmUpdated) \
                and message.progress.node == self.progress.node

    @dataclass
    class WarmFinished(Message):
        results: list[WarmResult]
        problems: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warm_panel = WarmPanel(id="warm-panel")
        self._warming = False
        self._warm_seen: dict[str, WarmProgress] = {}

    def warm_key(self) -> bool | None:
        """The `w` key: hidden read-only or without a weight cache, greyed while a pre-warm or
        a whole-cluster action (`up` may pre-warm too) runs."""
        if self.model.read_only or not self.cluster.capabilities.has_weight_cache:
            return False
        return None if self._warming or WHOLE_CLUSTER in self.model.busy_keys else True

    def action_warm_cache(self) -> None:
        if self.warm_key() is not True:
            return
        self._warming = True
        self._warm_seen = {}
        self.warm_panel.show_lines("pre-warming the weight caches: planning ...", [])
        self.refresh_bindings()
        self.warm_caches()

    @work(group="warm", exclusive=True, exit_on_error=False)
    async def warm_caches(self) -> None:
        shown: dict[str, float] = {}

        def progress(p: WarmProgress) -> None:
            now = time.monotonic()
            if p.finished or p.error or now - shown.get(p.node, 0.0) >= PROGRESS_EVERY_S:
                shown[p.node] = now
                self.post_message(self.WarmUpdated(p))

        try:
            results = await operations.cache_warm(self.cluster, progress=progress)
        except OperationError as exc:
            self.post_message(self.WarmFinished([], exc.problems))
        except Exception as exc:  # noqa: BLE001 - the key must come back whatever happened
            self.post_message(self.WarmFinished([], [f"pre-warm failed: {exc!r}"]))
        else:
            self.post_message(self.WarmFinished(results, []))

    @on(WarmUpdated)
    def _warm_updated(self, message: WarmUpdated) -> None:
        if self._gone() or not self._warming:
            return
        self._warm_seen[message.progress.node] = message.progress
        self.warm_panel.show_lines(
            "pre-warming the weight caches (w):",
            [progress_line(p) for _, p in sorted(self._warm_seen.items()) if not p.error])

    @on(WarmFinished)
    def _warm_finished(self, message: WarmFinished) -> None:
        if self._gone():
            return
        self._warming = False
        lines = list(message.problems)
        for result in message.results:
            said = result_lines(result)
            lines += said
            self.cluster.notice(f"pre-warm {said[0]}", Level.ERROR if result.error
                                else Level.INFO, result.node)
        for problem in message.problems:
            self.cluster.notice(f"pre-warm: {problem}", Level.ERROR)
        failed = bool(message.problems) or any(r.error for r in message.results)
        self.warm_panel.show_lines(
            "pre-warm " + ("failed" if failed else "done") + " (w warms again):", lines)
        self.set_timer(SHOWN_AFTER_S, self._hide_warm)
        self.refresh_bindings()

    def _hide_warm(self) -> None:
        if not self._warming and not self._gone():
            self.warm_panel.hide()
