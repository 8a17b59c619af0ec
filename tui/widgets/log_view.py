"""A bounded log view: plain lines kept as strings and rendered lazily, only the visible ones.

Appending costs a deque append, not a render, so a flood of lines is cheap; search and wrap
only change how the visible lines are drawn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from rich.cells import cell_len, chop_cells
from rich.style import Style
from rich.text import Text
from textual.cache import LRUCache
from textual.geometry import Size
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from core.log_lines import Repeats, counted
from tui.redraw import FLOOD_INTERVAL, FLOOD_LINES, LOG_INTERVAL, until_next_slot

MAX_LINES = 5_000
MAX_LINE_CHARS = 4_096  # one runaway line must not cost more than a screenful


def _width(line: str) -> int:
    return len(line) if line.isascii() else cell_len(line)


def _chunks(line: str, width: int) -> list[str]:
    """The pieces a wrapped line shows, one per row (hard wrap: logs have no prose)."""
    if width <= 0 or not line:
        return [line]
    if line.isascii():
        return [line[i:i + width] for i in range(0, len(line), width)]
    return chop_cells(line, width) or [line]


class LogView(ScrollView, can_focus=True):
    """Lines in, newest last; at most `max_lines` kept. `following` keeps the end in view;
    scrolling up turns it off, `end` turns it on again."""

    COMPONENT_CLASSES = {"log-view--note", "log-view--match", "log-view--current-match"}

    following: var[bool] = var(True)
    wrap: var[bool] = var(False)

    def __init__(self, max_lines: int = MAX_LINES) -> None:
        super().__init__()
        self.max_lines = max(1, max_lines)
        self._lines: deque[tuple[str, bool]] = deque()  # (text, is a note of ours)
        self._first = 0  # absolute number of _lines[0]; grows as old lines are dropped
        self._widest = 0
        self._rows: deque[tuple[int, int]] = deque()  # wrap on: (absolute line, piece)
        self._rows_width = 0
        self._search = ""
        self._match: int | None = None  # absolute line of the current match
        self._strips: LRUCache[tuple[int, int], Strip] = LRUCache(1024)
        self._base: Style | None = None  # the widget's own style, kept between style changes
        self._pending_shift = 0
        self._lines_since_redraw = 0
        self._last_redraw = 0.0
        self._flooded = False
        self._redraw_timer: Timer | None = None
        self._repeats = Repeats()  # a line identical to the last one bumps its count

    # ---- content ----------------------------------------------------------------------------

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def plain_lines(self) -> list[str]:
        return [text for text, _ in self._lines]

    def clear(self) -> None:
        self._pending_shift = 0
        self._first += len(self._lines)
        self._lines.clear()
        self._repeats.reset()
        self._rows.clear()
        self._widest = 0
        self._match = None
        self._strips.clear()
        self._update_virtual_size()
        self.scroll_to(0, 0, animate=False)
        self.refresh()

    def append(self, lines: Iterable[str], note: bool = False) -> None:
        """Add lines (already sanitized: no control characters but tabs)."""
        wrap_width = self._rows_width if self.wrap else 0
        added = 0
        for raw in lines:
            line = raw.expandtabs(8)
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS] + " …"
            count = self._repeats.feed(line)
            if count > 1 and self._lines:
                self._replace_last(counted(line, count), note, wrap_width)
                continue
            absolute = self._first + len(self._lines)
            self._lines.append((line, note))
            width = _width(line)
            if width > self._widest:
                self._widest = width
            if wrap_width:
                pieces = -(-width // wrap_width) if line.isascii() else \
                    len(_chunks(line, wrap_width))
                self._rows.extend((absolute, piece) for piece in range(max(1, pieces)))
            added += 1
        if not added:
            return
        self._lines_since_redraw += added
        dropped = len(self._lines) - self.max_lines
        dropped_rows = 0
        if dropped > 0:
            for _ in range(dropped):
                self._lines.popleft()
            self._first += dropped
            while self._rows and self._rows[0][0] < self._first:
                self._rows.popleft()
                dropped_rows += 1
            if self._match is not None and self._match < self._first:
                self._match = None
            self._strips.clear()  # rows moved under the cache's keys
            self._pending_shift += dropped_rows if self.wrap else dropped
        self._schedule_redraw()

    def _replace_last(self, line: str, note: bool, wrap_width: int) -> None:
        """A repeat: the last line becomes `line` (its count); only its rows are redone."""
        absolute = self._first + len(self._lines) - 1
        self._lines[-1] = (line, note)
        self._widest = max(self._widest, _width(line))
        if wrap_width:
            while self._rows and self._rows[-1][0] == absolute:
                self._rows.pop()
            pieces = len(_chunks(line, wrap_width))
            self._rows.extend((absolute, piece) for piece in range(max(1, pieces)))
        self._strips.clear()
        self._schedule_redraw()

    def _schedule_redraw(self) -> None:
        """Redraw on the next slot of the shared redraw clock, in the same frames as the other
        widgets: at most 1 / LOG_INTERVAL redraws a second, and 1 / FLOOD_INTERVAL while lines
        pour in faster than anyone reads them (a redraw of the whole pane is the costly part)."""
        if self._redraw_timer is None:
            interval = FLOOD_INTERVAL if self._flooded else LOG_INTERVAL
            self._redraw_timer = self.set_timer(until_next_slot(interval), self._redraw)

    def _flush(self) -> None:
        """Apply a pending redraw now: what reads the view's position (search, wrap) must see
        the lines appended since the last one."""
        if self._redraw_timer is not None:
            self._redraw_timer.stop()
            self._redraw()

    def _redraw(self) -> None:
        self._redraw_timer = None
        now = time.monotonic()
        rate = self._lines_since_redraw / max(now - self._last_redraw, 0.01)
        self._flooded = rate > FLOOD_LINES
        self._last_redraw, self._lines_since_redraw = now, 0
        shift, self._pending_shift = self._pending_shift, 0
        self._update_virtual_size()
        if self.following:
            self._scroll_to_end()
        elif shift:
            # Keep the lines being read where they are while older ones leave memory.
            self.scroll_to(y=max(0, self.scroll_y - shift), animate=False)
        self.refresh()

    def _scroll_to_end(self) -> None:
        # force: right after the first lines the scrollbar (and so scrolling) is not there yet.
        self.scroll_to(y=self.max_scroll_y, animate=False, force=True)

    def _update_virtual_size(self) -> None:
        if self.wrap:
            self.virtual_size = Size(self._rows_width, len(self._rows))
        else:
            self.virtual_size = Size(self._widest, len(self._lines))

    def _rebuild_rows(self, width: int) -> None:
        self._rows_width = max(1, width)
        rows: deque[tuple[int, int]] = deque()
        for index, (line, _) in enumerate(self._lines):
            absolute = self._first + index
            count = len(_chunks(line, self._rows_width))
            rows.extend((absolute, piece) for piece in range(count))
        self._rows = rows

    # ---- follow, wrap, search ---------------------------------------------------------------

    def watch_following(self, following: bool) -> None:
        if following:
            self._scroll_to_end()

    def watch_wrap(self, wrap: bool) -> None:
        self._flush()
        top = self._top_line()
        if wrap:
            self._rebuild_rows(self.scrollable_content_region.width or self.size.width)
        else:
            self._rows.clear()
        self._strips.clear()
        self._update_virtual_size()
        if self.following:
            self._scroll_to_end()
        elif top is not None:
            self._scroll_to_line(top, center=False)
        self.refresh()

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        if self.wrap and width != self._rows_width:
            top = self._top_line()
            self._rebuild_rows(width)
            self._strips.clear()
            self._update_virtual_size()
            if self.following:
                self._scroll_to_end()
            elif top is not None:
                self._scroll_to_line(top, center=False)

    @property
    def search_term(self) -> str:
        return self._search

    def set_search(self, term: str) -> tuple[int, int]:
        """Highlight `term` (case-insensitive) and go to its first match at or below the top
        of the view; (position, count) of that match, (0, 0) when there is none."""
        self._flush()
        self._search = term.casefold()
        self._match = None
        self._strips.clear()
        self.refresh()
        if not self._search:
            return 0, 0
        top = self._top_line()
        start = (top if top is not None else self._first) - 1
        return self._go_to_match(start, forward=True)

    def next_match(self, forward: bool = True) -> tuple[int, int]:
        self._flush()
        if not self._search:
            return 0, 0
        if self._match is not None:
            start = self._match
        else:
            top = self._top_line()
            start = (top if top is not None else self._first) - (1 if forward else 0)
        return self._go_to_match(start, forward)

    def match_position(self) -> tuple[int, int]:
        """(position of the current match counting from 1, number of matching lines)."""
        matches = self._matches()
        if self._match is None or self._match not in matches:
            return 0, len(matches)
        return matches.index(self._match) + 1, len(matches)

    def _matches(self) -> list[int]:
        term = self._search
        if not term:
            return []
        return [self._first + i for i, (line, _) in enumerate(self._lines)
                if term in line.casefold()]

    def _go_to_match(self, start: int, forward: bool) -> tuple[int, int]:
        matches = self._matches()
        if not matches:
            self._match = None
            return 0, 0
        if forward:
            after = [m for m in matches if m > start]
            self._match = after[0] if after else matches[0]  # wraps around
        else:
            before = [m for m in matches if m < start]
            self._match = before[-1] if before else matches[-1]
        self.following = False
        self._strips.clear()
        self._scroll_to_line(self._match, center=True)
        self.refresh()
        return matches.index(self._match) + 1, len(matches)

    def _top_line(self) -> int | None:
        """The absolute number of the line at the top of the view."""
        if not self._lines:
            return None
        y = int(self.scroll_y)
        if self.wrap:
            return self._rows[min(y, len(self._rows) - 1)][0] if self._rows else None
        return self._first + min(y, len(self._lines) - 1)

    def _scroll_to_line(self, absolute: int, center: bool) -> None:
        if self.wrap:
            row = next((i for i, (line, _) in enumerate(self._rows) if line == absolute), 0)
        else:
            row = absolute - self._first
        height = self.scrollable_content_region.height or self.size.height
        y = row - height // 2 if center else row
        # force: the virtual size may have grown in this same call (see _scroll_to_end).
        self.scroll_to(y=max(0, min(y, max(0, self.virtual_size.height - height))),
                       animate=False, force=True)

    # ---- scrolling by hand turns following off ----------------------------------------------

    def action_scroll_up(self) -> None:
        self.following = False
        super().action_scroll_up()

    def action_page_up(self) -> None:
        self.following = False
        super().action_page_up()

    def action_scroll_home(self) -> None:
        self.following = False
        super().action_scroll_home()

    def action_scroll_end(self) -> None:
        self.following = True

    def on_mouse_scroll_up(self) -> None:
        self.following = False

    # ---- rendering --------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._base = None

    def _styled(self, absolute: int) -> Text:
        line, note = self._lines[absolute - self._first]
        text = Text(line, no_wrap=True, end="")
        if note:
            text.stylize(self.get_component_rich_style("log-view--note", partial=True))
        if self._search:
            style = self.get_component_rich_style(
                "log-view--current-match" if absolute == self._match else "log-view--match",
                partial=True)
            folded, size, at = line.casefold(), len(self._search), 0
            if len(folded) == len(line):  # casefold may change lengths (ß); then no highlight
                while (at := folded.find(self._search, at)) >= 0:
                    text.stylize(style, at, at + size)
                    at += size
        return text

    def _strip(self, absolute: int, piece: int, base: Style) -> Strip:
        key = (absolute, piece)
        cached = self._strips.get(key)
        if cached is not None:
            return cached
        text = self._styled(absolute)
        if self.wrap:
            pieces = _chunks(text.plain, self._rows_width)
            offsets, at = [], 0
            for chunk in pieces[:-1]:
                at += len(chunk)
                offsets.append(at)
            text = text.divide(offsets)[min(piece, len(pieces) - 1)] if offsets else text
        text.stylize_before(base)
        strip = Strip(text.render(self.app.console), _width(text.plain))
        self._strips[key] = strip
        return strip

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width or self.size.width
        if self._base is None:
            self._base = self.rich_style
        base = self._base
        row = scroll_y + y
        if self.wrap:
            if row >= len(self._rows):
                return Strip.blank(width, base)
            absolute, piece = self._rows[row]
            return self._strip(absolute, piece, base).extend_cell_length(width, base)
        if row >= len(self._lines):
            return Strip.blank(width, base)
        strip = self._strip(self._first + row, 0, base)
        return strip.crop_extend(scroll_x, scroll_x + width, base)
