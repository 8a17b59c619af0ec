"""Detached processes on a node: start in their own process group with a pidfile and a log file
under a state directory, find them again from any later session, stop the whole group.

Everything here builds POSIX sh scripts (quoted by core.reach.shell) and parses their answers; the
transport runs them. The scripts print one `TORBIZ <word> ...` line that says what happened.
They run under dash, bash and BusyBox sh, with GNU or BusyBox tools (BusyBox `ps` has no `-p`
and no `-o lstart`: /proc is read instead), and where there is no /proc, with BSD `ps`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from core.reach.shell import path_word, quote, quote_argv
from core.reach.transport import MAX_LINE, Transport, TransportError
from core.text import terminal_safe

LOG_NAME = "log"
PID_NAME = "pid"
TAIL_BYTES = 262144  # bytes of a log's end read for a tail, on the node (a line may be huge)

# Every script: new files private (logs may hold secrets), the state directory checked before
# anything in it is trusted, and a pid signalled only when it is verifiably the process we
# started.
#
# The pidfile is one line written to a temporary file and renamed: `PID proc TICKS BOOTID`
# (start time in clock ticks since boot, /proc/PID/stat field 22, and the boot id), or
# `PID ps LSTART` where there is no /proc (macOS). `check` reads it and sets $verdict:
#   none        no pidfile
#   ours        that process runs and started when we recorded it
#   gone        it ended, is a zombie, or the node rebooted since
#   other       the pid now names another process (same boot, another start time)
#   unverified  the record cannot be checked (no start time, pid <= 1, garbage, a symlink):
#               nothing is signalled, $why says why
# A pidfile from an older torbiz (pid alone, `ps -o lstart` in pid.start) is checked against
# pid.start; without it, it is unverified.
_PRELUDE = r"""
umask 077
d=__DIR__
me=$(id -u)
# Sets $om_mode and $om_uid of path $1 (ls -ldn works with GNU, BusyBox and BSD ls).
owner_mode() {
  om_mode=; om_uid=
  x=$(ls -ldn -- "$1" 2>/dev/null) || return 1
  set -f; set -- $x; set +f
  om_mode=$1; om_uid=$3
}
# Can nobody but us and root change directory $1? (group- or world-writable only if sticky)
dir_safe() {
  owner_mode "$1" || return 1
  case $om_uid in "$me"|0) ;; *) return 1;; esac
  case $om_mode in
    d????????[tT]*) return 0;; d????w????*|d???????w?*) return 1;; d*) return 0;; esac
  return 1
}
# The state dir must be a real directory of ours that only we can change, and so must be
# every directory above it (root's, or sticky ones like /tmp, are fine there): otherwise
# another user could plant a pid or a symlink. Sets $why.
state_safe() {
  if [ -L "$d" ] || [ ! -d "$d" ]; then why="$d is not a directory (a symbolic link?)"; return 1; fi
  owner_mode "$d"
  if [ "$om_uid" != "$me" ]; then
    why="$d belongs to uid ${om_uid:-?}, not to this login (uid $me)"; return 1; fi
  case $om_mode in d????w????*|d???????w?*) why="$d is writable by other users"; return 1;; esac
  up=$(cd -P -- "$d" && pwd -P) || { why="cannot enter $d"; return 1; }
  while :; do
    up=${up%/*}; [ -n "$up" ] || up=/
    dir_safe "$up" || { why="$up (above $d) can be changed by another user"; return 1; }
    [ "$up" = / ] && break
  done
  chmod 700 "$d" 2>/dev/null
  return 0
}
# Sets $ps_state, $ps_ppid and $ps_start (clock ticks since boot) of pid $1 from /proc.
proc_stat() {
  ps_state=; ps_start=; st=
  [ -r "/proc/$1/stat" ] || return 1
  IFS= read -r st 2>/dev/null < "/proc/$1/stat" || [ -n "$st" ] || return 1
  st=${st##*") "}
  set -f; set -- $st; set +f
  [ $# -ge 20 ] || return 1
  ps_state=$1; ps_ppid=$2; shift 19; ps_start=$1
}
boot_id() {
  b=; f=/proc/sys/kernel/random/boot_id
  [ -r $f ] && read -r b 2>/dev/null < $f
  [ -n "$b" ] && printf '%s\n' "$b"
}
lstart() {
  x=$(ps -o lstart= -p "$1" 2>/dev/null) || return 1
  set -f; set -- $x; set +f
  [ $# -gt 0 ] && printf '%s\n' "$*"
}
# The start record of live pid $1: "proc TICKS BOOTID" or "ps LSTART"; fails when neither works.
start_record() {
  if b=$(boot_id) && proc_stat "$1"; then echo "proc $ps_start $b"
  elif s=$(lstart "$1"); then echo "ps $s"
  else return 1; fi
}
zombie() {
  if proc_stat "$1"; then [ "$ps_state" = Z ]
  else [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" = Z ]; fi
}
check() {
  p=; why=; verdict=none
  if [ -L "$d/pid" ]; then verdict=unverified; why="$d/pid is a symbolic link"; return; fi
  [ -e "$d/pid" ] || return
  rec=; IFS= read -r rec 2>/dev/null < "$d/pid"
  set -f; set -- $rec; set +f
  case ${1:-} in
    ''|*[!0-9]*|0*|????????*) verdict=unverified; why="$d/pid holds no pid"; return;;
  esac
  p=$1; shift
  if [ "$p" -le 1 ]; then verdict=unverified; why="$d/pid names pid $p"; return; fi
  if ! kill -0 "$p" 2>/dev/null || zombie "$p"; then verdict=gone; return; fi
  case ${1:-} in
    proc)
      if ! b=$(boot_id); then verdict=unverified; why="the boot id cannot be read"; return; fi
      if [ "${3:-}" != "$b" ]; then verdict=gone; return; fi
      proc_stat "$p" || { verdict=gone; return; }
      if [ "$ps_start" = "${2:-}" ]; then verdict=ours; else verdict=other; fi;;
    ps)
      shift
      if ! now=$(lstart "$p"); then
        verdict=unverified; why="ps cannot tell when pid $p started"; return; fi
      if [ "$now" = "$*" ]; then verdict=ours; else verdict=other; fi;;
    *)
      if [ -s "$d/pid.start" ] && [ ! -L "$d/pid.start" ] && now=$(lstart "$p"); then
        want=$(cat "$d/pid.start"); set -f; set -- $want; set +f
        if [ "$now" = "$*" ]; then verdict=ours; else verdict=other; fi
      else
        verdict=unverified
        why="$d/pid records no start time for pid $p (an older torbiz, or written by hand)"
      fi;;
  esac
}
alive() { check; [ "$verdict" = ours ]; }
# Seconds since process $p started, from /proc (or ps where it can tell).
elapsed() {
  if [ -n "$ps_start" ] && [ -r /proc/uptime ]; then
    read -r up _ < /proc/uptime; up=${up%.*}
    hz=$(getconf CLK_TCK 2>/dev/null); case $hz in ''|*[!0-9]*|0) hz=100;; esac
    echo $((up - ps_start / hz))
  else ps -o etimes= -p "$p" 2>/dev/null | tr -cd 0-9; fi
}
# CPU time of process $p's main thread (utime + stime, in hundredths of a second), from /proc;
# "-" where there is none. The main thread of rpc-server and llama-server is the one that
# computes (thread 0 of every graph) and waits on its socket in between.
cpu() {
  if [ -r "/proc/$p/task/$p/stat" ]; then
    hz=$(getconf CLK_TCK 2>/dev/null); case $hz in ''|*[!0-9]*|0) hz=100;; esac
    sed 's/.*) //' "/proc/$p/task/$p/stat" 2>/dev/null |
      awk -v hz="$hz" '{ if ($12 ~ /^[0-9]+$/) printf "%d", ($12 + $13) * 100 / hz
                         else print "-" }'
  else echo -; fi
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
# Sets $pstate to "listening", "closed" or "unknown" for $port.
port_state() {
  if [ -z "$port" ]; then pstate=unknown; return; fi
  listening
  case $? in 0) pstate=listening;; 1) pstate=closed;; *) pstate=unknown;; esac
}
"""

# The state dir of status and stop: absent means nothing of ours; unsafe means refuse.
_EXISTING_DIR = r"""
if [ ! -e "$d" ] && [ ! -L "$d" ]; then port_state; echo "TORBIZ none - $pstate"; exit 0; fi
state_safe || { echo "TORBIZ unsafe $why"; exit 0; }
"""

_SPAWN = r"""
if [ ! -e "$d" ] && [ ! -L "$d" ]; then
  mkdir -p "$d" 2>/dev/null || { echo "TORBIZ error cannot create $d"; exit 3; }
fi
state_safe || { echo "TORBIZ unsafe $why"; exit 0; }
check
case $verdict in
  ours) port_state; echo "TORBIZ running $p $pstate"; exit 0;;
  unverified) if [ -n "$p" ]; then echo "TORBIZ unverified $p $why"; exit 0; fi;;
esac
start_record $$ >/dev/null || {
  echo "TORBIZ error cannot record start times here (no /proc, and ps has no -o lstart)"
  exit 3; }
port_state
if [ "$pstate" = listening ]; then echo "TORBIZ taken"; exit 0; fi
for f in log pid pid.tmp; do
  if [ -L "$d/$f" ]; then echo "TORBIZ error $d/$f is a symbolic link"; exit 3; fi
done
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
# The record is whole or absent: written aside (never through a planted file), then renamed.
if rec=$(start_record "$p"); then
  rm -f "$d/pid.tmp" "$d/pid.start"
  { ( set -C; printf '%s %s\n' "$p" "$rec" > "$d/pid.tmp" ) && mv -f "$d/pid.tmp" "$d/pid"; } \
    2>/dev/null || {
    kill -KILL -$p 2>/dev/null; echo "TORBIZ error cannot write $d/pid (disk full?)"; exit 3; }
elif kill -0 "$p" 2>/dev/null; then
  kill -KILL -$p 2>/dev/null; echo "TORBIZ error cannot read the start time of pid $p"; exit 3
fi
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

_STATUS = _EXISTING_DIR + r"""
port_state
check
case $verdict in
  ours) e=$(elapsed); echo "TORBIZ running $p $pstate ${e:--} $(cpu)";;
  gone|other) echo "TORBIZ dead $p $pstate";;
  unverified) echo "TORBIZ unverified ${p:--} $why";;
  *) echo "TORBIZ none - $pstate";;
esac
"""

# What stop says when it signals nothing: `stopped none` (nothing of ours runs) or a refusal.
_STOP_CHECK = _EXISTING_DIR + r"""
check
case $verdict in
  none|gone) rm -f "$d/pid" "$d/pid.start"; echo "TORBIZ stopped none"; exit 0;;
  other) echo "TORBIZ other $p"; exit 0;;
  unverified) echo "TORBIZ unverified ${p:--} $why"; exit 0;;
esac
[ "$p" -gt 1 ] || { echo "TORBIZ unverified $p refusing to signal pid $p"; exit 0; }
"""

_STOP = _STOP_CHECK + r"""
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
_STOP_TREE = _STOP_CHECK + r"""
desc=$(ps -eo pid=,ppid= 2>/dev/null | awk -v root="$p" '{ parent[$1] = $2 }
  END { for (c in parent) { q = parent[c]; n = 0
          while (q != "" && q != 0 && n < 64) { if (q == root) { if (c > 1) print c; break }
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
    """What the pidfile says: `running`, `dead` (it existed and is gone), `none`, `taken`
    (nothing of ours runs but another program listens on the port), or `unverified` (a record
    that cannot be checked, or a state directory that is not safe: `error` says why, and
    nothing was signalled). `port` is `listening`, `closed` or `unknown` (no port given, or the
    node cannot tell)."""

    state: str
    pid: int | None = None
    error: str = ""
    port: str = "unknown"
    elapsed_s: int | None = None  # seconds since the process started, if known
    cpu_s: float | None = None  # CPU time of its main thread (running only; None: cannot tell)


def _running(rest: str) -> ProcessState:
    pid, _, rest = rest.partition(" ")
    port, _, rest = rest.strip().partition(" ")
    elapsed, _, cpu = rest.strip().partition(" ")
    cpu = cpu.strip()
    return ProcessState("running", _pid(pid), "", port.strip() or "unknown",
                        int(elapsed) if elapsed.strip().isdigit() else None,
                        int(cpu) / 100 if cpu.isdigit() and len(cpu) < 16 else None)


def _refusal(word: str, rest: str, state_dir: str) -> ProcessState | None:
    """The sentence for an answer that signals nothing: an unsafe state directory, a record
    that cannot be verified, or a pid that now names another process."""
    rest = terminal_safe(rest)
    if word == "unsafe":
        return ProcessState("unverified", None,
                            f"refusing to use the state directory: {rest}. Make it a directory "
                            "of this login's that no other user can change (chmod 700), or "
                            "set another state_dir")
    if word == "unverified":
        pid_text, _, why = rest.partition(" ")
        pid = _pid(pid_text)
        what = f"pid {pid}" if pid is not None else "that pid"
        return ProcessState("unverified", pid,
                            f"{why}: {what} cannot be verified as the process torbiz started, "
                            f"so nothing was signalled. Check it yourself (ps -p {pid or 'PID'}),"
                            f" stop it by hand if it is the worker, then remove "
                            f"{state_dir.rstrip('/')}/{PID_NAME}")
    if word == "other":
        pid = _pid(rest)
        return ProcessState("unverified", pid,
                            f"pid {pid} in {state_dir.rstrip('/')}/{PID_NAME} now belongs to "
                            "another process (it started later than ours, which is gone): "
                            "nothing was signalled; remove that file")
    return None


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
    refused = _refusal(word, rest, state_dir)
    if refused is not None:
        return refused
    return ProcessState("none", None, terminal_safe(rest) or "could not start")


async def status(transport: Transport, state_dir: str,
                 listen: Listen | None = None) -> ProcessState:
    result = await transport.run(_script(_STATUS, state_dir, **_listen_subs(listen)))
    word, rest = _answer(transport, result.stdout, result.stderr)
    if word == "running":
        return _running(rest)
    if word == "dead":
        return replace(_running(rest), state="dead")
    refused = _refusal(word, rest, state_dir)
    if refused is not None:
        return refused
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
    if word in ("stopped", "none"):  # none: no state directory, nothing was ever started
        return ProcessState("none", _pid(rest))
    refused = _refusal(word, rest, state_dir)
    if refused is not None:
        return refused
    return ProcessState("running", _pid(rest),
                        f"process group {terminal_safe(rest)} still alive after KILL")


def _log_guard(log: str) -> str:
    # The state directory is checked by spawn; a symlink there is still never followed.
    return (f"if [ -L {log} ]; then echo 'torbiz: the log is a symbolic link; not read'; "
            "exit 0; fi\n")


async def log_tail(transport: Transport, state_dir: str, lines: int = 20, *,
                   raw: bool = False) -> list[str]:
    """The log's last `lines` lines, read from its last TAIL_BYTES on the node, each cut at
    MAX_LINE characters and terminal-safe unless `raw` (`logs --raw` into a pipe)."""
    log = f"{path_word(state_dir)}/{LOG_NAME}"
    script = (_log_guard(log) +
              f"tail -c {TAIL_BYTES} {log} 2>/dev/null | tail -n {int(lines)}; exit 0")
    result = await transport.run(script)
    found = [line[:MAX_LINE] for line in result.stdout.split("\n")]
    if found and not found[-1]:
        found.pop()
    return found if raw else [terminal_safe(line) for line in found]


def follow_script(state_dir: str, lines: int) -> str:
    """sh that prints the log's last `lines` lines, then every line appended (stream it with
    Transport.stream_lines, which caps and sanitizes each line)."""
    log = f"{path_word(state_dir)}/{LOG_NAME}"
    return _log_guard(log) + f"tail -n {int(lines)} -F {log} 2>/dev/null"
