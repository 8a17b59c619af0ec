"""Hostile and random cluster files: every input is either a valid config or a ConfigError that
names the file (and a table when it can), never a traceback; and whatever the loader accepts
can be used: the workers', Petals servers' and coordinator's command lines build without an
exception, and every word reaches a real sh quoted (it prints back exactly the word)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import tomllib
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.config import ClusterConfig, ConfigError, load_config, parse_config
from core.engines.llama_rpc import rpc
from core.engines.llama_rpc.coordinator import CoordinatorError, coordinator_argv
from core.engines.petals import commands as petals
from core.engines.registry import exposure_warnings
from core.reach import detached
from core.reach.shell import path_word, quote_argv

KEYS = ["name", "host", "ssh_port", "transport", "backend", "rpc_server", "rpc_host", "rpc_port",
        "rpc_bind", "threads", "cache", "user", "identity_file", "known_hosts", "config_file",
        "connect_timeout", "keepalive_interval", "keepalive_count_max", "reserve_gb",
        "max_memory_gb", "weight", "state_dir", "gguf", "context", "binary", "port",
        "extra_args", "policy", "cache_type", "coordinator_layers", "bogus", "", "nodes",
        "dht_prefix", "torch_dtype", "num_handlers", "throughput", "attn_cache_tokens",
        "initial_peers", "python", "api_key_env", "hf", "recover", "threads"]
TABLES = ["cluster", "ssh", "model", "coordinator", "plan", "nodes", "petals", "extra"]
HUGE = [10**400, -10**400, 2**63, 2**64, -2**63 - 1, 10**19]
CONTROL = ["\x00", "\x1b[2J", "\x1b]52;c;aGk=\x07", "a\nb", "a\r", "\x7f", "\x9b", "\u202e",
           "\u2066x", "x\n"]

scalars = st.one_of(
    st.text(max_size=40), st.integers(min_value=-2**70, max_value=2**70), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(HUGE),
    st.sampled_from(["127.0.0.1", "a; rm -rf /", "$(touch /tmp/x)", "-oProxyCommand=x", "local",
                     "ssh", "petals", "llama-rpc", "loopback", "any", "pack", "f16", "~/x",
                     "node-1", "0.0.0.0", "::1", "~nosuchuser/x", "", "float32", "bfloat16",
                     "/ip4/10.0.0.5/tcp/31337/p2p/QmX", "TORBIZ_API_KEY", *CONTROL]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=12)
tables = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
documents = st.dictionaries(
    st.sampled_from(TABLES),
    st.one_of(tables, st.lists(tables, max_size=4), scalars), max_size=6)


def _check(result: object) -> None:
    assert isinstance(result, ClusterConfig)
    assert result.nodes, "a valid config has nodes"
    assert len({n.name for n in result.nodes}) == len(result.nodes)
    for text in strings_in(result):  # what the operator reads back is what the file says
        assert not any(unicodedata.category(c) == "Cc" or c == "\u202e" for c in text), text
    use(result)


def strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Path):
        return [str(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in strings_in(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in strings_in(item)]
    return []


HOME = "/home/fuzz user"  # the remote user's home, with a space in it


def sh_words(command: str) -> list[str]:
    """The words a real sh makes of `command`: it prints each back, NUL-terminated."""
    done = subprocess.run(["sh", "-c", "printf '%s\\0' " + command], capture_output=True,
                          env={"HOME": HOME, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          check=True, timeout=10)
    return os.fsdecode(done.stdout).split("\0")[:-1]


def sh_parses(script: str) -> None:
    done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True,
                          check=False, timeout=10)
    assert done.returncode == 0, (done.stderr, script)


def on_node(path: str) -> str:
    """What path_word() means on the node: ~ is the remote user's home, nothing else moves."""
    if path == "~" or path.startswith("~/"):
        return HOME + path[1:]
    return path


