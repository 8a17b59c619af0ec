"""rpc-server's tensor cache on the nodes: read it, check it against the model's manifest,
fill it (cut from the node's own copy of the model, else pushed over SSH), prune it.

The worker runs with LLAMA_CACHE=cache in its state directory (engine.start_node, detached
spawn cds there), and rpc-server adds "rpc": the cache is STATE_DIR/cache/rpc, one file per
tensor named by its FNV-1a 64 hash (16 lowercase hex). rpc-server never checks a file against
its name, so every file here is written under `.part-HASH`, checked, and only then renamed.
Every path and name reaches the node quoted once (core.reach.shell); names we act on are
16-hex names from our manifest, never names read back from the node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncssh

from core.config import ClusterConfig, NodeConfig
from core.engines.llama_rpc.manifest import HEX16, TOOL_SOURCE, Manifest, TensorEntry
from core.reach.shell import path_word, quote, sh_c
from core.reach.transport import SshTransport, Transport, TransportError
from core.text import terminal_safe
from core.units import format_bytes
from core.weight_cache import NodeWarmth, PartWarmth, PruneResult, WarmProgress, WarmResult

CACHE_SUBDIR = "cache/rpc"
ASIDE_SUBDIR = "cache/aside"  # files moved out of rpc-server's sight (wrong size or hash)
_HEX_GLOB = "[0-9a-f]" * 16
_PUSH_CHUNK = 1 << 20
Progress = Callable[[WarmProgress], None]


def cache_dir(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/{CACHE_SUBDIR}"


def aside_dir(state_dir: str) -> str:
    return f"{state_dir.rstrip('/')}/{ASIDE_SUBDIR}"


@dataclass(frozen=True)
class CacheListing:
    exists: bool
    files: dict[str, int] = field(default_factory=dict)  # hash -> size, oldest first
    parts: dict[str, int] = field(default_factory=dict)  # partial files: hash -> size
    free_bytes: int | None = None


def _listing_script(state_dir: str) -> str:
    return f"""umask 077
d={path_word(cache_dir(state_dir))}
if [ ! -d "$d" ] || ! cd "$d"; then
  # The space it would be written to: that of the nearest directory that exists.
  p="$d"; while [ -n "$p" ] && [ ! -d "$p" ]; do p="${{p%/*}}"; done
  set -f; set -- $(df -Pk "${{p:-/}}" 2>/dev/null | tail -n 1); set +f
  echo "FREE ${{4:-}}"; echo "TORBIZ nocache"; exit 0
fi
chmod 700 . 2>/dev/null
ls -1atr | while IFS= read -r f; do
  case $f in
    {_HEX_GLOB}) [ -f "$f" ] && [ ! -L "$f" ] && echo "F $f $(wc -c < "$f")";;
    .part-{_HEX_GLOB}) [ -f "$f" ] && [ ! -L "$f" ] && echo "P ${{f#.part-}} $(wc -c < "$f")";;
  esac
