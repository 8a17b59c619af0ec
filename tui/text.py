"""Make remote text inert before it reaches the screen: no escape sequences, no control chars."""

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


def sanitize(line: str) -> str:
    """`line` without escape sequences or control characters (tabs stay); CR in the middle of
    a line becomes a space so nothing can overwrite what came before it."""
    if line.isprintable():  # the common case, in C: no escape, control or format character
        return line
    line = _ESCAPES.sub("", line).rstrip("\r\n")
    line = line.replace("\r", " ").replace("\n", " ")
    return _CONTROLS.sub("", line)
