"""Live throughput of the coordinator, from its /metrics and /slots pages.

What llama-server (llama.cpp from the llama-cpp-python 0.3.36 sdist) really reports:
- `llamacpp:prompt_tokens_seconds` / `predicted_tokens_seconds` are averages over the window
  since the previous scrape (every scrape resets them), useless to a second reader;
- `tokens_predicted_total` grows only when a request ends (its slot is released);
- `n_decode_total` counts llama_decode() calls: prompt batches included, and one call serves
  every busy slot, so it is tokens only for one request at a time;
- `/slots` lists every slot; a busy one (`is_processing`) has `id_task` and
  `next_token[0].n_decoded`, the tokens generated so far; a released slot's counters are
  zeroed at the same moment its tokens are added to `tokens_predicted_total`.

So "tokens generated so far" = tokens_predicted_total + the n_decoded of busy slots, a counter
that moves while a request streams. /metrics is read before /slots: a request that ends between
the two reads is briefly missed (never counted twice), and the counter is held where it was
until the next read catches up, so rates never go negative. A changed `Process-Start-Time-Unix`
header or a shrinking `n_decode_total` means the server restarted: rates start over.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

MAX_PAGE_BYTES = 1 << 20  # a /metrics page is ~3 KB and /slots ~1.5 KB per slot
# The shape of one sample line (name, labels, value, optional timestamp): prometheus_client's
# parser reads the fields and, lenient by design, would take "a 1 2 3" as `a 1`.
_SAMPLE_LINE = re.compile(
    r"^[A-Za-z_:][A-Za-z0-9_:]*(\{(?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*\})?\s+\S+(?:\s+-?\d+)?$")
_MAX_GAUGE = 1_000_000


@dataclass(frozen=True)
class SlotProgress:
    id: int
    task: int | None  # id_task of the request the slot serves (or served last)
    processing: bool
    n_decoded: int  # tokens generated for the current request
    n_remain: int | None  # tokens left before n_predict, -1 when unlimited
    n_prompt_tokens: int
    n_prompt_processed: int
    gen_tps: float  # this request's generation rate since the previous poll


@dataclass(frozen=True)
class ThroughputSample:
    at: float  # time.monotonic() when the scrape finished
    gen_tps: float  # generated tokens/s over the window
    prompt_tps: float  # prompt tokens/s over the window (moves when a prompt batch completes)
    requests_processing: int
    requests_deferred: int
    decoded_total: float  # tokens generated since the server started, requests in flight too
    prompt_tokens_total: float
    slots_decoding: int  # busy slots that are generating (not still reading their prompt)
    slots: tuple[SlotProgress, ...] = ()
    exact: bool = True  # False: /slots unavailable, decode calls stand in for tokens
    # The honest rates: what the running requests decode at, and what the last finished
    # request(s) decoded at (llama-server's own generation time, prompt excluded), with when
    # this monitor saw them end (None: they ended before it started watching).
    running_tps: float = 0.0
    last_tps: float | None = None
    last_tokens: int = 0
    last_ended_at: float | None = None
    last_prompt_tps: float | None = None
    ended_now: bool = False  # a request ended since the previous poll

    @property
    def decode_tps(self) -> float:
        """The rate to show as "the" tokens/s: the running requests' while any decodes, else
        the last request's (never an average over idle time)."""
        if self.running_tps > 0:
            return self.running_tps
        return self.last_tps or 0.0

    @property
    def spark_tps(self) -> float:
        """This poll's point on a rate graph: the running rate, or the rate of a request that
        ended since the previous poll (a burst between two polls still shows its height)."""
        if self.running_tps > 0:
            return self.running_tps
        return (self.last_tps or 0.0) if self.ended_now else 0.0


