"""Run shell scripts on a node: over SSH (asyncssh) or on this machine (the demo's local nodes).

Every read is bounded: a command's stdout and stderr are read in chunks up to MAX_OUTPUT each,
and a command that prints more is stopped there (CommandResult.truncated); streamed lines are
cut at MAX_LINE bytes. Output is data: run() returns it raw for the parsers, stream_lines()
returns it terminal-safe (core.text) unless asked for raw lines, and every TransportError
reason is terminal-safe, whatever a node or an SSH server sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncssh

from core.config import NodeConfig
from core.reach.shell import sh_c
from core.text import terminal_safe

MAX_OUTPUT = 1 << 20  # bytes read from one command's stdout, and from its stderr
MAX_LINE = 16384  # bytes kept of one streamed line; the rest of that line is dropped
_CHUNK = 65536


NOT_RESPONDING = "not-responding"  # TransportError.kind: connected (or TCP up), but silent
SILENT_KINDS = frozenset({NOT_RESPONDING, "timeout"})
LOST = "lost"  # an open connection broke (nobody said why): unreachable, unless already silent
# connect() errors that mean silence rather than a refusal
SILENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                           errno.EHOSTDOWN})  # a node that did not answer in time


class TransportError(Exception):
    """The node cannot be reached or refused us; the message is a sentence for the operator."""

    def __init__(self, node: str, message: str, *, kind: str = "unreachable") -> None:
        self.node = node
        self.kind = kind
        self.reason = terminal_safe(message)  # it may quote a node or an SSH server
        super().__init__(f"{node}: {self.reason}")


@dataclass(frozen=True)
class CommandResult:
    exit_status: int  # -1 when the command was stopped at the output cap
    stdout: str
    stderr: str
    truncated: bool = False  # it printed more than MAX_OUTPUT: stopped, the rest unread

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Transport:
    """One node's channel to run POSIX sh scripts; subclasses hold at most one connection."""

    is_local = False

    def __init__(self, node: NodeConfig) -> None:
        self.node = node

    @property
    def label(self) -> str:
        return self.node.name

    async def connect(self) -> None:
        raise NotImplementedError

    async def run(self, script: str, *, timeout: float = 30.0) -> CommandResult:
        raise NotImplementedError

    def stream_lines(self, script: str, *, raw: bool = False) -> AsyncIterator[str]:
        """Lines of a long-running script's stdout, each cut at MAX_LINE bytes and made
        terminal-safe unless `raw` (for `logs --raw` into a pipe: escapes pass through); it
        ends when the caller stops iterating."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


Read = Callable[[int], Awaitable[bytes]]


class _Capped:
    """One stream's bytes, read in chunks until EOF or until `cap` bytes (then `over`)."""

    def __init__(self, cap: int = MAX_OUTPUT) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0
        self.over = False

    async def drain(self, read: Read) -> None:
        while not self.over:
            chunk = await read(_CHUNK)
            if not chunk:
                return
            room = self.cap - self.size
            if len(chunk) > room:
                chunk, self.over = chunk[:room], True
            self.parts.append(chunk)
            self.size += len(chunk)

    def text(self) -> str:
        return b"".join(self.parts).decode("utf-8", "replace")


async def _read_both(out: _Capped, err: _Capped, read_out: Read, read_err: Read) -> bool:
    """Read stdout and stderr together (an unread one would stall the other) until both end
    or one passes its cap; True when one did (the caller stops the command)."""
    tasks = {asyncio.ensure_future(out.drain(read_out)),
             asyncio.ensure_future(err.drain(read_err))}
    try:
        pending = tasks
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a read error propagates
            if out.over or err.over:
                return True
        return False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _bounded_lines(read: Read, raw: bool) -> AsyncIterator[str]:
    """Lines from `read`, at most MAX_LINE bytes each: a longer line is yielded cut as soon as
    it passes the cap and the rest of it is read and dropped, so memory stays bounded however
    long a line (or a file without newlines) is."""
    line = b""
    dropping = False  # inside a line already yielded cut

    def finish(data: bytes, cut: bool) -> str:
        text = data.decode("utf-8", "replace")
        if raw:
            return text
        return terminal_safe(text) + (" …" if cut else "")

    while True:
        chunk = await read(_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            if not dropping:
                room = MAX_LINE - len(line)
                line += piece[:room]
                if len(piece) > room:
                    dropping = True
                    yield finish(line, True)
            if i < len(pieces) - 1:  # a newline ends the line
                if not dropping:
                    yield finish(line, False)
                line, dropping = b"", False
    if line and not dropping:
        yield finish(line, False)


# A script whose stdin closing (the channel or the pipe went away) kills its payload, so a
# follower never outlives the reader that asked for it.
def _tied_to_stdin(script: str) -> str:
    return f"( {script} ) & __p=$!; cat >/dev/null; kill $__p 2>/dev/null; wait $__p 2>/dev/null"


class LocalTransport(Transport):
    is_local = True

    def __init__(self, node: NodeConfig, env: dict[str, str] | None = None) -> None:
        super().__init__(node)
        # Extra environment for every command; secrets go here, never into script text
        # (which `ps` shows).
        self.env = dict(env or {})

    async def connect(self) -> None:
        return None

    async def run(self, script: str, *, timeout: float = 30.0) -> CommandResult:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", script,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # on timeout the whole group goes, not just sh
            env={**os.environ, **self.env} if self.env else None,
        )
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Capped(), _Capped()

        async def collect() -> bool:
            assert proc.stdout is not None and proc.stderr is not None
            over = await _read_both(out, err, proc.stdout.read, proc.stderr.read)
            if not over:
                await proc.wait()
            return over

        try:
            over = await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:
            over = None
        if over is not False:  # timed out, or printed too much: the whole group goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            # A pipe whose reading is paused (full buffer, nobody reads now) never reports
            # EOF, and asyncio's wait() waits for the pipes too: close them.
            pipes = getattr(proc, "_transport", None)
            if pipes is not None:
                pipes.close()
            await proc.wait()
        if over is None:
            raise TransportError(self.label, f"command timed out after {timeout:g} s",
                                 kind="timeout")
        status = -1 if over else (proc.returncode or 0)
        return CommandResult(status, out.text(), err.text(), truncated=bool(over))

    async def stream_lines(self, script: str, *, raw: bool = False) -> AsyncIterator[str]:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", _tied_to_stdin(script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            async for line in _bounded_lines(proc.stdout.read, raw):
                yield line
        finally:
            proc.stdin.close()

            async def ended() -> None:
                assert proc.stdout is not None
                while await proc.stdout.read(_CHUNK):  # unread output would hold wait() up
                    pass
                await proc.wait()

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended(), 5)


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