def use(config: ClusterConfig) -> None:
    """Everything `up` builds from the config: it builds without an exception (a missing
    model is a CoordinatorError, a sentence), every remote word reaches sh as itself, and
    the coordinator listens where the config says."""
    exposure_warnings(config)
    for node in config.nodes:
        state_dir = f"{config.state_dir.rstrip('/') or '/'}/{config.name}/{node.name}"
        if node.backend == "llama-rpc":
            args = rpc.rpc_server_args(node)
            program = node.rpc_server
            scripts = [detached.spawn_script(state_dir, args, resolve=rpc.resolve_binary_sh(node),
                                             listen=rpc.listen_address(node))]
        else:
            program = petals.node_python(node)
            args = petals.server_args(config, node, state_dir, "/models/m y", (0, 1), [])
            scripts = [detached.spawn_script(state_dir, args,
                                             resolve=petals.resolve_python_sh(node),
                                             listen=petals.listen_address(node)),
                       petals.prepare_script(node, state_dir)]
        for script in scripts:
            sh_parses(script)
        paths = [state_dir] + ([program] if program else [])
        line = " ".join([*(path_word(p) for p in paths), quote_argv(args)])
        assert sh_words(line) == [*(on_node(p) for p in paths), *args]
        assert shlex.split(quote_argv(args)) == args
    if any(n.backend == "llama-rpc" for n in config.nodes):
        try:
            argv = coordinator_argv(config, "llama-server",
                                    [n.endpoint for n in config.nodes], layers=[1] * 1)
        except CoordinatorError as exc:
            assert config.model.gguf is None, exc
        else:
            assert argv.count("--host") == 1
            assert argv[argv.index("--host") + 1] == config.coordinator.host


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(documents)
def test_any_document_is_a_config_or_a_config_error(doc: dict) -> None:
    path = Path("/cfg/cluster.toml")
    try:
        _check(parse_config(doc, path))
    except ConfigError as exc:
        assert exc.path == str(path)
        assert str(exc).startswith(str(path))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture],
          deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(
    lambda b: b.decode("latin-1")))
def test_any_text_file_is_a_config_or_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "f.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text \
        else path.write_bytes(text.encode("utf-8", "replace"))
    try:
        _check(load_config(path))
    except ConfigError as exc:
        assert str(path) in str(exc)


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)
# Text a shell would read as syntax, yet a valid value: the loader accepts it, quoting carries it.
weird = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1, max_size=12),
    st.sampled_from(["a b", "$(touch /tmp/x)", "`id`", "'; rm -rf / #", '"', "\\", "-rf", "*",
                     "$HOME", "\u00e9 \u00fc", "a'b\"c", "x;y|z&", "~", "~/"]))
paths = st.one_of(weird.map(lambda p: "~/" + p), weird.map(lambda p: "/opt/" + p),
                  weird.map(lambda p: p if not p.startswith("~") or p in ("~", "~/")
                            else "./" + p))
_HOSTILE_WORDS = st.sampled_from(["~nosuchuser/x", "~root/x", "", "-oProxyCommand=x", "gpu-box",
                                  "::1", "localhost", "0.0.0.0", "all", *CONTROL, *HUGE])
hostile = st.one_of(
    _HOSTILE_WORDS, _HOSTILE_WORDS, _HOSTILE_WORDS, st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 70000), st.booleans(),
    st.lists(st.text(max_size=4) | st.sampled_from(["--host", "--api-key=k", "-ngl", "\x1b["]),
             max_size=2))