done
set -f; set -- $(df -Pk . 2>/dev/null | tail -n 1); set +f
echo "FREE ${{4:-}}"
"""


def parse_listing(text: str) -> CacheListing:
    files: dict[str, int] = {}
    parts: dict[str, int] = {}
    free = None
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["TORBIZ", "nocache"]:
            return CacheListing(False, free_bytes=free)
        if len(words) == 3 and words[0] in ("F", "P") and HEX16.match(words[1]) \
                and words[2].isdigit():
            (files if words[0] == "F" else parts)[words[1]] = int(words[2])
        elif len(words) == 2 and words[0] == "FREE" and words[1].isdigit():
            free = int(words[1]) * 1024
    return CacheListing(True, files, parts, free)


async def list_cache(transport: Transport, state_dir: str) -> CacheListing:
    result = await transport.run(_listing_script(state_dir), timeout=60.0)
    return parse_listing(result.stdout)


# ---- the warm map ------------------------------------------------------------------------------

def node_warmth(node: NodeConfig, manifest: Manifest, span: tuple[int, int] | None,
                listing: CacheListing | None, state_dir: str,
                error: str | None = None) -> NodeWarmth:
    """One node's row: what its span needs, what its cache holds (name and size right)."""
    wanted = manifest.by_hash()
    listing = listing or CacheListing(False)
    good = {h for h, size in listing.files.items() if h in wanted and wanted[h].size == size}
    wrong = sum(1 for h, size in listing.files.items() if h in wanted and wanted[h].size != size)
    foreign = sum(size for h, size in listing.files.items() if h not in wanted)
    needed: list[TensorEntry] = []
    small = 0
    if span is not None:
        first, count = span
        last = first + count >= manifest.n_layer
        needed = manifest.for_span(first, count, last)
        small = sum(t.size for t in manifest.tensors if not t.cacheable and (
            (t.block is not None and first <= t.block < first + count)
            or (t.block is None and t.part == "output" and last)))
    parts: dict[str, list[int]] = {}
    blocks: dict[str, int | None] = {}
    for t in needed:
        row = parts.setdefault(t.part, [0, 0])
        blocks[t.part] = t.block
        row[1] += t.size
        if t.hash in good:
            row[0] += t.size
    return NodeWarmth(
        name=node.name, planned=span, reachable=error is None, error=error,
        cache_dir=cache_dir(state_dir), cached_files=len(good),
        cache_bytes=sum(listing.files.values()), foreign_bytes=foreign, wrong_files=wrong,
        warm_bytes=sum(t.size for t in needed if t.hash in good),
        cacheable_bytes=sum(t.size for t in needed), small_bytes=small,
        free_bytes=listing.free_bytes,
        parts=tuple(PartWarmth(p, w, c, blocks[p]) for p, (w, c) in parts.items()))


# ---- caches that cannot lie --------------------------------------------------------------------

def _aside_script(state_dir: str, names: Sequence[str]) -> str:
    moves = "\n".join(
        f'[ -f "$d"/{quote(n)} ] && mv -f "$d"/{quote(n)} "$a"/{quote(n)}.$$ && echo "moved {n}"'
        for n in names if HEX16.match(n))
    return f"""umask 077
d={path_word(cache_dir(state_dir))}; a={path_word(aside_dir(state_dir))}
mkdir -p "$a" && chmod 700 "$a" || exit 0
{moves}
"""


async def move_aside(transport: Transport, state_dir: str, names: Sequence[str]) -> list[str]:
    if not names:
        return []
    result = await transport.run(_aside_script(state_dir, names), timeout=60.0)
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("moved ")]


def wrong_sizes(manifest: Manifest, listing: CacheListing) -> dict[str, str]:
    """Cache files named by one of the model's tensors whose size is not that tensor's:
    hash -> why (truncated: rpc-server loads it silently; oversized: it crashes)."""
    wanted = manifest.by_hash()
    out = {}
    for h, size in listing.files.items():
        t = wanted.get(h)
        if t is not None and size != t.size:
            kind = "truncated" if size < t.size else "oversized"
            out[h] = (f"{h} ({t.name}) is {kind}: {size} bytes, the tensor has {t.size}")
    return out


async def check_sizes(transport: Transport, node: NodeConfig, state_dir: str,
                      manifest: Manifest) -> list[str]:
    """Move aside every cache file of the model whose size is wrong; one sentence each."""
    listing = await list_cache(transport, state_dir)
    bad = wrong_sizes(manifest, listing)
    moved = await move_aside(transport, state_dir, sorted(bad))
    return [f"{node.name}: cache file {bad[h]}; moved aside to {aside_dir(state_dir)}"
            for h in moved]


# ---- the tool on the node ----------------------------------------------------------------------

def _tool_script() -> str:
    """sh that sets $t to the node's tensor tool, compiled there from our source when missing;
    $t stays empty where the node has no C compiler."""
    source = TOOL_SOURCE.read_text()
    import hashlib
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"""umask 077
t="$HOME"/.cache/torbiz/tensor-tool/tensor_tool-{key}
if [ ! -x "$t" ]; then
  if command -v cc >/dev/null 2>&1; then
    mkdir -p "${{t%/*}}"
    cat > "$t.$$.c" <<'TORBIZ_TOOL_SOURCE'
{source}
TORBIZ_TOOL_SOURCE
    cc -O2 -DTOOL_MAIN -o "$t.$$" "$t.$$.c" 2>/dev/null && mv -f "$t.$$" "$t"
    rm -f "$t.$$.c" "$t.$$"
  fi
  [ -x "$t" ] || t=
fi
"""