def identity_options(label: str, identity_file: str) -> tuple[dict[str, object], str]:
    """asyncssh options for `identity_file`, and a sentence when the key is not used as given.
    torbiz never asks for a passphrase: a protected key falls back to the keys in ssh-agent
    (asyncssh skips it instead of failing the connection); without an agent, or for a file
    that is no key, a TransportError says what to do."""
    path = os.path.expanduser(identity_file)
    try:
        asyncssh.read_private_key(path)
    except asyncssh.KeyImportError as exc:
        if "passphrase" not in str(exc).lower():
            raise TransportError(label, f"identity_file {path} is not a private key torbiz can "
                                        f"read ({exc}): fix identity_file", kind="auth") from None
        if not os.environ.get("SSH_AUTH_SOCK"):
            raise TransportError(label, f"identity_file {path} is protected by a passphrase, "
                                        "which torbiz never asks for, and no ssh-agent is "
                                        "running: start one and load the key (eval "
                                        f"\"$(ssh-agent)\"; ssh-add {path})", kind="auth") from None
        return ({"client_keys": [path], "ignore_encrypted": True},
                f"identity_file {path} is protected by a passphrase, which torbiz never asks "
                f"for: the keys in ssh-agent are used instead (ssh-add {path} loads it there)")
    except OSError as exc:
        raise TransportError(label, f"identity_file {path} cannot be read "
                                    f"({exc.strerror or exc}): fix identity_file",
                             kind="auth") from None
    return {"client_keys": [path]}, ""


