"""Throughput from /metrics and /slots: the parser on real pages and on garbage, the monitor
against a real llama-server while it streams, and against a raw HTTP server that answers badly,
slowly, or as a restarted process."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.demo_model import write_demo_model
from core.engines.llama_rpc.build import find_cached_binary
from core.supervision.throughput import ThroughputMonitor, parse_metrics, parse_slots
from tests.cluster_files import free_port, wait_healthy

DATA = Path(__file__).parent / "data" / "metrics"


# ---- parse_metrics ----------------------------------------------------------------------------


def test_parse_real_metrics_page() -> None:
    values = parse_metrics((DATA / "metrics_busy.txt").read_text())
    assert values["llamacpp:n_decode_total"] == 152
    assert values["llamacpp:tokens_predicted_total"] == 64
    assert values["llamacpp:prompt_tokens_total"] == 6
    assert values["llamacpp:requests_processing"] == 1
    assert values["llamacpp:requests_deferred"] == 0
    assert values["llamacpp:prompt_seconds_total"] == pytest.approx(0.063852)
    assert len(values) == 15  # every sample of the page, no HELP/TYPE lines


def test_parse_real_slots_page() -> None:
    busy = parse_slots(json.loads((DATA / "slots_busy.json").read_text()))
    assert busy is not None and [s["id"] for s in busy] == [0, 1, 2, 3]
    assert [s for s in busy if s["processing"]] == [{
        "id": 3, "task": 81, "processing": True, "n_decoded": 88, "n_remain": 112,
        "n_prompt_tokens": 93, "n_prompt_processed": 1}]
    idle = parse_slots(json.loads((DATA / "slots_idle.json").read_text()))
    assert idle is not None and not any(s["processing"] for s in idle)
    assert idle[3]["n_decoded"] == 0  # a released slot's counters are zeroed
    assert parse_slots({"error": "x"}) is None
    assert parse_slots([1, "a", None, {"id": "x"}, {"id": True}]) == []


def test_parse_metrics_garbage() -> None:
    text = "\n".join([
        "llamacpp:n_decode_total 12",
        "llamacpp:tokens_predicted_total NaN",
        "llamacpp:prompt_tokens_total +Inf",
        "llamacpp:requests_processing 1e400",  # overflows to inf
        "llamacpp:requests_deferred 1e300",
        "llamacpp:n_tokens_max",  # truncated
        "llamacpp:n_busy_slots_per_decode 0.5 1700000000000",  # with a timestamp
        'llamacpp:spec{position="0",x="a b}"} 3',
        "llamacpp:two values here 1 2",
        "\x00\xff\u2603 7",
        "9starts_with_digit 1",
        "# HELP llamacpp:fake 5",
        "llamacpp:n_decode_total 13",  # the last one wins
        "x" * 10_000 + " 1",
        "llamacpp:cut_mid",
    ])
    values = parse_metrics(text)
    assert values == {
        "llamacpp:n_decode_total": 13,
        "llamacpp:requests_deferred": 1e300,
        "llamacpp:n_busy_slots_per_decode": 0.5,
        'llamacpp:spec{position="0",x="a b}"}': 3,
    }
    assert parse_metrics("") == {}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "replace"))))
def test_parse_metrics_never_raises(text: str) -> None:
    for value in parse_metrics(text).values():
        assert math.isfinite(value)


# ---- a raw HTTP server for the monitor --------------------------------------------------------

Handler = Callable[[], Awaitable[tuple[int, dict[str, str], bytes] | None]]


@dataclass
class RawServer:
    """asyncio.start_server speaking just enough HTTP/1.1; handlers per path. A handler may
    sleep (a slow server) or return None (close without answering). Counts requests in flight,
    a request ending when it is answered or its client goes away."""

    routes: dict[str, Handler]
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                self.requests.append(path)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    handler = self.routes.get(path)
                    answer = asyncio.ensure_future(handler()) if handler else None
                    gone = asyncio.ensure_future(reader.read(1))  # b"" when the client leaves
                    waiting = {gone} | ({answer} if answer else set())
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    if gone in done:
                        if answer:
                            answer.cancel()
                        return
                    gone.cancel()
                    result = answer.result() if answer else (404, {}, b"not found")
                finally:
                    self.in_flight -= 1
                if result is None:
                    return
                status, headers, body = result
                lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}",
                         *(f"{k}: {v}" for k, v in headers.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()


def metrics_page(decoded: float, predicted: float, prompt: float = 0, processing: int = 0,
                 deferred: int = 0) -> bytes:
    return (f"# HELP llamacpp:n_decode_total x\n# TYPE llamacpp:n_decode_total counter\n"
            f"llamacpp:n_decode_total {decoded}\n"
            f"llamacpp:tokens_predicted_total {predicted}\n"
            f"llamacpp:prompt_tokens_total {prompt}\n"
            f"llamacpp:requests_processing {processing}\n"
            f"llamacpp:requests_deferred {deferred}\n").encode()


def slots_page(*busy: tuple[int, int, int]) -> bytes:
    """(slot id, task id, n_decoded) per busy slot; slot 0..3 exist."""
    slots = []
    for sid in range(4):
        entry: dict[str, object] = {"id": sid, "n_ctx": 512, "is_processing": False}
        for bid, task, n in busy:
            if bid == sid:
                entry.update(is_processing=True, id_task=task, n_prompt_tokens=5 + n,
                             n_prompt_tokens_processed=5,
                             next_token=[{"has_next_token": True, "n_remain": 100 - n,
                                          "n_decoded": n}])
        slots.append(entry)
    return json.dumps(slots).encode()


def fixed(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    async def handler() -> tuple[int, dict[str, str], bytes]:
        return status, headers or {}, body
    return handler


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[RawServer]]]:
    started: list[RawServer] = []

    async def make(routes: dict[str, Handler]) -> RawServer:
        server = await RawServer(routes).start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


@pytest.mark.parametrize(("status", "body", "words"), [
    (200, b"<html>not metrics</html>", "not a llama-server metrics page"),
    (200, b"llamacpp:n_decode_total NaN\n", "not a llama-server metrics page"),
    (200, b"\xff\xfe\x00garbage\r\n\r\n", "not a llama-server metrics page"),
    (500, b"boom", "answered HTTP 500"),
    (503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}',
     "still loading the model"),
    (501, b'{"error":{"message":"This server does not support metrics endpoint."}}',
     "--metrics"),
])
async def test_malformed_pages_give_none_and_a_sentence(
        raw_server: Callable[[dict[str, Handler]], Awaitable[RawServer]], status: int,
        body: bytes, words: str) -> None:
    server = await raw_server({"/metrics": fixed(status, body)})
    async with ThroughputMonitor(server.url, timeout=2) as monitor:
        assert await monitor.poll() is None
        assert words in monitor.error and server.url in monitor.error
        assert not monitor.history


async def test_closed_port_truncated_and_oversized_pages(
        raw_server: Callable[[dict[str, Handler]], Awaitable[RawServer]]) -> None:
    async with ThroughputMonitor(f"http://127.0.0.1:{free_port()}", timeout=2) as monitor:
        assert await monitor.poll() is None
        assert "nothing answers at" in monitor.error

    async def hang_up() -> None:
        return None

    async def huge() -> tuple[int, dict[str, str], bytes]:
        return 200, {}, b"llamacpp:n_decode_total 1\n" * 60_000

    for handler, words in ((hang_up, "broke off /metrics"), (huge, "more than")):
        server = await raw_server({"/metrics": handler})
        async with ThroughputMonitor(server.url, timeout=2) as monitor:
            assert await monitor.poll() is None
            assert words in monitor.error, monitor.error


async def test_slow_server_never_has_two_requests_in_flight(
        raw_server: Callable[[dict[str, Handler]], Awaitable[RawServer]]) -> None:
    delay = {"s": 0.3}

    async def slow_metrics() -> tuple[int, dict[str, str], bytes]:
        await asyncio.sleep(delay["s"])
        return 200, {}, metrics_page(10, 0)

    server = await raw_server({"/metrics": slow_metrics, "/slots": fixed(200, slots_page())})
    async with ThroughputMonitor(server.url, timeout=2) as monitor:
        # Ten pollers at once (a timer firing while the last poll still runs): one request.
        results = await asyncio.gather(*(monitor.poll() for _ in range(10)))
        assert all(r is results[0] and r is not None for r in results)
        assert server.requests == ["/metrics", "/slots"]
        assert server.max_in_flight == 1
        # Slower than the timeout: None with a sentence, never an exception, and still one.
        delay["s"] = 1.5
        monitor.timeout = 0.4
        results = await asyncio.gather(*(monitor.poll() for _ in range(5)))
        assert results == [None] * 5
        assert "did not answer" in monitor.error and "0.4 s" in monitor.error
        assert server.max_in_flight == 1
        # The server recovers: so does the monitor.
        delay["s"] = 0.0
        await asyncio.sleep(0.1)
        assert await monitor.poll() is not None and monitor.error == ""
        assert server.max_in_flight == 1


async def test_watch_reschedules_after_each_poll_and_backs_off(
        raw_server: Callable[[dict[str, Handler]], Awaitable[RawServer]]) -> None:
    server = await raw_server({"/metrics": fixed(500, b"")})
    async with ThroughputMonitor(server.url, timeout=1) as monitor:
        stamps = []
        loop = asyncio.get_running_loop()
        async for sample in monitor.watch(interval=0.05, max_interval=0.4):
            assert sample is None
            stamps.append(loop.time())
            if len(stamps) == 5:
                break
        gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        assert gaps[-1] > gaps[0] * 3  # 0.1, 0.2, 0.4, 0.4 after errors
        assert server.max_in_flight == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rates_restarts_and_the_scrape_race(
        raw_server: Callable[[dict[str, Handler]], Awaitable[RawServer]]) -> None:
    state: dict[str, object] = {}

    async def metrics() -> tuple[int, dict[str, str], bytes]:
        return 200, {"Process-Start-Time-Unix": str(state["pid"])}, state["metrics"]  # type: ignore[return-value]

    async def slots() -> tuple[int, dict[str, str], bytes]:
        return 200, {}, state["slots"]  # type: ignore[return-value]

    server = await raw_server({"/metrics": metrics, "/slots": slots})
    clock = FakeClock()
    monitor = ThroughputMonitor(server.url, window=10.0, history=5, clock=clock)

    async def at(t: float, pid: int, metrics_: bytes, slots_: bytes) -> tuple[float, ...]:
        clock.now = 1000.0 + t
        state.update(pid=pid, metrics=metrics_, slots=slots_)
        sample = await monitor.poll()
        assert sample is not None, monitor.error
        return (sample.gen_tps, sample.decoded_total, sample.prompt_tps)

    async with monitor:
        assert await at(0, 7, metrics_page(0, 0), slots_page()) == (0, 0, 0)
        # A request streams: only /slots moves (tokens_predicted_total waits for its end).
        assert await at(1, 7, metrics_page(25, 0, 5, 1), slots_page((3, 81, 20))) == (20, 20, 5)
        assert (await at(2, 7, metrics_page(45, 0, 5, 1), slots_page((3, 81, 40))))[:2] == (20, 40)
        sample = monitor.latest
        assert sample is not None and sample.requests_processing == 1
        assert sample.slots_decoding == 1 and sample.slots[3].gen_tps == 20
        # It ends between the /metrics and the /slots read: held, not a negative rate.
        assert (await at(3, 7, metrics_page(60, 0, 5, 1), slots_page()))[:2] == (40 / 3, 40)
        # Next poll the counter has it.
        assert (await at(4, 7, metrics_page(61, 61, 5), slots_page()))[:2] == (61 / 4, 61)
        # The window slides: 10 s later the first points no longer count.
        assert (await at(14, 7, metrics_page(61, 61, 5), slots_page()))[:2] == (0, 61)
        # The server restarts: counters start over, so do the rates (never negative).
        assert await at(15, 8, metrics_page(3, 0), slots_page((0, 1, 3))) == (0, 3, 0)
        assert (await at(16, 8, metrics_page(13, 0), slots_page((0, 1, 13))))[:2] == (10, 13)
        # Same start header, but n_decode_total went backwards: also a restart.
        assert (await at(17, 8, metrics_page(1, 0), slots_page((1, 1, 1))))[:2] == (0, 1)
        # /slots disabled: decode calls stand in for tokens, a new series as well.
        server.routes["/slots"] = fixed(501, b'{"error":{"message":"no slots"}}')
        assert (await at(18, 8, metrics_page(11, 0), b""))[:2] == (0, 11)
        assert (await at(19, 8, metrics_page(31, 0), b""))[:2] == (20, 31)
        assert monitor.latest is not None and not monitor.latest.exact
        assert len(monitor.history) == 5 and monitor.history.maxlen == 5
        assert all(s.gen_tps >= 0 and s.prompt_tps >= 0 for s in monitor.history)


# ---- against a real llama-server --------------------------------------------------------------


@pytest.fixture(scope="module")
def streaming_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~190 MB of f16 weights: about 60-90 tokens/s on one thread here, so 64 tokens take about
    # a second and several 0.2 s polls land while they stream.
    return write_demo_model(tmp_path_factory.mktemp("model") / "stream.gguf", n_layer=8,
                            n_embd=1024, n_ff=2816, n_head=8, n_head_kv=4)


@pytest.fixture
def llama_server(streaming_model: Path) -> Iterator[str]:
    binary = find_cached_binary("llama-server")
    if not binary:
        pytest.skip("llama-server not built: run `torbiz-tui build-llama`")
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [str(binary), "-m", str(streaming_model), "-t", "1", "-c", "512", "--metrics", "--slots",
         "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.integration
async def test_live_rate_while_a_real_request_streams(llama_server: str) -> None:
    url = llama_server
    async with ThroughputMonitor(url, window=10.0) as monitor, \
            httpx.AsyncClient(timeout=120, trust_env=False) as client:
        assert await monitor.poll() is not None, monitor.error
        tokens = 0
        streaming = asyncio.Event()
        finished = asyncio.Event()

        async def stream() -> None:
            nonlocal tokens
            request = {"prompt": "hello world", "n_predict": 64, "stream": True,
                       "ignore_eos": True, "cache_prompt": False}
            async with client.stream("POST", f"{url}/completion", json=request) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        tokens += 1
                        streaming.set()
            finished.set()

        task = asyncio.create_task(stream())
        during = []
        while not finished.is_set():
            await asyncio.sleep(0.2)
            sample = await monitor.poll()
            assert sample is not None, monitor.error
            if streaming.is_set() and not finished.is_set():
                during.append(sample)
        await task
        live = [s for s in during if s.gen_tps > 0]
        assert live, f"no poll saw tokens while the request streamed: {during}"
        assert all(s.requests_processing == 1 for s in live)
        # Counted while in flight: tokens_predicted_total had not moved yet.
        assert any(0 < s.decoded_total < 64 for s in live)
        assert all(s.slots_decoding == 1 for s in live)
        await asyncio.sleep(0.3)
        after = await monitor.poll()
        assert after is not None
        assert after.decoded_total == 64 and after.requests_processing == 0
        assert tokens >= 32  # data lines: tokens may be merged when a piece is partial UTF-8
