"""Make remote text inert before it reaches the screen: the one sanitizer lives in core.text;
`sanitize` is its name for the widgets that already import it from here."""

from __future__ import annotations

from core.text import terminal_safe as sanitize

__all__ = ["css_name", "sanitize"]


def css_name(state: str) -> str:
    """A state as a CSS class suffix (`not responding` -> `not-responding`)."""
    return state.replace(" ", "-")
