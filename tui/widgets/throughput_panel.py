"""The throughput panel: generation and prompt tokens/s as sparklines over the last minutes,
requests in flight and queued, and each busy slot's progress. The figures are decode rates:
the running requests' while any runs, else the last request's with its age ("last: 334 tok/s,
12 s ago"), never an average over a window that was mostly idle."""

from __future__ import annotations

import time
from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from core.supervision.throughput import ThroughputSample

HISTORY = 120  # samples kept (the app polls once a second: two minutes)


class ThroughputPanel(Vertical):
    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.generation: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.prompt: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.last: ThroughputSample | None = None
        self.error = ""

    def compose(self) -> ComposeResult:
        yield Static(self._headline("generation", None), id="gen-label")
        yield Sparkline(list(self.generation), summary_function=max, id="gen-spark")
        yield Static(self._headline("prompt", None), id="prompt-label")
        yield Sparkline(list(self.prompt), summary_function=max, id="prompt-spark")
        yield Static("coordinator not running", id="requests")

    def on_mount(self) -> None:
        self.border_title = "throughput"

    @staticmethod
    def _headline(what: str, rate: float | None) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{what:<11}", style="dim")
        text.append("-" if rate is None else f"{rate:8.1f} tok/s", style="bold")
        return text

    @staticmethod
    def _age(sample: ThroughputSample) -> str:
        if sample.last_ended_at is None:
            return "earlier"  # it ended before this dashboard's first poll
        return f"{max(0.0, time.monotonic() - sample.last_ended_at):.0f} s ago"

    @classmethod
    def generation_headline(cls, sample: ThroughputSample) -> Text:
        if sample.running_tps > 0:
            return cls._headline("generation", sample.running_tps)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{'generation':<11}", style="dim")
        if sample.last_tps is None:
            text.append("- (no request yet)", style="dim")
            return text
        text.append("last: ", style="dim")
        text.append(f"{sample.last_tps:.1f} tok/s", style="bold")
        text.append(f", {cls._age(sample)}", style="dim")
        return text

    @classmethod
    def prompt_headline(cls, sample: ThroughputSample) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{'prompt':<11}", style="dim")
        if sample.last_prompt_tps is None:
            text.append("-", style="bold")
            return text
        text.append("last: ", style="dim")
        text.append(f"{sample.last_prompt_tps:.1f} tok/s", style="bold")
        return text

    def show_sample(self, sample: ThroughputSample | None, error: str = "") -> None:
        """A poll's result; None with `error` when the coordinator did not answer."""
        self.error = error
        if sample is None:
            self.query_one("#requests", Static).update(
                Text(error or "coordinator not running", style="dim"))
            return
        self.last = sample
        self.generation.append(sample.spark_tps)
        self.prompt.append((sample.last_prompt_tps or 0.0) if sample.ended_now else 0.0)
        self.query_one("#gen-label", Static).update(self.generation_headline(sample))
        self.query_one("#prompt-label", Static).update(self.prompt_headline(sample))
        self.query_one("#gen-spark", Sparkline).data = list(self.generation)
        self.query_one("#prompt-spark", Sparkline).data = list(self.prompt)
        self.query_one("#requests", Static).update(self._requests(sample))

    @staticmethod
    def _requests(sample: ThroughputSample) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("requests ", style="dim")
        text.append(f"{sample.requests_processing} processing", style="bold")
        text.append(f" · {sample.requests_deferred} queued")
        if sample.last_tokens:
            text.append(f" · last {sample.last_tokens} tokens", style="dim")
        busy = [slot for slot in sample.slots if slot.processing]
        for slot in busy[:4]:
            text.append(f"\nslot {slot.id}: ", style="dim")
            # llama-server's n_prompt_tokens counts the generated tokens too once they flow.
            if not slot.n_decoded:
                text.append(f"reading its prompt ({slot.n_prompt_processed} tokens so far)")
            else:
                text.append(f"{slot.n_decoded} tokens")
                if slot.n_remain is not None and slot.n_remain >= 0:
                    text.append(f" ({slot.n_remain} left)")
                if slot.gen_tps:
                    text.append(f" · {slot.gen_tps:.1f} tok/s")
        if len(busy) > 4:
            text.append(f"\n… {len(busy) - 4} more busy slots", style="dim")
        if not sample.exact:
            text.append("\n(no /slots: rates from decode calls)", style="dim")
        return text
