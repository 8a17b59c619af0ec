"""Detached processes on a node: start in their own process group with a pidfile and a log file
under a state directory, find them again from any later session, stop the whole group.

Everything here builds POSIX sh scripts (quoted by core.reach.shell) and parses their answers; the
transport runs them. The scripts print one `TORBIZ <word> ...` line that says what happened.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from core.reach.shell import path_word, quote, quote_argv
from core.reach.transport import Transport, TransportError

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
# Does a socket listen on TCP port $port at one of the /proc/net/tcp addresses in $addrs
# (empty: any address)? Asked on the node itself: a probe connection from outside would sit
# in a busy worker's one-slot backlog. 0 yes, 1 no, 2 cannot tell (no /proc).
# One fork per check: these run in a polling loop. (A sh `read` loop would be slower:
# dash reads /proc one byte per syscall, and busy hosts list thousands of sockets.)
port=__PORT__
hexport=__HEXPORT__
addrs=__ADDRS__
listening() {
  [ -r /proc/net/tcp ] || return 2
  tables=/proc/net/tcp
  [ -r /proc/net/tcp6 ] && tables="$tables /proc/net/tcp6"
  awk -v h="$hexport" -v want=" $addrs " '$4 == "0A" { n = split($2, a, ":")
      if (a[n] == h && (want == "  " || index(want, " " a[1] " "))) f = 1 }
      END { exit !f }' $tables 2>/dev/null
}
zombie() {
  if [ -r "/proc/$1/stat" ]; then
    read -r _ _ st _ < "/proc/$1/stat" 2>/dev/null && [ "$st" = Z ]
  else
    [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" = Z ]
  fi
}
# Sets $pstate to "listening", "closed" or "unknown" for $port.
port_state() {
  if [ -z "$port" ]; then pstate=unknown; return; fi
  listening
  case $? in 0) pstate=listening;; 1) pstate=closed;; *) pstate=unknown;; esac
}
"""

_SPAWN = r"""
mkdir -p "$d" 2>/dev/null || { echo "TORBIZ error cannot create $d"; exit 3; }
if alive; then port_state; echo "TORBIZ running $p $pstate"; exit 0; fi
port_state
if [ "$pstate" = listening ]; then echo "TORBIZ taken"; exit 0; fi
probe=$(printf '%s' "torbiz-start $(date)" 2>/dev/null)
( printf '%s\n' "$probe" >> "$d/log" ) 2>/dev/null || {
  echo "TORBIZ error cannot write $d/log (disk full or read-only?)"; exit 3; }
command -v setsid >/dev/null 2>&1 || {
  echo "TORBIZ error setsid not found (install util-linux)"; exit 3; }
__RESOLVE__
sig=""; env --default-signal=INT,QUIT true 2>/dev/null && sig="env --default-signal=INT,QUIT"
buf=""; command -v stdbuf >/dev/null 2>&1 && buf="stdbuf -oL -eL"
cd "$d" || exit 3
__ENV__ setsid $sig $buf __PROGRAM__ __ARGV__ >> "$d/log" 2>&1 < /dev/null &
p=$!
{ echo "$p" > "$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"; } 2>/dev/null || {
  kill -KILL -$p 2>/dev/null; echo "TORBIZ error cannot write $d/pid (disk full?)"; exit 3; }
if command -v ps >/dev/null 2>&1; then ps -o lstart= -p "$p" > "$d/pid.start" 2>/dev/null; fi
# Wait briefly in this same round trip for the port, or for an early death.
i=0
while [ $i -lt __WAITTICKS__ ]; do
  if ! kill -0 "$p" 2>/dev/null || zombie "$p"; then echo "TORBIZ died $p"; exit 0; fi
  port_state
  [ "$pstate" = closed ] || { echo "TORBIZ started $p $pstate"; exit 0; }
  sleep 0.02; i=$((i+1))
done
echo "TORBIZ started $p closed"
"""

