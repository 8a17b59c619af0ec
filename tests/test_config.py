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
rpc_bind = "loopback"
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


MANAGED = ["--host", "--port", "-m", "--model", "--rpc", "--api-key", "--api-key-file", "-ngl",
           "--tensor-split", "-ts", "--metrics", "--log-file", "-c", "-lv", "-v", "--fit",
           "--n-gpu-layers", "-hf", "--no-slots"]


@pytest.mark.parametrize("args", [[opt, "x"] for opt in MANAGED] + [
    ["--host=0.0.0.0"], ["--api-key=k"], ["--api_key", "k"], ["--tensor_split", "1,1"],
    ["--parallel", "2", "--host", "0.0.0.0"]])
def test_extra_args_cannot_override_what_torbiz_manages(tmp_path: Path, args: list[str]) -> None:
    """A later --host (or -ngl, --api-key ...) would win over torbiz's own: the file names the
    option and the key to use instead."""
    quoted = ", ".join(f'"{a}"' for a in args)
    err = error_of(tmp_path, MINIMAL + f'\n[coordinator]\nextra_args = [{quoted}]\n')
    assert err.where == "coordinator"
    option = next(a for a in args if a.startswith("-") and a != "--parallel").split("=")[0]
    assert f"key 'extra_args' sets {option}, which torbiz manages: use " in err.message


def test_extra_args_torbiz_does_not_manage_pass_through(tmp_path: Path) -> None:
    from dataclasses import replace

    from core.engines.llama_rpc.coordinator import CoordinatorError, coordinator_argv

    path = write(tmp_path, MINIMAL + '\n[model]\ngguf = "m.gguf"\n[coordinator]\nextra_args = '
                                     '["--parallel", "2", "--no-repack", "-t", "1", "-a", "m"]\n')
    config = load_config(path)
    argv = coordinator_argv(config, "llama-server", [])
    assert argv[-7:] == ["--parallel", "2", "--no-repack", "-t", "1", "-a", "m"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv.count("--host") == 1
    # A config built in code is checked where the command line is made.
    sneaky = replace(config, coordinator=replace(config.coordinator,
                                                 extra_args=("--host", "0.0.0.0")))
    with pytest.raises(CoordinatorError, match="sets --host, which torbiz manages"):
        coordinator_argv(sneaky, "llama-server", [])


@pytest.mark.parametrize(("extra", "where", "words"), [
    ('\n[model]\ncontext = 1' + '0' * 400 + '\n', "model", "'context' is too large a number"),
    ('weight = 1' + '0' * 400 + '\n', "nodes[0] (a)", "'weight' is too large a number"),
    ('\n[petals]\nthroughput = 1' + '0' * 30 + '\n', "petals", "'throughput' is too large"),
    ('\n[model]\ngguf = "a\\u0000b"\n', "model", "'gguf' contains a control character"),
    ('rpc_server = "/opt/x\\nrm -rf /"\n', "nodes[0] (a)", "'rpc_server' contains a control"),
    ('\n[model]\ngguf = "~nosuchuser/m.gguf"\n', "model",
     "names the home of user 'nosuchuser', who is not known"),
    ('\n[model]\nhf = "~nosuchuser/m"\n', "model", "names the home of user 'nosuchuser'"),
    ('identity_file = "~nosuchuser/.ssh/id"\n', "nodes[0] (a)", "user 'nosuchuser'"),
    ('rpc_server = "~llama/bin/rpc-server"\n', "nodes[0] (a)",
     "starts with ~llama: only ~/ (the login user's home) is understood on a node"),
    ('known_hosts = ""\n', "nodes[0] (a)", "'known_hosts' must be a file"),
    ('\n[ssh]\nknown_hosts = ""\n', "ssh", "host keys are always verified"),
    ('\n[ssh]\nidentity_file = ""\n', "ssh", "leave it out to use ssh-agent"),
    ('\n[coordinator]\nhost = "localhost\\n"\n', "coordinator", "'host' contains a control"),
    ('\n[petals]\ninitial_peers = ["/ip4/10.0.0.5/tcp/1/p2p/Qm\\n"]\n', "petals",
     "'initial_peers' contains a control"),
    ('user = "ops\\u202e"\n', "nodes[0] (a)", "'user' contains a control character"),
])
def test_config_gaps_are_sentences(tmp_path: Path, extra: str, where: str, words: str) -> None:
    err = error_of(tmp_path, MINIMAL + extra)
    assert (err.where, words in err.message) == (where, True), err.message


def test_patterns_never_accept_a_trailing_newline(tmp_path: Path) -> None:
    from core.config import is_valid_host

    assert is_valid_host("gpu-box") and not is_valid_host("gpu-box\n")
    assert not is_valid_host("a\n") and not is_valid_host("10.0.0.1\n")
    # ~/ (the login user's home) and spaces are fine.
    ok = load_config(write(tmp_path, MINIMAL.replace('name = "lab"',
                                                     'name = "lab"\nstate_dir = "~/tor biz"')))
    assert ok.state_dir == "~/tor biz"