@st.composite
def documents_to_use(draw: st.DrawFn) -> dict[str, Any]:
    """A valid cluster file full of shell syntax, then (mostly) one value made hostile."""
    backend = draw(st.sampled_from(["llama-rpc", "petals"]))
    nodes = []
    for index in range(draw(st.integers(1, 3))):
        node: dict[str, Any] = {"name": f"{draw(names)}-{index}", "backend": backend,
                                "host": draw(st.sampled_from(["127.0.0.1", "10.0.0.5"])),
                                "rpc_port": 40000 + index}
        if backend == "llama-rpc":
            node.update(draw(st.sampled_from([
                {}, {"transport": "local", "host": "localhost"},
                {"host": "gpu-box", "rpc_bind": "loopback"}, {"host": "gpu-box",
                                                              "rpc_bind": "any"},
                {"host": "gpu-box", "rpc_host": "10.0.0.9"}, {"rpc_bind": "10.0.0.7"}])))
        node.update(draw(st.fixed_dictionaries({}, optional={
            "rpc_server": paths, "python": paths, "threads": st.integers(1, 64),
            "weight": st.floats(0.5, 10), "identity_file": paths, "known_hosts": paths,
            "user": weird, "transport": st.sampled_from(["ssh", "local"])})))
        if node.get("transport") == "local" and node.get("rpc_bind") == "loopback":
            del node["rpc_bind"]  # a tunnel needs ssh: refused, but not what this draws
        nodes.append(node)
    doc: dict[str, Any] = {"nodes": nodes}
    doc.update(draw(st.fixed_dictionaries({}, optional={
        "cluster": st.fixed_dictionaries({}, optional={
            "name": names, "state_dir": paths, "recover": st.booleans()}),
        "model": st.fixed_dictionaries({}, optional={
            "gguf": paths, "hf": paths, "context": st.integers(1, 1 << 20)}),
        "coordinator": st.fixed_dictionaries({}, optional={
            "host": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "localhost"]),
            "port": st.integers(1024, 65535), "binary": paths,
            "api_key_env": st.just("KEY_1"),
            "extra_args": st.lists(weird.filter(lambda a: not a.startswith("-"))
                                   | st.sampled_from(["--parallel", "2", "-a", "--no-repack"]),
                                   max_size=4)}),
        "petals": st.fixed_dictionaries({}, optional={
            "python": paths, "dht_prefix": names, "throughput": st.floats(0.1, 100),
            "num_handlers": st.integers(1, 64), "attn_cache_tokens": st.integers(1, 1 << 16),
            "torch_dtype": st.sampled_from(["float32", "bfloat16"]),
            "initial_peers": st.lists(st.just("/ip4/10.0.0.5/tcp/31337/p2p/QmX"),
                                      max_size=1)}),
    })))
    if draw(st.integers(0, 3)):  # three times in four: one value replaced by a hostile one
        tables = [(name, t) for name, t in doc.items() if isinstance(t, dict) and t]
        tables += [(f"nodes[{i}]", n) for i, n in enumerate(nodes)]
        _, table = draw(st.sampled_from(tables))
        table[draw(st.sampled_from(sorted(table)))] = draw(hostile)
    return doc


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(documents_to_use())
def test_what_the_loader_accepts_can_be_used(doc: dict[str, Any]) -> None:
    """Well-formed files full of shell syntax, most with one hostile value: a ConfigError
    naming the file, or a config whose command lines build and quote every word."""
    path = Path("/cfg/cluster.toml")
    try:
        config = parse_config(doc, path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        event(f"refused: {exc.message.split(',')[0][:40]}")
        return
    event(f"accepted: {len(config.nodes)} nodes, {config.nodes[0].backend}")
    _check(config)


def test_valid_documents_survive_mutation_of_each_value() -> None:
    base = tomllib.loads("""
[cluster]
name = "c"
[ssh]
user = "u"
[model]
context = 1024
[coordinator]
port = 9000
[plan]
policy = "spread"
[[nodes]]
name = "a"
host = "10.0.0.1"
rpc_port = 50052
weight = 2.0
""")
    path = Path("/cfg/c.toml")
    _check(parse_config(base, path))
    hostile = [None, "", "x" * 10_000, -1, 0, 2**64, 10**400, 1.5, True, [], {}, "a;b", "\n",
               "~nosuchuser/x", "\x00", "\u202e"]
    for table, content in base.items():
        entries = content[0] if isinstance(content, list) else content
        for key in entries:
            for bad in hostile:
                doc = tomllib.loads(tomllib_dump(base))
                target = doc[table][0] if isinstance(doc[table], list) else doc[table]
                if bad is None:
                    del target[key]
                else:
                    target[key] = bad
                try:
                    _check(parse_config(doc, path))
                except ConfigError as exc:
                    assert exc.where.startswith(table) or exc.where == ""


def tomllib_dump(doc: dict) -> str:
    """Enough of a TOML writer for the flat test document above."""
    out = []
    for table, content in doc.items():
        rows = content if isinstance(content, list) else [content]
        for row in rows:
            out.append(f"[[{table}]]" if isinstance(content, list) else f"[{table}]")
            for key, value in row.items():
                text = f'"{value}"' if isinstance(value, str) else str(value).lower() \
                    if isinstance(value, bool) else str(value)
                out.append(f"{key} = {text}")
    return "\n".join(out) + "\n"


def test_non_finite_and_absurd_numbers_are_refused(tmp_path: Path) -> None:
    for key, value in [("connect_timeout", "nan"), ("weight", "inf"), ("threads", 10**9),
                       ("max_memory_gb", "-inf"), ("reserve_gb", -1), ("weight", 10**400),
                       ("threads", 10**400), ("rpc_port", 2**64), ("connect_timeout", 10**400),
                       ("keepalive_count_max", -10**400), ("max_memory_gb", 2**63)]:
        path = tmp_path / "c.toml"
        path.write_text(f'[[nodes]]\nname = "a"\nhost = "h"\n{key} = {value}\n')
        try:
            load_config(path)
        except ConfigError as exc:
            assert key in exc.message
        else:
            raise AssertionError(f"{key} = {value} was accepted")
