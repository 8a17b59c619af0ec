"""The cluster file: valid files load, every mistake names the file, the table and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
[cluster]
name = "lab"

[[nodes]]
name = "a"
host = "10.0.0.1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    node = config.nodes[0]
    assert config.name == "lab"
    assert config.state_dir == "~/.torbiz"
    assert config.coordinator.host == "127.0.0.1"
    assert (node.transport, node.backend, node.rpc_port, node.cache) == (
        "ssh", "llama-rpc", 50052, True)
    assert node.endpoint == "10.0.0.1:50052"
    assert node.ssh.known_hosts == "~/.ssh/known_hosts"


def test_per_node_ssh_keys_override_the_ssh_table(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[ssh]
user = "llama"
connect_timeout = 4
[[nodes]]
name = "a"
host = "h1"
[[nodes]]
name = "b"
host = "h2"
user = "root"
rpc_host = "192.168.1.2"
"""))
    a, b = config.nodes
    assert (a.ssh.user, a.ssh.connect_timeout) == ("llama", 4.0)
    assert (b.ssh.user, b.ssh.connect_timeout) == ("root", 4.0)
    assert b.endpoint == "192.168.1.2:50052"


def test_relative_model_path_is_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + '\n[model]\ngguf = "models/m.gguf"\n'))
    assert config.model.gguf == (tmp_path / "models" / "m.gguf").resolve()


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        (MINIMAL + "\n[model]\ncontxt = 5\n", "model", "unknown key 'contxt'"),
        (MINIMAL.replace('"10.0.0.1"', "7"), "nodes[0] (a)", "'host' must be a string"),
        (MINIMAL + '[[nodes]]\nname = "a"\nhost = "10.0.0.2"\n', "nodes[1] (a)",
         "duplicate node name 'a'"),
        (MINIMAL + '[[nodes]]\nname = "b"\nhost = "10.0.0.1"\n', "nodes[1] (b)",
         "duplicate endpoint 10.0.0.1:50052"),
        (MINIMAL + "\n[coordinator]\nport = 70000\n", "coordinator", "between 1 and 65535"),
        (MINIMAL + "\n[coordinator]\nthreads = 0\n", "coordinator",
         "'threads' must be a number greater than 0"),
        (MINIMAL.replace('"a"', '"a; rm -rf /"'), "nodes[0]", "key 'name' must be"),
        (MINIMAL.replace('"10.0.0.1"', '"-oProxyCommand=touch /tmp/x"'), "nodes[0] (a)",
         "host name or IP address"),
        (MINIMAL + 'backend = "vllm"\n', "nodes[0] (a)", "'backend' must be one of"),
        (MINIMAL + "cache = 1\n", "nodes[0] (a)", "'cache' must be true or false"),
        (MINIMAL + "rpc_port = true\n", "nodes[0] (a)", "'rpc_port' must be an integer"),
        ('[cluster]\nname = "x"\n', "nodes", "no nodes"),
        (MINIMAL + "\n[extra]\n", "", "unknown table 'extra'"),
        ("nodes = 3\n", "nodes", "[[nodes]]"),
    ],
)
def test_each_mistake_names_table_and_key(tmp_path: Path, text: str, where: str,
                                          words: str) -> None:
    err = error_of(tmp_path, text)
    assert err.path == str((tmp_path / "cluster.toml").resolve())
    assert err.where == where
    assert words in err.message
    assert str(tmp_path) in str(err)


def test_missing_file_and_broken_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    err = error_of(tmp_path, "[cluster\nname=")
    assert "invalid TOML" in err.message


def test_shipped_configs_load() -> None:
    demo = load_config(REPO / "configs" / "demo.toml")
    assert [n.transport for n in demo.nodes] == ["local"] * 3
    lan = load_config(REPO / "configs" / "example-lan.toml")
    assert len(lan.nodes) == 4
    assert len({n.endpoint for n in lan.nodes}) == 4


def test_coordinator_threads_reach_llama_servers_command_line(tmp_path: Path) -> None:
    from core.engines.llama_rpc.coordinator import coordinator_argv

    path = tmp_path / "cluster.toml"
    path.write_text(MINIMAL + '\n[model]\ngguf = "m.gguf"\n\n[coordinator]\nthreads = 1\n')
    config = load_config(path)
    assert config.coordinator.threads == 1
    argv = coordinator_argv(config, "llama-server", ["10.0.0.1:50052"])
    assert argv[argv.index("-t") + 1] == "1"
    path.write_text(MINIMAL + '\n[model]\ngguf = "m.gguf"\n')
    assert "-t" not in coordinator_argv(load_config(path), "llama-server", [])