def _python_hash(path_sh: str, offset: int, size: int) -> str:
    """The fallback hasher where the node has no cc: python3, slow (a few MB/s)."""
    prog = ("import sys\nf=open(sys.argv[1],'rb');f.seek(int(sys.argv[2]));n=int(sys.argv[3])\n"
            "h=0xcbf29ce484222325\nwhile n>0:\n b=f.read(min(n,1<<20))\n if not b: break\n"
            " n-=len(b)\n for c in b: h=((h^c)*0x100000001b3)&0xffffffffffffffff\n"
            "print('hash %016x'%h if n==0 else 'error short')")
    return f"python3 -c {quote(prog)} {path_sh} {offset} {size}"


def _hash_line(path_sh: str, offset: int, size: int) -> str:
    return (f'if [ -n "$t" ]; then "$t" hash {path_sh} {offset} {size}; '
            f"else {_python_hash(path_sh, offset, size)}; fi")


# ---- verify ------------------------------------------------------------------------------------

async def verify(transport: Transport, node: NodeConfig, state_dir: str,
                 manifest: Manifest) -> list[str]:
    """Re-hash every cache file of the model on the node; move aside the ones whose bytes are
    not their name's. One sentence per file moved."""
    listing = await list_cache(transport, state_dir)
    wanted = manifest.by_hash()
    names = [h for h, size in listing.files.items() if h in wanted and wanted[h].size == size]
    if not names:
        return []
    lines = [_tool_script(), f"d={path_word(cache_dir(state_dir))}"]
    for h in names:
        target = '"$d"/' + h
        lines.append(f'printf "%s " {h}; {_hash_line(target, 0, wanted[h].size)}')
    result = await transport.run("\n".join(lines), timeout=3600.0)
    bad = []
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] in wanted and words[1] == "hash" and words[2] != words[0]:
            bad.append(words[0])
    moved = await move_aside(transport, state_dir, bad)
    return [f"{node.name}: cache file {h} ({wanted[h].name}) holds other bytes (hash "
            f"mismatch); moved aside to {aside_dir(state_dir)}" for h in moved]


# ---- pre-warm ----------------------------------------------------------------------------------

class WarmError(Exception):
    pass


async def check_node_copy(transport: Transport, node: NodeConfig, path: str,
                          manifest: Manifest) -> str | None:
    """None when the node has no file at path; "same" when it is the model (size and three
    tensors' hashes agree); otherwise raise WarmError with what differs."""
    probes = _probe_tensors(manifest)
    word = path_word(path)
    lines = [_tool_script(), f"m={word}",
             'if [ ! -f "$m" ]; then echo "TORBIZ nofile"; exit 0; fi',
             'echo "SIZE $(wc -c < "$m")"']
    for i, t in enumerate(probes):  # by index: a tensor name is the model file's text
        hashed = _hash_line('"$m"', t.offset, t.size)
        lines.append(f'printf "%s " {i}; {hashed}')
    result = await transport.run("\n".join(lines), timeout=600.0)
    out = result.stdout.split("\n")
    if any(line.strip() == "TORBIZ nofile" for line in out):
        return None
    size = next((int(w[1]) for line in out if len(w := line.split()) == 2 and w[0] == "SIZE"
                 and w[1].isdigit()), None)
    if size != manifest.size:
        raise WarmError(f"{node.name}: its model copy {path} is not the same model: "
                        f"{size if size is not None else '?'} bytes there, {manifest.size} "
                        "here; fix or remove model_path for this node (nothing was cut from it)")
    got = {}
    for line in out:
        words = line.split()
        if len(words) == 3 and words[1] == "hash" and words[0].isdigit():
            got[int(words[0])] = words[2]
    for i, t in enumerate(probes):
        if got.get(i) != t.hash:
            raise WarmError(f"{node.name}: its model copy {path} is not the same model: tensor "
                            f"{terminal_safe(t.name)!r} hashes to {got.get(i, '?')} there, "
                            f"{t.hash} here; "
                            "fix or remove model_path for this node (nothing was cut from it)")
    return "same"


