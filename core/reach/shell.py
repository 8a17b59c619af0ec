"""The one place where remote commands are quoted: argument lists in, POSIX sh text out."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def quote(word: str) -> str:
    """One shell word, inert whatever it contains."""
    if "\0" in word:
        raise ValueError("a NUL byte cannot be passed to a remote command")
    return shlex.quote(word)


def quote_argv(argv: Sequence[str]) -> str:
    return " ".join(quote(str(a)) for a in argv)


def path_word(path: str) -> str:
    """A path as a shell word; a leading ~ means the remote user's home, the rest stays inert."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + quote(path[2:])
    return quote(path)


def sh_c(script: str) -> str:
    """A command line that runs `script` under POSIX sh whatever the login shell is."""
    return "exec sh -c " + quote(script)
