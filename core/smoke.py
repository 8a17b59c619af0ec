"""A short generation through the running cluster: does it answer, and how fast. Through the
coordinator's OpenAI-compatible API for llama.cpp, through Petals' own client for a swarm."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from core.config import ClusterConfig
from core.engines.llama_rpc.coordinator import auth_headers, coordinator_url
from core.engines.petals import swarm as petals_swarm

SMOKE_PROMPT = "The capital of France is"


class SmokeError(Exception):
    """The cluster did not answer; the message says what happened."""


@dataclass(frozen=True)
class SmokeResult:
    text: str
    tokens: int
    seconds: float  # the generation's own time when the server reports it, else wall time

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def smoke_generate(config: ClusterConfig, tokens: int = 16,
                         prompt: str = SMOKE_PROMPT, timeout: float = 120.0) -> SmokeResult:
    if petals_swarm.is_petals_cluster(config):
        try:
            answer = await petals_swarm.generate(config, prompt, tokens, timeout=timeout)
        except petals_swarm.PetalsError as exc:
            raise SmokeError(str(exc)) from None
        produced = answer.get("tokens", [])
        count = len(produced) if isinstance(produced, list) else int(produced or 0)
        return SmokeResult(str(answer.get("text", "")), count, float(answer.get("seconds", 0.0)))
    url = coordinator_url(config) + "/v1/completions"
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                     headers=auth_headers(config)) as client:
            # Exactly `tokens` tokens (EOS ignored), so rates compare from one run to the next.
            reply = await client.post(url, json={"prompt": prompt, "max_tokens": tokens,
                                                 "temperature": 0, "ignore_eos": True})
    except httpx.ConnectError:
        raise SmokeError(f"nothing answers at {coordinator_url(config)}: is the coordinator "
                         "up? (torbiz-tui status; torbiz-tui up)") from None
    except httpx.HTTPError as exc:
        raise SmokeError(f"the coordinator at {coordinator_url(config)} did not answer: "
                         f"{exc.__class__.__name__}") from None
    wall = time.monotonic() - started
    if reply.status_code != 200:
        raise SmokeError(f"the coordinator answered HTTP {reply.status_code}: "
                         f"{reply.text[:200]}")
    try:
        data = reply.json()
        text = str(data["choices"][0]["text"])
        count = int(data.get("usage", {}).get("completion_tokens", 0))
        timings = data.get("timings", {})
        seconds = float(timings.get("predicted_ms", wall * 1000)) / 1000
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise SmokeError("the coordinator's answer is not an OpenAI completion") from None
    return SmokeResult(text, count, seconds)