def _probe_tensors(manifest: Manifest) -> list[TensorEntry]:
    """Three tensors spread over the file, small ones first (cheap to hash on the node)."""
    ts = sorted(manifest.tensors, key=lambda t: t.offset)
    picks = {0, len(ts) // 2, len(ts) - 1} if ts else set()
    return [ts[i] for i in sorted(picks)]


def _space_sentence(node: NodeConfig, need: int, free: int | None, where: str) -> str:
    have = format_bytes(free) if free is not None else "unknown"
    return (f"{node.name}: not enough disk space for its cache at {where}: needs "
            f"{format_bytes(need)}, {have} free; free some space, set cache_limit_gb lower or "
            "run `torbiz-tui cache prune`; no partial file was left")


async def cut_on_node(transport: Transport, node: NodeConfig, state_dir: str, model_path: str,
                      tensors: Sequence[TensorEntry], progress: Progress) -> int:
    """Cut the tensors out of the node's own model file into its cache, on the node (the tool
    checks size and hash before the rename). Returns bytes written."""
    total = sum(t.size for t in tensors)
    lines = [_tool_script(), f"m={path_word(model_path)}",
             f"d={path_word(cache_dir(state_dir))}",
             'mkdir -p "$d" && chmod 700 "$d" || '
             '{ echo "error mkdir"; echo "TORBIZ done"; exit 0; }']
    for t in tensors:
        lines.append(
            f'if [ -n "$t" ]; then "$t" cut "$m" {t.offset} {t.size} {t.hash} "$d"; else '
            f'rm -f "$d"/.part-{t.hash}; '
            f'if dd if="$m" of="$d"/.part-{t.hash} bs=1M iflag=skip_bytes,count_bytes '
            f'skip={t.offset} count={t.size} 2>/dev/null '
            f'&& [ "$(wc -c < "$d"/.part-{t.hash})" = {t.size} ]; then '
            f'mv -f "$d"/.part-{t.hash} "$d"/{t.hash} && echo "ok {t.hash}"; else '
            f'rm -f "$d"/.part-{t.hash}; echo "error nospace-or-read"; fi; fi')
        lines.append('case $? in 0) ;; *) echo "TORBIZ done"; exit 0;; esac')
    # The stream ends only when we stop reading (it is tied to our stdin): say when to stop.
    lines.append('echo "TORBIZ done"')
    started = time.monotonic()
    done = 0
    sizes = {t.hash: t.size for t in tensors}
    error = None
    async for line in transport.stream_lines("\n".join(lines)):
        words = line.split()
        if len(words) >= 2 and words[0] == "ok" and words[1] in sizes:
            done += sizes[words[1]]
            progress(WarmProgress(node.name, done, total, time.monotonic() - started,
                                  "node copy"))
        elif words[:1] == ["error"]:
            error = " ".join(words[1:])[:200]
            break
        elif words == ["TORBIZ", "done"]:
            break
    if error is not None or done < total:
        if error is not None and ("nospace" in error or "No space" in error):
            listing = await list_cache(transport, state_dir)
            raise WarmError(_space_sentence(node, total - done, listing.free_bytes,
                                            cache_dir(state_dir)))
        raise WarmError(f"{node.name}: cutting tensors from its model copy {model_path} "
                        f"stopped after {format_bytes(done)} of {format_bytes(total)}: "
                        f"{error or 'the command ended early'}")
    return done


async def _push_one(transport: Transport, node: NodeConfig, state_dir: str, model: str,
                    t: TensorEntry, resume_from: int, on_bytes: Callable[[int], None]) -> None:
    """Stream one tensor's bytes (from resume_from) into .part-HASH on the node, then check its
    size and rename it."""
    part = f'"$d"/.part-{t.hash}'
    script = f"""umask 077
d={path_word(cache_dir(state_dir))}
mkdir -p "$d" && chmod 700 "$d" || {{ echo "error mkdir"; exit 0; }}
{'' if resume_from else f'rm -f {part}; '}if cat >> {part}; then :; else
  cat > /dev/null; rm -f {part}; echo "error nospace"; exit 0; fi
n=$(wc -c < {part})
if [ "$n" = {t.size} ]; then mv -f {part} "$d"/{t.hash} && echo "ok {t.hash}"
elif [ "$n" -gt {t.size} ]; then rm -f {part}; echo "error oversized $n"
else echo "error short $n"; fi
"""
    with open(model, "rb") as src:  # noqa: ASYNC230 - reads go through to_thread below
        src.seek(t.offset + resume_from)
        left = t.size - resume_from
        if isinstance(transport, SshTransport):
            conn = await transport._connection()  # one connection per node; a channel more
            proc = await conn.create_process(sh_c(script), encoding=None,
                                             stderr=asyncssh.DEVNULL)
            write, drain, eof = proc.stdin.write, proc.stdin.drain, proc.stdin.write_eof
            read_out = proc.stdout.read
        else:
            lp = await asyncio.create_subprocess_exec(
                "sh", "-c", script, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            assert lp.stdin is not None and lp.stdout is not None
            write, drain, eof = lp.stdin.write, lp.stdin.drain, lp.stdin.close
            read_out = lp.stdout.read
        try:
            while left > 0:
                chunk = await asyncio.to_thread(src.read, min(_PUSH_CHUNK, left))
                if not chunk:
                    raise WarmError(f"{node.name}: the model file {model} ended early")
                write(chunk)
                await drain()
                left -= len(chunk)
                on_bytes(len(chunk))
            eof()
        except (BrokenPipeError, ConnectionResetError, asyncssh.Error) as exc:
            raise WarmError(f"{node.name}: pushing {t.name} was cut off ({exc})") from None
        out = (await read_out(-1 if isinstance(transport, SshTransport) else 65536)).decode(
            "utf-8", "replace")
    words = out.split()
    if words[:2] == ["ok", t.hash]:
        return
    if words[:2] == ["error", "nospace"]:
        listing = await list_cache(transport, state_dir)
        raise WarmError(_space_sentence(node, t.size, listing.free_bytes, cache_dir(state_dir)))
    raise WarmError(f"{node.name}: pushing {t.name} failed: {' '.join(words)[:160] or 'no answer'}")


async def push(transport: Transport, node: NodeConfig, state_dir: str, model: str,
               tensors: Sequence[TensorEntry], parts: dict[str, int],
               progress: Progress) -> int:
    """Push the tensors over the node's connection, resuming partial files."""
    total = sum(t.size - min(parts.get(t.hash, 0), t.size) for t in tensors)
    started = time.monotonic()
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(WarmProgress(node.name, done, total, time.monotonic() - started, "push"))

    for t in tensors:
        have = parts.get(t.hash, 0)
        await _push_one(transport, node, state_dir, model, t, have if have < t.size else 0,
                        on_bytes)
    return done


def node_model_path(config: ClusterConfig, node: NodeConfig) -> str:
    return node.model_path or str(config.model.gguf)


async def warm_node(transport: Transport, config: ClusterConfig, node: NodeConfig,
                    state_dir: str, manifest: Manifest, span: tuple[int, int],
                    progress: Progress, verify_after: bool = False) -> WarmResult:
    """Fill one node's cache with exactly its span's cacheable tensors that are missing."""
    started = time.monotonic()
    first, count = span
    needed = manifest.for_span(first, count, first + count >= manifest.n_layer)
    try:
        aside = await check_sizes(transport, node, state_dir, manifest)
        listing = await list_cache(transport, state_dir)
        missing = [t for t in _unique(needed) if listing.files.get(t.hash) != t.size]
        need_bytes = sum(t.size for t in missing)
        evicted = await make_room(transport, node, state_dir, manifest, listing,
                                  {t.hash for t in needed}, need_bytes)
        if evicted:
            listing = await list_cache(transport, state_dir)
        if listing.free_bytes is not None and need_bytes > listing.free_bytes:
            raise WarmError(_space_sentence(node, need_bytes, listing.free_bytes,
                                            cache_dir(state_dir)))
        source = "push"
        written = 0
        if missing:
            model_path = node_model_path(config, node)
            local = await check_node_copy(transport, node, model_path, manifest)
            if local is not None:
                source = "node copy"
                written = await cut_on_node(transport, node, state_dir, model_path, missing,
                                            progress)
            else:
                written = await push(transport, node, state_dir, str(config.model.gguf),
                                     missing, listing.parts, progress)
        if verify_after:
            aside += await verify(transport, node, state_dir, manifest)
        progress(WarmProgress(node.name, written, written, time.monotonic() - started, source,
                              finished=True))
        return WarmResult(node.name, source, len(missing), written,
                          len(_unique(needed)) - len(missing), time.monotonic() - started,
                          tuple(aside), evicted=tuple(evicted))
    except (WarmError, TransportError) as exc:
        error = str(exc)
        progress(WarmProgress(node.name, 0, 0, time.monotonic() - started, "", True, error))
        return WarmResult(node.name, "", 0, 0, 0, time.monotonic() - started, error=error)


def limit_bytes(node: NodeConfig) -> int | None:
    return int(node.cache_limit_gb * (1 << 30)) if node.cache_limit_gb is not None else None


def eviction_for(node: NodeConfig, manifest: Manifest, listing: CacheListing,
                 keep: set[str], need_bytes: int) -> list[tuple[str, int]]:
    """What to evict so that the cache plus need_bytes stays within the node's cache_limit_gb:
    tensors of no configured model first, then the model's tensors outside this node's span,
    each oldest first; never one in `keep` (the span's). Raises WarmError when the span alone
    is above the limit."""
    limit = limit_bytes(node)
    if limit is None:
        return []
    wanted = manifest.by_hash()
    span_bytes = sum(wanted[h].size for h in keep if h in wanted)
    if span_bytes > limit:
        raise WarmError(f"{node.name}: its planned blocks need {format_bytes(span_bytes)} of "
                        f"cached tensors, above its cache_limit_gb ({format_bytes(limit)}); "
                        "raise cache_limit_gb or give it fewer blocks; nothing was written")
    total = sum(listing.files.values()) + need_bytes
    foreign = [(h, s) for h, s in listing.files.items() if h not in wanted]  # oldest first
    other = [(h, s) for h, s in listing.files.items() if h in wanted and h not in keep]
    evict = []
    for h, size in foreign + other:
        if total <= limit:
            break
        evict.append((h, size))
        total -= size
    return evict


async def make_room(transport: Transport, node: NodeConfig, state_dir: str, manifest: Manifest,
                    listing: CacheListing, keep: set[str],
                    need_bytes: int) -> list[tuple[str, int]]:
    evict = eviction_for(node, manifest, listing, keep, need_bytes)
    names = " ".join(f'"$d"/{h}' for h, _ in evict if HEX16.match(h))
    if names:
        await transport.run(f"d={path_word(cache_dir(state_dir))}\nrm -f {names}\n",
                            timeout=120.0)
    return evict


def _unique(tensors: Sequence[TensorEntry]) -> list[TensorEntry]:
    seen: dict[str, TensorEntry] = {}
    for t in tensors:
        seen.setdefault(t.hash, t)
    return list(seen.values())


# ---- prune -------------------------------------------------------------------------------------

async def prune(transport: Transport, node: NodeConfig, state_dir: str,
                manifest: Manifest | None, dry_run: bool) -> PruneResult:
    """Evict tensors of no configured model, oldest first: all of them, or with a cache limit
    only as many as it takes to get under it. Files moved aside go too."""
    listing = await list_cache(transport, state_dir)
    wanted = manifest.by_hash() if manifest is not None else {}
    limit = int(node.cache_limit_gb * (1 << 30)) if node.cache_limit_gb is not None else None
    total = sum(listing.files.values())
    evict: list[tuple[str, int]] = []
    for h, size in listing.files.items():  # oldest first
        if h in wanted and wanted[h].size == size:
            continue
        if limit is not None and total <= limit:
            break
        evict.append((h, size))
        total -= size
    notes = []
    if limit is not None and total > limit:
        notes.append(f"{node.name}: its cache holds {format_bytes(total)} of the configured "
                     f"model, above its cache_limit_gb ({format_bytes(limit)}); nothing of the "
                     "model was evicted")
    if not dry_run and evict:
        rm = " ".join(f'"$d"/{h}' for h, _ in evict if HEX16.match(h))
        await transport.run(f'd={path_word(cache_dir(state_dir))}\nrm -f {rm}\n'
                            f'rm -rf {path_word(aside_dir(state_dir))}', timeout=120.0)
    return PruneResult(node.name, tuple(evict), total, limit, dry_run, notes=tuple(notes))

