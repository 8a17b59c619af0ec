"""A short generation through llama-server's OpenAI-compatible API: does it answer, how fast."""

from __future__ import annotations

import time

import httpx

from core.config import ClusterConfig
from core.engines.base import EngineError, Generation
from core.engines.llama_rpc.coordinator import auth_headers, coordinator_url


async def through_coordinator(config: ClusterConfig, prompt: str, tokens: int,
                              timeout: float) -> Generation:
    url = coordinator_url(config) + "/v1/completions"
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                     headers=auth_headers(config)) as client:
            # Exactly `tokens` tokens (EOS ignored), and the whole prompt processed each time
            # (no prompt cache), so rates compare from one run to the next.
            reply = await client.post(url, json={"prompt": prompt, "max_tokens": tokens,
                                                 "temperature": 0, "ignore_eos": True,
                                                 "cache_prompt": False})
    except httpx.ConnectError:
        raise EngineError(f"nothing answers at {coordinator_url(config)}: is the coordinator "
                          "up? (torbiz-tui status; torbiz-tui up)") from None
    except httpx.HTTPError as exc:
        raise EngineError(f"the coordinator at {coordinator_url(config)} did not answer: "
                          f"{exc.__class__.__name__}") from None
    wall = time.monotonic() - started
    if reply.status_code != 200:
        raise EngineError(f"the coordinator answered HTTP {reply.status_code}: "
                          f"{reply.text[:200]}")
    try:
        data = reply.json()
        text = str(data["choices"][0]["text"])
        count = int(data.get("usage", {}).get("completion_tokens", 0))
        timings = data.get("timings", {})
        seconds = float(timings.get("predicted_ms", wall * 1000)) / 1000
        prompt_tokens = int(timings.get("prompt_n", 0))
        prompt_seconds = float(timings.get("prompt_ms", 0.0)) / 1000
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise EngineError("the coordinator's answer is not an OpenAI completion") from None
    return Generation(text, count, seconds, prompt_tokens, prompt_seconds)