_STATUS = r"""
port_state
if alive; then echo "TORBIZ running $p $pstate $(ps -o etimes= -p "$p" 2>/dev/null | tr -cd 0-9)"
elif [ -s "$d/pid" ]; then echo "TORBIZ dead $(cat "$d/pid" | tr -cd 0-9) $pstate"
else echo "TORBIZ none - $pstate"; fi
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


# Like _STOP, but first records the main pid's descendants: some leave the group on their own
# (torch's torch_shm_manager calls setsid()), so a group signal never reaches them.
_STOP_TREE = r"""
if ! alive; then rm -f "$d/pid" "$d/pid.start"; echo "TORBIZ stopped none"; exit 0; fi
desc=$(ps -eo pid=,ppid= 2>/dev/null | awk -v root="$p" '{ parent[$1] = $2 }
  END { for (c in parent) { q = parent[c]; n = 0
          while (q != "" && q != 0 && n < 64) { if (q == root) { print c; break }
                                                q = parent[q]; n++ } } }')
desc_alive() {
  for c in $desc; do
    kill -0 "$c" 2>/dev/null && ! zombie "$c" && return 0
  done
  return 1
}
kill -__SIG__ "$p" 2>/dev/null
i=0
while { group_alive "$p" || desc_alive; } && [ $i -lt __TICKS__ ]; do sleep 0.1; i=$((i+1)); done
if group_alive "$p" || desc_alive; then
  kill -KILL -"$p" 2>/dev/null
  for c in $desc; do kill -KILL "$c" 2>/dev/null; done
  i=0; while { group_alive "$p" || desc_alive; } && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
fi
if group_alive "$p" || desc_alive; then echo "TORBIZ left $p"; exit 4; fi
rm -f "$d/pid" "$d/pid.start"
echo "TORBIZ stopped $p"
"""


@dataclass(frozen=True)
class ProcessState:
    """What the pidfile says: `running`, `dead` (it existed and is gone), `none`, or `taken`
    (nothing of ours runs but another program listens on the port). `port` is `listening`,
    `closed` or `unknown` (no port given, or the node cannot tell)."""

    state: str
    pid: int | None = None
    error: str = ""
    port: str = "unknown"
    elapsed_s: int | None = None  # seconds since the process started (ps etimes), if known


def _running(rest: str) -> ProcessState:
    pid, _, rest = rest.partition(" ")
    port, _, elapsed = rest.strip().partition(" ")
    return ProcessState("running", _pid(pid), "", port.strip() or "unknown",
                        int(elapsed) if elapsed.strip().isdigit() else None)


def _script(template: str, state_dir: str, **subs: str) -> str:
    # One pass: text substituted in is never scanned again, whatever it contains.
    subs["DIR"] = path_word(state_dir)
    for key, value in _listen_subs(None).items():
        subs.setdefault(key, value)
    return re.sub(r"__([A-Z]+)__", lambda m: subs[m.group(1)], _PRELUDE + template)


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


Listen = tuple[str, int]  # (IPv4 bind address, port) a process is expected to listen on


def _proc_net_addresses(bind: str) -> list[str]:
    """How /proc/net/tcp{,6} spells the addresses that conflict with binding `bind`: the
    address itself (either byte order: the kernel prints host order) and the wildcards."""
    if bind in ("0.0.0.0", ""):
        return []  # any listener on the port conflicts
    raw = ipaddress.IPv4Address(bind).packed
    little = raw[::-1].hex().upper()
    return sorted({raw.hex().upper(), little, "00000000", "0" * 32})


def _listen_subs(listen: Listen | None) -> dict[str, str]:
    if listen is None:
        return {"PORT": '""', "HEXPORT": '""', "ADDRS": '""'}
    bind, port = listen
    return {"PORT": str(int(port)), "HEXPORT": f"{int(port):04X}",
            "ADDRS": quote(" ".join(_proc_net_addresses(bind)))}


def spawn_script(state_dir: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 resolve: str | None = None, listen: Listen | None = None,
                 wait: float = 2.0) -> str:
    env_words = " ".join(quote(f"{k}={v}") for k, v in (env or {}).items())
    return _script(_SPAWN, state_dir, ARGV=quote_argv(argv),
                   ENV=f"env {env_words}" if env_words else "",
                   RESOLVE=resolve or ":", PROGRAM='"$bin"' if resolve else "",
                   WAITTICKS=str(max(1, int(wait * 50))), **_listen_subs(listen))


async def spawn(transport: Transport, state_dir: str, argv: Sequence[str],
                env: Mapping[str, str] | None = None, resolve: str | None = None,
                listen: Listen | None = None) -> ProcessState:
    """Start argv detached unless the pidfile names a live copy, in one round trip.

    With `resolve`, sh code that sets $bin on the node (or prints `TORBIZ error WORD` and
    exits), the program is "$bin" and argv holds only its arguments. With `listen`, refuses
    (`taken`) when another program listens there, and waits up to 2 s for it to listen."""
    result = await transport.run(spawn_script(state_dir, argv, env, resolve, listen))
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word in ("started", "running"):
        return _running(rest)
    if word == "died":
        return ProcessState("dead", _pid(rest))
    if word == "taken":
        return ProcessState("taken")
    return ProcessState("none", None, rest or "could not start")


async def status(transport: Transport, state_dir: str,
                 listen: Listen | None = None) -> ProcessState:
    result = await transport.run(_script(_STATUS, state_dir, **_listen_subs(listen)))
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word == "running":
        return _running(rest)
    if word == "dead":
        return replace(_running(rest), state="dead")
    return replace(_running(rest), state="none", pid=None)


async def stop(transport: Transport, state_dir: str, *, signal: str = "TERM",
               grace: float = 5.0, tree: bool = False) -> ProcessState:
    """Signal the whole process group, KILL after `grace` seconds, verify nothing is left.
    With `tree`, signal only the main pid (a program that shuts its children down itself),
    and KILL the group and every descendant recorded before the signal when they outlive
    the grace period."""
    if signal not in ("TERM", "INT", "KILL"):
        raise ValueError(f"unsupported signal {signal}")
    ticks = str(max(1, int(grace * 10)))
    result = await transport.run(_script(_STOP_TREE if tree else _STOP, state_dir, SIG=signal,
                                         TICKS=ticks),
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
