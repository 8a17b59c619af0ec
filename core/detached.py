"""Detached processes on a node: start in their own process group with a pidfile and a log file
under a state directory, find them again from any later session, stop the whole group.

Everything here builds POSIX sh scripts (quoted by core.shell) and parses their answers; the
transport runs them. The scripts print one `TORBIZ <word> ...` line that says what happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .shell import path_word, quote, quote_argv
from .transport import Transport, TransportError

LOG_NAME = "log"
PID_NAME = "pid"

# `alive` is true when the pidfile names a live, non-zombie process that started when we
# recorded it: a pid reused after a reboot is never mistaken for our worker (nor killed).
_PRELUDE = r"""
d=__DIR__
alive() {
  [ -s "$d/pid" ] || return 1
  p=$(cat "$d/pid")
  case $p in ''|*[!0-9]*) return 1;; esac
  kill -0 "$p" 2>/dev/null || return 1
  if command -v ps >/dev/null 2>&1; then
    s=$(ps -o stat= -p "$p" 2>/dev/null)
    case $s in Z*) return 1;; esac
    if [ -s "$d/pid.start" ]; then
      [ "$(ps -o lstart= -p "$p" 2>/dev/null)" = "$(cat "$d/pid.start")" ] || return 1
    fi
  fi
  return 0
}
# Zombies do not count: an init that reaps slowly must not make a stopped group look alive.
group_alive() {
  if command -v ps >/dev/null 2>&1; then
    ps -eo pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'
  else
    kill -0 -"$1" 2>/dev/null
  fi
}
"""

_SPAWN = r"""
mkdir -p "$d" 2>/dev/null || { echo "TORBIZ error cannot create $d"; exit 3; }
if alive; then echo "TORBIZ running $p"; exit 0; fi
probe=$(printf '%s' "torbiz-start $(date)" 2>/dev/null)
( printf '%s\n' "$probe" >> "$d/log" ) 2>/dev/null || {
  echo "TORBIZ error cannot write $d/log (disk full or read-only?)"; exit 3; }
command -v setsid >/dev/null 2>&1 || {
  echo "TORBIZ error setsid not found (install util-linux)"; exit 3; }
__CHECK__
sig=""; env --default-signal=INT,QUIT true 2>/dev/null && sig="env --default-signal=INT,QUIT"
buf=""; command -v stdbuf >/dev/null 2>&1 && buf="stdbuf -oL -eL"
cd "$d" || exit 3
__ENV__ setsid $sig $buf __ARGV__ >> "$d/log" 2>&1 < /dev/null &
p=$!
{ echo "$p" > "$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"; } 2>/dev/null || {
  kill -KILL -$p 2>/dev/null; echo "TORBIZ error cannot write $d/pid (disk full?)"; exit 3; }
if command -v ps >/dev/null 2>&1; then ps -o lstart= -p "$p" > "$d/pid.start" 2>/dev/null; fi
echo "TORBIZ started $p"
"""

_STATUS = r"""
if alive; then echo "TORBIZ running $p"
elif [ -s "$d/pid" ]; then echo "TORBIZ dead $(cat "$d/pid" | tr -cd 0-9)"
else echo "TORBIZ none"; fi
"""

_STOP = r"""
if ! alive; then rm -f "$d/pid" "$d/pid.start"; echo "TORBIZ stopped none"; exit 0; fi
kill -__SIG__ -"$p" 2>/dev/null || kill -__SIG__ "$p" 2>/dev/null
i=0
while group_alive "$p" && [ $i -lt __TICKS__ ]; do sleep 0.1; i=$((i+1)); done
if group_alive "$p"; then
  kill -KILL -"$p" 2>/dev/null
  i=0; while group_alive "$p" && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
fi
if group_alive "$p"; then echo "TORBIZ left $p"; exit 4; fi
rm -f "$d/pid" "$d/pid.start"
echo "TORBIZ stopped $p"
"""


@dataclass(frozen=True)
class ProcessState:
    """What the pidfile says: `running`, `dead` (it existed and is gone) or `none`."""

    state: str
    pid: int | None = None
    error: str = ""


def _script(template: str, state_dir: str, **subs: str) -> str:
    text = _PRELUDE.replace("__DIR__", path_word(state_dir)) + template
    for key, value in subs.items():
        text = text.replace(f"__{key}__", value)
    return text


def _answer(transport: Transport, stdout: str, stderr: str) -> tuple[str, str]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("TORBIZ "):
            word, _, rest = line[len("TORBIZ "):].partition(" ")
            return word, rest.strip()
    detail = (stderr.strip().splitlines() or ["no answer"])[-1][:200]
    raise TransportError(transport.label, f"unexpected answer from the node's shell: {detail}",
                         kind="protocol")


def _pid(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def spawn_script(state_dir: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 check: str = ":") -> str:
    env_words = " ".join(quote(f"{k}={v}") for k, v in (env or {}).items())
    return _script(_SPAWN, state_dir, ARGV=quote_argv(argv),
                   ENV=f"env {env_words}" if env_words else "", CHECK=check)


async def spawn(transport: Transport, state_dir: str, argv: Sequence[str],
                env: Mapping[str, str] | None = None, check: str = ":") -> ProcessState:
    """Start argv detached unless the pidfile names a live copy; `check` is sh run first
    (it may print `TORBIZ error ...` and exit to refuse)."""
    result = await transport.run(spawn_script(state_dir, argv, env, check))
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word in ("started", "running"):
        return ProcessState("running", _pid(rest))
    return ProcessState("none", None, rest or "could not start")


async def status(transport: Transport, state_dir: str) -> ProcessState:
    result = await transport.run(_script(_STATUS, state_dir))
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word == "running":
        return ProcessState("running", _pid(rest))
    if word == "dead":
        return ProcessState("dead", _pid(rest))
    return ProcessState("none")


async def stop(transport: Transport, state_dir: str, *, signal: str = "TERM",
               grace: float = 5.0) -> ProcessState:
    """Signal the whole process group, KILL after `grace` seconds, verify nothing is left."""
    if signal not in ("TERM", "INT", "KILL"):
        raise ValueError(f"unsupported signal {signal}")
    ticks = str(max(1, int(grace * 10)))
    result = await transport.run(_script(_STOP, state_dir, SIG=signal, TICKS=ticks),
                                 timeout=grace + 30)
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word == "stopped":
        return ProcessState("none", _pid(rest))
    return ProcessState("running", _pid(rest),
                        f"process group {rest} still alive after KILL")


async def log_tail(transport: Transport, state_dir: str, lines: int = 20) -> list[str]:
    script = f"tail -n {int(lines)} {path_word(state_dir)}/{LOG_NAME} 2>/dev/null || true"
    result = await transport.run(script)
    return result.stdout.splitlines()


def follow_script(state_dir: str, lines: int) -> str:
    log = f"{path_word(state_dir)}/{LOG_NAME}"
    return f"tail -n {int(lines)} -F {log} 2>/dev/null"
