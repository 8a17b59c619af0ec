"""Remote text made inert where it enters core: no escape sequences, no control characters.

A node's log, a tool's output, an SSH server's DISCONNECT text: anything a node sends can hold
terminal controls (OSC 52 writes the clipboard, OSC 0 retitles the window, CSI 2J clears the
screen, CR and backspaces overwrite what came before, bidi overrides reorder what is shown).
Everything that reaches an operator goes through terminal_safe() once, in core; the TUI and
the headless output may call it again (it is idempotent).
"""

from __future__ import annotations

import re

# One alternation, longest forms first, so a sequence is removed whole and never half-parsed.
# 7-bit (ESC x) and 8-bit (C1) introducers are both handled: a terminal may honour either.
_ESCAPES = re.compile(
    r"""
    (?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c|$)          # OSC ... BEL or ST (or EOL)
  | (?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c|$)  # DCS SOS PM APC ... ST
  | (?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?             # CSI params final
  | \x1b[\x20-\x2f]*[\x30-\x7e]?                                    # other ESC sequences
    """,
    re.VERBOSE,
)
# C0 controls except tab, DEL, C1 controls, and the bidi overrides that reorder what is shown.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` as one line without escape sequences or control characters (tabs stay); CR or LF
    in the middle becomes a space so nothing can overwrite what came before it."""
    if text.isprintable():  # the common case, in C: no escape, control or format character
        return text
    text = _ESCAPES.sub("", text).rstrip("\r\n")
    text = text.replace("\r", " ").replace("\n", " ")
    return _CONTROLS.sub("", text)
