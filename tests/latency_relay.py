"""A TCP relay that adds a fixed delay each way: a link `delay_s` long, for a kernel without
netem. Every chunk read on one side is written to the other `delay_s` after it arrived, in
order, so a request/reply exchange through the relay takes 2 * delay_s more (one round trip).
The connection to the target is opened when a client connects (the SYN is not delayed).

    relay = LatencyRelay("127.0.0.1", 50052, delay_s=0.010)
    port = await relay.start()          # listens on 127.0.0.1:port
    ...
    await relay.stop()

Or as a process: python -m tests.latency_relay LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT
DELAY_MS (bench/speed.py runs it so inside a node's network namespace).

ThreadedRelay runs one in an event loop of its own thread, for synchronous callers and for tests
whose own loop must never slow the link (tests/netns_nodes.py):

    with ThreadedRelay("127.0.0.1", ("10.216.3.2", 2222), delay_ms=40) as relay:
        ... connect to relay.port ...
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from types import TracebackType


class LatencyRelay:
    def __init__(self, target_host: str, target_port: int, *, delay_s: float,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.listen = (listen_host, listen_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        # A link that goes silent: nothing more is forwarded either way, not even a close, and
        # both sockets stay open (what a deadlocked worker looks like from the coordinator).
        self.swallow = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, *self.listen)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def cut(self) -> None:
        """Drop every open connection (a link that drops) and stop accepting new ones."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipes = [asyncio.create_task(self._pipe(reader, up_writer)),
                     asyncio.create_task(self._pipe(up_reader, writer))]
            try:
                # One side gone (a reset, a close): the other follows once in-flight data is
                # delivered, so the worker is free for its next client (it serves one at a time).
                _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                if pending:
                    await asyncio.wait(pending, timeout=self.delay_s + 0.2)
                for task in pipes:
                    task.cancel()
            except asyncio.CancelledError:
                for task in pipes:
                    task.cancel()
                pass  # stop() or cut(): the connection drops
            finally:
                for w in (writer, up_writer):
                    with contextlib.suppress(Exception):
                        w.close()
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                if self.swallow:
                    if not data:
                        await asyncio.Event().wait()  # silent: the close is swallowed too
                    continue
                queue.put_nowait((time.monotonic() + self.delay_s, data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender


class ThreadedRelay:
    """A LatencyRelay in a thread with its own event loop; `delay` (seconds) may be changed
    while it runs. Listens on a 127.x.y.z address only."""

    def __init__(self, listen_host: str, target: tuple[str, int], *, delay_ms: float,
                 listen_port: int = 0) -> None:
        if not listen_host.startswith("127."):
            raise ValueError(f"{listen_host!r}: the relay listens on loopback only")
        self.relay = LatencyRelay(*target, delay_s=delay_ms / 1000.0, listen_host=listen_host,
                                  listen_port=listen_port)
        self.port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def delay(self) -> float:
        return self.relay.delay_s

    @delay.setter
    def delay(self, seconds: float) -> None:
        self.relay.delay_s = seconds  # read per chunk: applies from the next one on

    def start(self) -> ThreadedRelay:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self.port = loop.run_until_complete(self.relay.start())
            except BaseException as exc:  # reported to start()'s caller
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.relay.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"relay-{self.relay.target}",
                                        daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ThreadedRelay:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def _main(argv: list[str]) -> None:
    listen_host, listen_port, host, port, delay_ms = argv
    relay = LatencyRelay(host, int(port), delay_s=float(delay_ms) / 1000,
                         listen_host=listen_host, listen_port=int(listen_port))
    await relay.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