class SshTransport(Transport):
    """One asyncssh connection per node, many channels over it."""

    key_note = ""  # set when identity_file cannot be used as given (see identity_options)

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"{self.node.host}:{self.node.ssh_port}"

    async def connect(self) -> None:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            self._conn = await self._open()

    def _connect_options(self) -> tuple[str, dict[str, object]]:
        """(known_hosts path, asyncssh.connect options); refuses when known_hosts is missing."""
        opts = self.node.ssh
        known_hosts = _expand(opts.known_hosts)
        assert known_hosts is not None
        if not os.path.isfile(known_hosts):
            raise TransportError(
                self.label,
                f"known_hosts file {known_hosts} does not exist; host keys are always verified. "
                f"Add this node's key after checking its fingerprint: "
                f"ssh-keyscan -p {self.node.ssh_port} {self.node.host} >> {known_hosts}",
                kind="host-key",
            )
        config_file = _expand(opts.config_file)
        kwargs: dict[str, object] = {
            "port": self.node.ssh_port,
            "known_hosts": known_hosts,
            "connect_timeout": opts.connect_timeout,
            "keepalive_interval": opts.keepalive_interval,
            "keepalive_count_max": opts.keepalive_count_max,
            "config": [config_file] if config_file and os.path.isfile(config_file) else [],
        }
        if opts.user:
            kwargs["username"] = opts.user
        if opts.identity_file:
            identity, self.key_note = identity_options(self.label, opts.identity_file)
            kwargs.update(identity)
        return known_hosts, kwargs

    async def _open(self) -> asyncssh.SSHClientConnection:
        opts = self.node.ssh
        known_hosts, kwargs = self._connect_options()
        try:
            return await asyncssh.connect(self.node.host, **kwargs)
        except asyncssh.HostKeyNotVerifiable:
            raise await self._host_key_error(known_hosts) from None
        except asyncssh.PermissionDenied:
            user = opts.user or "your login name"
            raise TransportError(
                self.label,
                f"SSH login as {user} to {self.address} was refused: check [ssh] user and "
                "identity_file, or load the key into ssh-agent"
                + (f" ({self.key_note})" if self.key_note else ""),
                kind="auth",
            ) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise TransportError(
                self.label,
                f"no SSH answer from {self.address} within {opts.connect_timeout:g} s: is the "
                "node up and the ssh_port right?",
                kind=NOT_RESPONDING,
            ) from None
        except (OSError, asyncssh.Error) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            if isinstance(exc, OSError) and exc.errno in SILENT_ERRNOS:
                # Nobody refused: the packets go nowhere (a cut link, a machine asleep).
                raise TransportError(
                    self.label, f"no answer from {self.address} ({reason}): the node is down, "
                                "asleep, or its link is cut", kind=NOT_RESPONDING) from None
            raise TransportError(
                self.label, f"cannot connect to {self.address} ({reason}): is sshd running there?"
            ) from None

    async def _host_key_error(self, known_hosts: str) -> TransportError:
        """Tell an unknown host from a changed key; asyncssh reports both the same way."""
        host, port = self.node.host, self.node.ssh_port
        pattern = host if port == 22 else f"[{host}]:{port}"
        fingerprint = "unknown"
        with contextlib.suppress(Exception):
            key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port, config=[]),
                                         self.node.ssh.connect_timeout)
            if key is not None:
                fingerprint = key.get_fingerprint("sha256")
        listed = False
        with contextlib.suppress(Exception):
            trusted = asyncssh.read_known_hosts(known_hosts).match(host, "", port)
            listed = bool(trusted[0] or trusted[1])
        if listed:
            return TransportError(
                self.label,
                f"HOST KEY CHANGED for {pattern}: it now presents {fingerprint}, which does not "
                f"match {known_hosts}. Someone may be intercepting the connection. If the node "
                f"was reinstalled, verify the new fingerprint, then run: "
                f"ssh-keygen -f {known_hosts} -R '{pattern}' and connect once with ssh to "
                "accept the new key",
                kind="host-key",
            )
        return TransportError(
            self.label,
            f"host key of {pattern} ({fingerprint}) is not in {known_hosts}. Verify the "
            f"fingerprint, then add it: ssh-keyscan -p {port} {host} >> {known_hosts}",
            kind="host-key",
        )

    @property
    def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection (after connect()), for port forwards."""
        if self._conn is None:
            raise TransportError(self.label, "not connected")
        return self._conn

    async def _connection(self) -> asyncssh.SSHClientConnection:
        await self.connect()
        assert self._conn is not None
        return self._conn

    async def run(self, script: str, *, timeout: float = 30.0) -> CommandResult:
        command = sh_c(script)
        conn = await self._connection()
        out, err = _Capped(), _Capped()
        proc: asyncssh.SSHClientProcess[bytes] | None = None

        async def collect() -> bool:
            nonlocal proc
            # Bytes, decoded here with replacement: asyncssh would drop undecodable output.
            proc = await conn.create_process(command, stdin=asyncssh.DEVNULL, encoding=None)
            over = await _read_both(out, err, proc.stdout.read, proc.stderr.read)
            if not over:
                await proc.wait_closed()
            return over

        try:
            over = await asyncio.wait_for(collect(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            if proc is not None:
                proc.close()
            raise TransportError(self.label, f"command timed out after {timeout:g} s",
                                 kind="timeout") from None
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise lost_connection(self.label, exc) from None
        assert proc is not None
        if over:  # closing the channel ends the command: its next write gets SIGPIPE
            proc.close()
            return CommandResult(-1, out.text(), err.text(), truncated=True)
        status = proc.exit_status if proc.exit_status is not None else 255
        return CommandResult(status, out.text(), err.text())

    async def stream_lines(self, script: str, *, raw: bool = False) -> AsyncIterator[str]:
        command = sh_c(_tied_to_stdin(script))
        conn = await self._connection()
        try:
            proc = await conn.create_process(command, stderr=asyncssh.DEVNULL, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise lost_connection(self.label, exc) from None
        try:
            async for line in _bounded_lines(proc.stdout.read, raw):
                yield line
        except (OSError, asyncssh.Error) as exc:
            raise lost_connection(self.label, exc) from None
        finally:
            proc.stdin.write_eof()
            proc.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()


def lost_connection(label: str, exc: Exception) -> TransportError:
    """The sentence for a connection that broke; a keepalive that went unanswered means the
    node (or the link) froze, not that it refused us."""
    text = str(exc).lower()
    silent = (isinstance(exc, OSError) and exc.errno in SILENT_ERRNOS) or any(
        word in text for word in ("keepalive", "no route to host", "host is down",
                                  "network is unreachable", "timed out"))
    if silent:
        return TransportError(label, f"stopped answering ({exc}): the node is frozen (swap, "
                                     "sleep) or its link is down",
                              kind=NOT_RESPONDING)
    return TransportError(label, f"SSH connection lost ({exc})", kind=LOST)


def make_transport(node: NodeConfig) -> Transport:
    return LocalTransport(node) if node.transport == "local" else SshTransport(node)