def _sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join('{}="{}"'.format(key, value.replace("\\", "\\\\").replace('"', '\\"'))
                     for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format into {name: value}, each sample read by prometheus_client's own
    parser (labelled samples keep their labels in the key, e.g. `name{position="0"}`). Sample
    lines are parsed one at a time so one garbage or truncated line costs only itself, and each
    sample keeps the name the page gave it (the parser renames a counter's `x` to `x_total`
    when it sees the TYPE line). NaN and infinite values are skipped: a counter that is not a
    number cannot give a rate."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        return {}
    values: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or len(line) > 4096:
            continue
        try:
            samples = [sample for family in text_string_to_metric_families(line)
                       for sample in family.samples]
        except (ValueError, IndexError, KeyError, TypeError):
            continue
        if len(samples) != 1 or not _SAMPLE_LINE.match(line):
            continue
        value = float(samples[0].value)
        if not math.isfinite(value):
            continue
        values[_sample_key(samples[0].name, dict(samples[0].labels))] = value
    return values


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    if not math.isfinite(value):
        return default
    return int(max(-_MAX_GAUGE * 1000, min(value, _MAX_GAUGE * 1000)))


def _opt_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _int(value)


def parse_slots(data: Any) -> list[dict[str, Any]] | None:
    """The /slots JSON as plain per-slot facts, or None when it is not a list of slots."""
    if not isinstance(data, list):
        return None
    slots = []
    for entry in data[:4096]:
        if not isinstance(entry, dict) or _opt_int(entry.get("id")) is None:
            continue
        nxt = entry.get("next_token")
        first = nxt[0] if isinstance(nxt, list) and nxt and isinstance(nxt[0], dict) else {}
        slots.append({
            "id": _int(entry.get("id")),
            "task": _opt_int(entry.get("id_task")),
            "processing": entry.get("is_processing") is True,
            "n_decoded": max(0, _int(first.get("n_decoded"))),
            "n_remain": _opt_int(first.get("n_remain")),
            "n_prompt_tokens": max(0, _int(entry.get("n_prompt_tokens"))),
            "n_prompt_processed": max(0, _int(entry.get("n_prompt_tokens_processed"))),
        })
    return slots


class PollError(Exception):
    """A sentence for the operator about why this poll has no sample."""


@dataclass(frozen=True)
class _Point:
    at: float
    decoded: float
    prompt: float
    epoch: int


class ThroughputMonitor:
    """Polls one llama-server. One request in flight at a time: a poll() while another runs
    waits for that one's result instead of sending a second request. Bounded history."""

    def __init__(self, url: str, *, window: float = 10.0, history: int = 600,
                 client: httpx.AsyncClient | None = None, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url.rstrip("/")
        self._clock = clock
        self.window = max(0.1, float(window))
        self.timeout = float(timeout)
        self.history: deque[ThroughputSample] = deque(maxlen=max(1, history))
        self.error = ""
        self._client = client
        self._own_client = client is None
        self._inflight: asyncio.Future[ThroughputSample | None] | None = None
        self._points: deque[_Point] = deque(maxlen=max(2, history))
        self._epoch = 0
        self._server_id: str | None = None
        self._last_decode_calls: float | None = None
        self._last_exact: bool | None = None
        self._slot_seen: dict[int, tuple[int | None, int, float]] = {}
        # tokens_predicted_total, tokens_predicted_seconds_total, prompt_tokens_total,
        # prompt_seconds_total at the previous poll of this server process
        self._counters: tuple[float, float, float, float] | None = None
        self._last: tuple[float | None, int, float | None, float | None] = (None, 0, None, None)

    @property
    def latest(self) -> ThroughputSample | None:
        return self.history[-1] if self.history else None

    async def poll(self) -> ThroughputSample | None:
        """One scrape of /metrics and /slots. None (and `error` says why) when the server does
        not answer in time or answers something that is not llama-server's page."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._poll_once())
        return await asyncio.shield(self._inflight)

    async def watch(self, interval: float = 1.0,
                    max_interval: float = 30.0) -> AsyncIterator[ThroughputSample | None]:
        """Poll forever: the next poll is scheduled only after the previous one finished, and
        the pause doubles (up to max_interval) while polls fail."""
        delay = interval
        while True:
            sample = await self.poll()
            yield sample
            delay = interval if sample is not None else min(max_interval, delay * 2)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> ThroughputMonitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- one poll ---------------------------------------------------------------------------

    async def _poll_once(self) -> ThroughputSample | None:
        try:
            metrics, server_id, slots = await asyncio.wait_for(self._scrape(), self.timeout)
            sample = self._sample(metrics, server_id, slots)
        except PollError as exc:
            self.error = str(exc)
            return None
        except asyncio.TimeoutError:
            self.error = (f"the coordinator at {self.url} did not answer /metrics and /slots "
                          f"within {self.timeout:g} s")
            return None
        except Exception as exc:  # a poller shows stale data, it never raises
            self.error = f"polling {self.url} failed: {exc.__class__.__name__}: {exc}"[:300]
            return None
        self.error = ""
        self.history.append(sample)
        return sample

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        return self._client

    async def _get(self, path: str) -> tuple[int, str, httpx.Headers]:
        try:
            async with self._http().stream("GET", self.url + path) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise PollError(f"{self.url}{path} sent more than "
                                        f"{MAX_PAGE_BYTES // 1024} KiB: not llama-server's page")
                text = body.decode("utf-8", "replace")
                return response.status_code, text, response.headers
        except httpx.ConnectError as exc:
            raise PollError(f"nothing answers at {self.url} ({exc or 'connection refused'}): "
                            "is the coordinator running?") from exc
        except httpx.TimeoutException as exc:
            raise PollError(f"the coordinator at {self.url} did not answer {path} within "
                            f"{self.timeout:g} s") from exc
        except httpx.RemoteProtocolError as exc:
            raise PollError(f"the coordinator at {self.url} broke off {path} without a valid "
                            f"answer ({exc})"[:300]) from exc
        except httpx.HTTPError as exc:
            raise PollError(f"{self.url}{path}: {exc.__class__.__name__}: {exc}"[:300]) from exc

    async def _scrape(self) -> tuple[dict[str, float], str | None, list[dict[str, Any]] | None]:
        status, text, headers = await self._get("/metrics")
        if status != 200:
            raise PollError(_http_sentence(self.url, "/metrics", status, text))
        metrics = parse_metrics(text)
        if "llamacpp:n_decode_total" not in metrics:
            raise PollError(f"{self.url}/metrics is not a llama-server metrics page (no "
                            "llamacpp:n_decode_total): is this port the coordinator?")
        slots: list[dict[str, Any]] | None = None
        try:
            status, text, _ = await self._get("/slots")
            if status == 200:
                slots = parse_slots(json.loads(text))
        except (PollError, ValueError):
            slots = None  # rates fall back to decode calls; /metrics alone still answers
        return metrics, headers.get("process-start-time-unix"), slots

    def _sample(self, metrics: dict[str, float], server_id: str | None,
                slots: list[dict[str, Any]] | None) -> ThroughputSample:
        now = self._clock()
        decode_calls = max(0.0, metrics.get("llamacpp:n_decode_total", 0.0))
        predicted = max(0.0, metrics.get("llamacpp:tokens_predicted_total", 0.0))
        prompt = max(0.0, metrics.get("llamacpp:prompt_tokens_total", 0.0))
        exact = slots is not None
        restarted = (
            (server_id is not None and self._server_id is not None
             and server_id != self._server_id)
            or (self._last_decode_calls is not None and decode_calls < self._last_decode_calls)
        )
        if restarted or (self._last_exact is not None and exact != self._last_exact):
            self._epoch += 1  # counters of another process, or of another meaning
            self._slot_seen.clear()
            self._counters = None
        self._server_id = server_id if server_id is not None else self._server_id
        self._last_decode_calls = decode_calls
        self._last_exact = exact

        busy = [s for s in slots or [] if s["processing"]]
        decoded = predicted + sum(s["n_decoded"] for s in busy) if exact else decode_calls
        last = self._points[-1] if self._points else None
        if last is not None and last.epoch == self._epoch:
            decoded = max(decoded, last.decoded)  # a request that ended between the two reads
            prompt = max(prompt, last.prompt)
        point = _Point(now, decoded, prompt, self._epoch)
        self._points.append(point)
        base = self._window_base(point)
        gen_tps = _rate(point.decoded - base.decoded, point.at - base.at)
        prompt_tps = _rate(point.prompt - base.prompt, point.at - base.at)

        progress = []
        seen: dict[int, tuple[int | None, int, float]] = {}
        for slot in slots or []:
            before = self._slot_seen.get(slot["id"])
            rate = 0.0
            if slot["processing"] and before is not None and before[0] == slot["task"]:
                rate = _rate(slot["n_decoded"] - before[1], now - before[2])
            if slot["processing"]:
                seen[slot["id"]] = (slot["task"], slot["n_decoded"], now)
            progress.append(SlotProgress(
                id=slot["id"], task=slot["task"], processing=slot["processing"],
                n_decoded=slot["n_decoded"], n_remain=slot["n_remain"],
                n_prompt_tokens=slot["n_prompt_tokens"],
                n_prompt_processed=slot["n_prompt_processed"], gen_tps=rate))
        self._slot_seen = seen
        ended_now = self._finished(metrics, now)
        last_tps, last_tokens, last_ended_at, last_prompt_tps = self._last
        running_tps = sum(slot.gen_tps for slot in progress if slot.processing)
        if not exact and metrics.get("llamacpp:requests_processing", 0) > 0:
            running_tps = gen_tps  # no /slots: decode calls are the only live figure

        return ThroughputSample(
            at=now, gen_tps=gen_tps, prompt_tps=prompt_tps,
            requests_processing=max(0, _int(metrics.get("llamacpp:requests_processing"))),
            requests_deferred=max(0, _int(metrics.get("llamacpp:requests_deferred"))),
            decoded_total=decoded, prompt_tokens_total=prompt,
            slots_decoding=sum(1 for s in busy if s["n_decoded"] > 0),
            slots=tuple(progress), exact=exact, running_tps=running_tps, last_tps=last_tps,
            last_tokens=last_tokens, last_ended_at=last_ended_at,
            last_prompt_tps=last_prompt_tps, ended_now=ended_now)

    def _finished(self, metrics: dict[str, float], now: float) -> bool:
        """Requests that ended since the previous poll, from the counters llama-server adds a
        request's tokens and generation time to when it ends: their own decode rate, whatever
        the poll interval. True when some ended."""
        counters = (max(0.0, metrics.get("llamacpp:tokens_predicted_total", 0.0)),
                    max(0.0, metrics.get("llamacpp:tokens_predicted_seconds_total", 0.0)),
                    max(0.0, metrics.get("llamacpp:prompt_tokens_total", 0.0)),
                    max(0.0, metrics.get("llamacpp:prompt_seconds_total", 0.0)))
        before, self._counters = self._counters, counters
        tokens, seconds, prompt, prompt_seconds = counters
        ended_at: float | None = now
        if before is None:  # the first look at this process: what it did before we watched
            ended_at, before = None, (0.0, 0.0, 0.0, 0.0)
        d_tokens, d_seconds = tokens - before[0], seconds - before[1]
        d_prompt, d_prompt_seconds = prompt - before[2], prompt_seconds - before[3]
        last_tps, last_tokens, last_at, last_prompt = self._last
        if d_prompt > 0 and d_prompt_seconds > 0:
            last_prompt = _rate(d_prompt, d_prompt_seconds)
        if d_tokens > 0 and d_seconds > 0:
            self._last = (_rate(d_tokens, d_seconds), int(d_tokens), ended_at, last_prompt)
            return ended_at is not None
        self._last = (last_tps, last_tokens, last_at, last_prompt)
        return False

    def _window_base(self, point: _Point) -> _Point:
        """The newest earlier point at least `window` seconds old (so the rate covers the whole
        window), else the oldest one of this server process."""
        base = point
        for earlier in reversed(self._points):
            if earlier.epoch != point.epoch:
                break
            base = earlier
            if point.at - earlier.at >= self.window:
                break
        # Drop points no window will reach again.
        while self._points and (point.at - self._points[0].at > self.window
                                and self._points[0] is not base):
            self._points.popleft()
        return base


def _rate(delta: float, seconds: float) -> float:
    if seconds <= 0 or delta <= 0:
        return 0.0
    rate = delta / seconds
    return rate if math.isfinite(rate) else 0.0


def _http_sentence(url: str, path: str, status: int, body: str) -> str:
    message = ""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = str(data["error"].get("message", ""))[:200]
    except ValueError:
        pass
    if status == 503 and "Loading model" in message:
        return f"the coordinator at {url} is still loading the model"
    if status == 501:
        return (f"the coordinator at {url} does not serve {path}: start llama-server with "
                f"--{path.strip('/')}")
    detail = f": {message}" if message else ""
    return f"{url}{path} answered HTTP {status}{detail}"
