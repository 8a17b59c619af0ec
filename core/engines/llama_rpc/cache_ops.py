"""The llama.cpp engine's weight-cache operations over its nodes: the warm map, pre-warm, the
size check before a worker starts, prune. Every node in parallel; one sentence per failure."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from core.config import NodeConfig
from core.engines.base import EngineContext, EngineError, Span
from core.engines.llama_rpc import link_rate, standby, warm
from core.engines.llama_rpc.manifest import Manifest, ManifestError, load_manifest
from core.reach.transport import TransportError
from core.weight_cache import NodeWarmth, PruneResult, WarmResult, WarmthReport


async def manifest_of(ctx: EngineContext) -> Manifest:
    gguf = ctx.config.model.gguf
    if gguf is None:
        raise EngineError("the weight cache needs [model] gguf in the cluster file")
    try:
        return await asyncio.to_thread(load_manifest, gguf)
    except ManifestError as exc:
        raise EngineError(str(exc)) from None


def _spans(spans: Sequence[Span] | None) -> dict[str, tuple[int, int]]:
    return {name: (first, count) for name, first, count in (spans or ()) if count > 0}


async def warmth(ctx: EngineContext, nodes: Sequence[NodeConfig],
                 spans: Sequence[Span] | None) -> WarmthReport:
    manifest = await manifest_of(ctx)
    planned = _spans(standby.with_standbys(ctx.config, spans or ()))

    async def one(node: NodeConfig) -> NodeWarmth:
        state_dir = ctx.node_state_dir(node)
        try:
            listing = await warm.list_cache(ctx.transport(node.name), state_dir)
        except TransportError as exc:
            return warm.node_warmth(node, manifest, planned.get(node.name), None, state_dir,
                                    error=str(exc))
        return warm.node_warmth(node, manifest, planned.get(node.name), listing, state_dir)

    rows = await asyncio.gather(*(one(n) for n in nodes))
    standbys = set(standby.standby_names(ctx.config))
    links = await asyncio.to_thread(lambda: [link_rate.load(ctx.config, n) for n in nodes])
    rows = [dataclasses.replace(r, standby=r.name in standbys, link=link)
            for r, link in zip(rows, links, strict=True)]
    cacheable = sum(t.size for t in manifest.cacheable())
    return WarmthReport(manifest.path, manifest.size,
                        cacheable / manifest.size if manifest.size else 0.0, tuple(rows))


async def prewarm(ctx: EngineContext, nodes: Sequence[NodeConfig], spans: Sequence[Span],
                  verify: bool, progress: warm.Progress) -> list[WarmResult]:
    manifest = await manifest_of(ctx)
    planned = _spans(standby.with_standbys(ctx.config, spans))
    chosen = [n for n in nodes if n.name in planned]
    return list(await asyncio.gather(*(
        warm.warm_node(ctx.transport(n.name), ctx.config, n, ctx.node_state_dir(n), manifest,
                       planned[n.name], progress, verify) for n in chosen)))


async def verify_only(ctx: EngineContext, nodes: Sequence[NodeConfig]) -> list[str]:
    manifest = await manifest_of(ctx)
    found = await asyncio.gather(*(
        warm.verify(ctx.transport(n.name), n, ctx.node_state_dir(n), manifest)
        for n in nodes), return_exceptions=True)
    out: list[str] = []
    for node, got in zip(nodes, found, strict=True):
        out += [f"{node.name}: {got}"] if isinstance(got, BaseException) else got
    return out


async def before_start(ctx: EngineContext, node: NodeConfig) -> list[str]:
    """The size check before a worker starts: wrong-size files of the model moved aside (a
    truncated one would be loaded silently, an oversized one crashes rpc-server)."""
    if not node.cache or ctx.config.model.gguf is None:
        return []
    try:
        manifest = await manifest_of(ctx)
        return await warm.check_sizes(ctx.transport(node.name), node, ctx.node_state_dir(node),
                                      manifest)
    except (EngineError, TransportError):
        return []  # the start itself will say what is wrong with the node


async def prune(ctx: EngineContext, nodes: Sequence[NodeConfig],
                dry_run: bool) -> list[PruneResult]:
    manifest = None
    if ctx.config.model.gguf is not None:
        manifest = await manifest_of(ctx)

    async def one(node: NodeConfig) -> PruneResult:
        try:
            return await warm.prune(ctx.transport(node.name), node, ctx.node_state_dir(node),
                                    manifest, dry_run)
        except TransportError as exc:
            return PruneResult(node.name, (), 0, None, dry_run, error=str(exc))

    return list(await asyncio.gather(*(one(n) for n in nodes)))


async def warm_share(ctx: EngineContext, node: NodeConfig, span: tuple[int, int]) -> float | None:
    """The share of the span's cacheable bytes the node's cache holds, name and size right."""
    if not node.cache or ctx.config.model.gguf is None:
        return None
    try:
        manifest = await manifest_of(ctx)
        state_dir = ctx.node_state_dir(node)
        listing = await warm.list_cache(ctx.transport(node.name), state_dir)
    except (EngineError, TransportError):
        return None
    return warm.node_warmth(node, manifest, span, listing, state_dir).warm_share
