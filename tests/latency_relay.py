"""A TCP relay that adds `delay_ms` each way: the latency this kernel's missing netem would add.

Every chunk read on one side is written to the other `delay_ms` later, in order, so a round
trip through the relay costs 2 x delay_ms more and throughput is not capped (tbf does that).
It runs its own event loop in a thread: a test's loop, busy or blocked, never slows it, and the
synchronous bench drives it the same way. Listens on a 127.x.y.z address only.

    with LatencyRelay("127.0.0.1", ("10.216.3.2", 2222), delay_ms=40) as relay:
        ... connect to relay.port ...
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType


class LatencyRelay:
    def __init__(self, listen_host: str, target: tuple[str, int], *, delay_ms: float,
                 listen_port: int = 0) -> None:
        if not listen_host.startswith("127."):
            raise ValueError(f"{listen_host!r}: the relay listens on loopback only")
        self.listen_host, self.target, self.delay = listen_host, target, delay_ms / 1000.0
        self.port = listen_port
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle (from any thread) ----------------------------------------------------------

    def start(self) -> LatencyRelay:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._accept, self.listen_host, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()'s caller
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"relay-{self.target}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> LatencyRelay:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- the relay ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), 10)
            except (OSError, asyncio.TimeoutError):
                writer.close()
                return
            self.connections += 1
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the relay is stopping: its connections end with it
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()
            raise
        finally:
            if not sender.done():
                sender.cancel()
            writer.close()
