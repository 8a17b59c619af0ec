"""The dashboard's keys, and the help and palette made from them (never written twice)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual.binding import Binding, BindingType

from tui.model import CHANGES_CLUSTER

HelpSection = tuple[str, list[tuple[str, str]]]  # (title, [(keys, what they do)])
KeyDisplay = Callable[[Binding], str]

MAIN_BINDINGS: list[BindingType] = [
    Binding("j", "move(1)", "Next node", show=False, tooltip="Select the next node"),
    Binding("k", "move(-1)", "Previous node", show=False,
            tooltip="Select the previous node"),
    Binding("s", "start_node", "Start", tooltip="Start the selected node's worker"),
    Binding("x", "stop_node", "Stop", tooltip="Stop the selected node's worker (asks first)"),
    Binding("r", "restart_node", "Restart",
            tooltip="Restart the selected node's worker (asks first while the coordinator "
                    "uses it)"),
    Binding("l,enter", "logs", "Logs",
            tooltip="The selected node's log, full screen"),
    Binding("e", "event_log", "Events", tooltip="The dashboard's event log, full screen"),
    # One key, two actions: check_action shows the one that fits the coordinator's state.
    Binding("c", "start_coordinator", "Start coord.",
            tooltip="Start the coordinator (llama-server) over the ready workers"),
    Binding("c", "stop_coordinator", "Stop coord.",
            tooltip="Stop the coordinator (asks first)"),
    Binding("p", "plan", "Plan", tooltip="Preview the plan: which blocks go on which node, "
                                         "from the model and each node's free memory"),
    # Not in the footer (it is full at 140 columns): in the help and the palette.
    Binding("w", "warm_cache", "Warm", show=False,
            tooltip="Pre-warm the weight caches of the plan's workers and the standbys (as "
                    "torbiz-tui cache warm), each node's progress shown"),
    Binding("u", "up", "Up", tooltip="Bring the whole cluster up as planned: preflight, "
                                     "workers, then the coordinator"),
    Binding("b", "rebalance", "Rebalance",
            tooltip="Plan again over every node (one back after a fault too) and restart the "
                    "coordinator over it"),
    Binding("d", "down", "Down", tooltip="Take the whole cluster down (asks first)"),
    Binding("g", "generate", "Generate",
            tooltip="A short generation through the cluster: does it answer, how fast"),
    Binding("slash", "filter", "Filter", tooltip="Filter the nodes by name, host, state, "
                                                 "error ..."),
    Binding("question_mark", "help", "Help", tooltip="This help: every key and command"),
    Binding("q", "quit", "Quit",
            tooltip="Quit; asks whether to leave the cluster running (the default) or "
                    "stop it"),
]
# On the app, so that it opens from every screen that lets app keys through.
PALETTE_BINDING = Binding("colon,ctrl+p", "command_palette", "Commands", show=False,
                          tooltip="The command palette: every action, jump to node NAME, logs")


def _keys(binding: Binding, display: KeyDisplay) -> list[str]:
    return [display(Binding(k.strip(), binding.action)) for k in binding.key.split(",")]


def bindings_by_action(bindings: Iterable[BindingType],
                       display: KeyDisplay) -> dict[str, tuple[list[str], Binding]]:
    """Every key of every binding, grouped by action, in their order."""
    grouped: dict[str, tuple[list[str], Binding]] = {}
    for binding in bindings:
        assert isinstance(binding, Binding)
        keys = _keys(binding, display)
        if binding.action in grouped:
            shown = grouped[binding.action][0]
            shown.extend(k for k in keys if k not in shown)
        else:
            grouped[binding.action] = (keys, binding)
    return grouped


def _rows(bindings: Iterable[BindingType], display: KeyDisplay) -> list[tuple[str, str]]:
    found = []
    for binding in bindings:
        assert isinstance(binding, Binding)
        found.append((" / ".join(_keys(binding, display)),
                      binding.tooltip or binding.description))
    return found


def help_sections(display: KeyDisplay, *, read_only: bool,
                  logs: Iterable[BindingType],
                  node_filter: Iterable[BindingType]) -> list[HelpSection]:
    """The help screen's sections: the dashboard's keys (read-only mode leaves out what would
    change the cluster), the filter's, the logs screen's, the palette, the dialogs."""
    main: list[tuple[str, str]] = [("↑ / ↓", "Select a node; its log streams in the pane")]
    for action, (keys, binding) in bindings_by_action([*MAIN_BINDINGS, PALETTE_BINDING],
                                                      display).items():
        if read_only and action in CHANGES_CLUSTER:
            continue
        main.append((" / ".join(keys), binding.tooltip or binding.description))
    if read_only:
        main.append(("", "Read-only mode: the keys that change the cluster are hidden"))
    log_rows = _rows(logs, display) + [
        ("↑ ↓ pgup pgdn home", "Scroll; scrolling up stops following"),
        ("end", "Back to the newest line, following again"),
    ]
    filter_rows = [("type", "Filter as you type"),
                   ("enter", "Keep the filter, back to the table")] + _rows(node_filter, display)
    palette = [(": then type", "Every action above that makes sense now, plus:")] + [
        ("", "Jump to node NAME"), ("", "The coordinator's log, full screen"),
        ("", "Clear the node filter"), ("", "Theme, screenshot, keys (Textual's own)")]
    questions = [("y / n", "Confirm or refuse a stop (escape is no)"),
                 ("l / s / esc", "Quit: leave the cluster running (enter) / stop it first "
                                 "/ stay")]
    return [("Dashboard", main), ("Filter (/)", filter_rows), ("Logs screen (l, e)", log_rows),
            ("Command palette (:)", palette), ("Questions", questions),
            ("Headless", [("torbiz-tui --help", "up, down, status, logs, watch, doctor: the "
                                                "same actions for scripts")])]
