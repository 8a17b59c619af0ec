"""Checks of single values in the cluster file: types, ranges, names, hosts, paths. Each raises
ConfigError naming the file, the table and the key; core/config.py applies them table by
table."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

from core.config_model import ConfigError

# Patterns are used with fullmatch and end in \Z: `$` would also match before a final newline.
# Names become directory names on nodes: keep them boring.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
# A DNS name (labels of letters, digits, hyphens), never starting with "-" (ssh option injection).
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)

TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list"}


def expect_table(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, where, f"must be a table, got {type(value).__name__}")
    return value


# TOML integers are 64-bit; tomllib reads any size, and float(10**400) raises.
INT_RANGE = (-(1 << 63), (1 << 63) - 1)
# Text that would rewrite a terminal line or reorder what the operator reads.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067"
                           "\u2068\u2069")


def has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in text)


def check_value(path: Path, where: str, key: str, value: Any) -> None:
    """No value carries control characters (NUL, newline, escape, bidi overrides) or an
    integer outside TOML's 64-bit range, lists included."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str) and has_control(item):
            raise ConfigError(path, where, f"key {key!r} contains a control character (a NUL, "
                                           f"newline, escape or bidi override): {item!r}")
        if (isinstance(item, int) and not isinstance(item, bool)
                and not INT_RANGE[0] <= item <= INT_RANGE[1]):
            raise ConfigError(path, where, f"key {key!r} is too large a number (TOML integers "
                                           f"are 64-bit), got {str(item)[:20]}...")


def check_keys(path: Path, where: str, table: dict[str, Any],
                schema: dict[str, tuple[type, ...]]) -> None:
    for key, value in table.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise ConfigError(path, where, f"unknown key {key!r} (allowed: {allowed})")
        types = schema[key]
        # bool is an int in Python; never accept true where a number is meant.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            wanted = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ConfigError(path, where, f"key {key!r} must be {wanted}, got {value!r}")
        check_value(path, where, key, value)


def check_port(path: Path, where: str, key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(path, where, f"key {key!r} must be a port between 1 and 65535, "
                                       f"got {value}")
    return value


def is_valid_host(host: str) -> bool:
    """A hostname or an IP literal; nothing a shell or ssh could read as syntax or an option."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.fullmatch(host))


def check_host(path: Path, where: str, key: str, value: str) -> str:
    if not is_valid_host(value):
        raise ConfigError(path, where, f"key {key!r} must be a host name or IP address, "
                                       f"got {value!r}")
    return value


def check_name(path: Path, where: str, key: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ConfigError(path, where, f"key {key!r} must be 1-63 letters, digits, '.', '_' or "
                                       f"'-' starting with a letter or digit, got {value!r}")
    return value


# Upper bounds that no real cluster reaches; they keep absurd numbers out of command lines.
LIMITS = {"threads": 4096, "context": 1 << 24, "keepalive_count_max": 1000,
           "connect_timeout": 3600, "keepalive_interval": 3600, "max_memory_gb": 1 << 20,
           "reserve_gb": 1 << 20, "weight": 1e6}


def check_positive(path: Path, where: str, key: str, value: float, *,
                    allow_zero: bool = False) -> None:
    limit = LIMITS.get(key, float("inf"))
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= limit):
        bound = "0 or more" if allow_zero else "greater than 0"
        raise ConfigError(path, where, f"key {key!r} must be a number {bound} and at most "
                                       f"{limit:g}, got {value}")


def check_path(path: Path, where: str, key: str, value: str, *, local: bool) -> str:
    """A non-empty path. `~/` is the home of the user who runs it (here, or on the node);
    `~user/` only on this machine (`local`) and for a user it knows: a node's shell is never
    asked to expand it."""
    if not value:
        raise ConfigError(path, where, f"key {key!r} must be a non-empty path")
    if value.startswith("~") and value != "~" and not value.startswith("~/"):
        user = value[1:].split("/", 1)[0]
        if not local:
            raise ConfigError(path, where, f"key {key!r} starts with ~{user}: only ~/ (the "
                                           "login user's home) is understood on a node; write "
                                           f"the full path, got {value!r}")
        if os.path.expanduser(value) == value:
            raise ConfigError(path, where, f"key {key!r} names the home of user {user!r}, who "
                                           f"is not known on this machine, got {value!r}")
    return value


def local_file(path: Path, where: str, key: str, value: str) -> Path:
    """A path on this machine, with ~ expanded and relative paths taken from the config's
    directory."""
    expanded = Path(check_path(path, where, key, value, local=True)).expanduser()
    return expanded if expanded.is_absolute() else (path.parent / expanded).resolve()
