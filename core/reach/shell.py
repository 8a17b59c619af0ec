"""The one place where remote commands are quoted: argument lists in, POSIX sh text out."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

# sshd hands a command to the node's LOGIN shell (`$SHELL -c COMMAND`): fish, csh, tcsh, zsh,
# dash or bash read it first, and they quote differently. So the line sent is constant text
# that every one of them parses the same way, and the script rides in it as a printf format:
# letters as themselves, every other byte as a three-digit octal escape (`\ddd`, POSIX printf),
# in single-quoted words of at most _WORD characters (csh refuses words of about 8 KiB).
# Only sh decodes it; the login shell sees words of letters, digits and backslashes followed
# by digits, which no shell interprets inside single quotes. printf is built into every sh (and
# a POSIX utility besides): no base64 or openssl is needed on the node. `set --` first: the
# script sees no positional parameters, as under `sh -c SCRIPT`. Descriptors 3-9 closed: csh
# leaves copies of the session's stdin/stdout/stderr there, and a detached worker holding
# them would keep the SSH channel open for its whole life.
_DECODE = ("exec sh -c 'exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; "
           "eval \"set --; $(for w in \"$@\"; do printf \"$w\"; done)\"' sh")
_WORD = 4000
# The login shell's `-c` argument must fit the kernel's limit for one argument (128 KiB).
MAX_COMMAND = 120_000


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


def printf_words(script: str) -> list[str]:
    """`script` as printf formats that print it byte for byte when printed one after the
    other: [A-Za-z] and `\\ddd` only, at most _WORD characters each (never a split escape)."""
    if "\0" in script:
        raise ValueError("a NUL byte cannot be passed to a remote command")
    words: list[str] = []
    word: list[str] = []
    size = 0
    for b in script.encode("utf-8", "surrogateescape"):
        unit = chr(b) if chr(b).isascii() and chr(b).isalpha() else f"\\{b:03o}"
        if size + len(unit) > _WORD:
            words.append("".join(word))
            word, size = [], 0
        word.append(unit)
        size += len(unit)
    if word or not words:
        words.append("".join(word))
    return words


def sh_c(script: str) -> str:
    """A command line that runs `script` under POSIX sh whatever the login shell is (sh,
    bash, zsh, fish, csh, tcsh): only sh ever parses the script."""
    command = _DECODE + "".join(f" '{word}'" for word in printf_words(script))
    if len(command) > MAX_COMMAND:
        raise ValueError(f"a remote script of {len(script)} bytes is too long to send "
                         f"({len(command)} bytes encoded; the limit is {MAX_COMMAND})")
    return command
