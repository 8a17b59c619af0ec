"""Hostile and random cluster files: every input is either a valid config or a ConfigError that
names the file (and a table when it can), never a traceback."""

from __future__ import annotations

from pathlib import Path

import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import ClusterConfig, ConfigError, load_config, parse_config

KEYS = ["name", "host", "ssh_port", "transport", "backend", "rpc_server", "rpc_host", "rpc_port",
        "rpc_bind", "threads", "cache", "user", "identity_file", "known_hosts", "config_file",
        "connect_timeout", "keepalive_interval", "keepalive_count_max", "reserve_gb",
        "max_memory_gb", "weight", "state_dir", "gguf", "context", "binary", "port",
        "extra_args", "policy", "cache_type", "coordinator_layers", "bogus", "", "nodes"]
TABLES = ["cluster", "ssh", "model", "coordinator", "plan", "nodes", "extra"]

scalars = st.one_of(
    st.text(max_size=40), st.integers(min_value=-2**70, max_value=2**70), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["127.0.0.1", "a; rm -rf /", "$(touch /tmp/x)", "-oProxyCommand=x", "local",
                     "ssh", "petals", "llama-rpc", "loopback", "any", "pack", "f16", "~/x",
                     "node-1", "\x00", "\u202e", "a\nb", "0.0.0.0", "::1"]),
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
    hostile = [None, "", "x" * 10_000, -1, 0, 2**64, 1.5, True, [], {}, "a;b", "\n"]
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
                       ("max_memory_gb", "-inf"), ("reserve_gb", -1)]:
        path = tmp_path / "c.toml"
        path.write_text(f'[[nodes]]\nname = "a"\nhost = "h"\n{key} = {value}\n')
        try:
            load_config(path)
        except ConfigError as exc:
            assert key in exc.message
        else:
            raise AssertionError(f"{key} = {value} was accepted")
