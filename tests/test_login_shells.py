"""Scripts reach a node byte for byte whatever its user's login shell (sshd hands every command
to it first), and a peer id or multiaddr that a node or a state file made up never reaches
another node's command line."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from core.config import NodeConfig
from core.engines.petals import commands as backend
from core.reach import detached
from core.reach.shell import printf_words, sh_c
from tests.cluster_files import ssh_transport_for
from tests.sshd_cluster import login_user

SHELLS = ["fish", "zsh", "dash", "bash", "tcsh", "csh"]

# Everything a login shell could take for its own: both quotes, $ and $(...), backticks, ;
# and &, newlines, a backslash before a quote (fish and tcsh end a single-quoted word there),
# history `!`, printf's `%` and `\`, a tab, non-ASCII, and a line that would run a command if
# any shell split the script.
PAYLOAD = ("it's \"$HOME\" `id` $(id) ${PATH} ; & | < > ! %s %% \\ \\' \\\\ '\\''\n"
           "line two\twith tab; ünïcödé ✓ 漢字 '\n"
           "'; touch {canary}; echo ';\n"
           "\" ; touch {canary} ; \"\n"
           "\\'; touch {canary}; \\'\n"
           "last line without newline")


def _script(canary: Path) -> tuple[str, str]:
    payload = PAYLOAD.replace("{canary}", str(canary))
    # A quoted here-document: sh prints its body untouched, so any change is the transport's.
    return payload, f"cat <<'TORBIZ_END'\n{payload}\nTORBIZ_END\nprintf 'rc=%s' $?"


def _available(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} missing: apt-get install {shell}")
    if os.geteuid() != 0:
        pytest.skip("making a login user with that shell needs root")


def test_the_command_line_is_constant_text_every_shell_reads_alike() -> None:
    payload, script = _script(Path("/tmp/x"))
    line = sh_c(script * 20)
    prefix = ("exec sh -c 'exec 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&-; "
              "eval \"set --; $(for w in \"$@\"; do printf \"$w\"; done)\"' sh '")
    assert line.startswith(prefix) and line.endswith("'")
    words = line[len(prefix):-1].split("' '")
    assert words == printf_words(script * 20) and len(words) > 1
    for word in words:  # short enough for csh; letters, and backslashes before 3 octal digits
        assert len(word) <= 4000
        assert all(c.isascii() and (c.isalpha() or c.isdigit() or c == "\\") for c in word)
        assert all(word[i + 1:i + 4].isdigit() for i, c in enumerate(word) if c == "\\")
    with pytest.raises(ValueError, match="NUL"):
        sh_c("echo \0")
    with pytest.raises(ValueError, match="too long"):
        sh_c("x" * 200_000 + " ")


@pytest.mark.parametrize("shell", SHELLS)
async def test_script_runs_byte_exact_under_each_login_shell(shell: str, sshd_cluster,
                                                            tmp_path: Path) -> None:
    _available(shell)
    user = login_user(shell)
    sshd = sshd_cluster(count=1)
    sshd.authorize(user)
    canary = Path("/tmp") / f"torbiz-canary-{secrets.token_hex(6)}"
    payload, script = _script(canary)
    transport = ssh_transport_for(sshd, user=user)
    state_dir = f"~/state-{secrets.token_hex(4)}"
    try:
        login = await transport.run('echo "$SHELL"; id -un')  # sshd ran $SHELL -c ...
        assert login.stdout.split() == [shutil.which(shell), user], login
        result = await transport.run(script)
        assert result.stderr == ""
        assert result.stdout == payload + "\nrc=0"
        # The detached scripts (functions, here-strings, traps of their own) run there too.
        started = await detached.spawn(transport, state_dir, ["sleep", "30"])
        assert started.state == "running", started
        assert (await detached.status(transport, state_dir)).pid == started.pid
        assert (await detached.stop(transport, state_dir)).state == "none"
        await transport.run(f"rm -rf {state_dir}")
    finally:
        await transport.close()
    assert not canary.exists()


# ---- peer ids and multiaddrs -------------------------------------------------------------

PEER = "QmbyV4BASLJCFiCfKz37eNwFX8y6hefQ7LGpzvEwJQzNft"  # the shape hivemind makes
ED25519 = "12D3KooWCwqdEmFUVVDc1KRuBuojiBd6Fm2hR5YYMafgMznuzYJ9"
HOSTILE_PEERS = [
    "", "Qm", PEER[:-1], PEER + "x", PEER + "\n", " " + PEER, PEER.replace("b", "0"),
    PEER.replace("b", "l"), "--new_swarm", f"{PEER[:20]};touch /tmp/x", "$(id)", f"`{PEER}`",
    PEER.replace("V", "\u0412"),  # Cyrillic lookalike
    "Qm" + "1" * 44 + "\x1b]52;c;eA==\x07",
]


@pytest.mark.parametrize("peer", [PEER, ED25519])
def test_real_peer_ids_pass(peer: str) -> None:
    assert backend.valid_peer_id(peer)
    for host in ("/ip4/10.0.0.5", "/ip6/fe80::1", "/dns/bootstrap1.petals.dev",
                 "/dns4/node-1.example.org", "/dns6/a.b"):
        assert backend.valid_multiaddr(f"{host}/tcp/31337/p2p/{peer}"), host


@pytest.mark.parametrize("peer", HOSTILE_PEERS)
def test_hostile_peer_ids_are_refused(peer: str) -> None:
    assert not backend.valid_peer_id(peer)
    assert not backend.valid_multiaddr(f"/ip4/10.0.0.5/tcp/31337/p2p/{peer}")


@pytest.mark.parametrize("maddr", [
    "/ip4/10.0.0.5/tcp/31337", "/ip4/10.0.0.5/tcp/31337/p2p/", "ip4/10.0.0.5/tcp/1/p2p/{p}",
    "/ip4/10.0.0.256/tcp/1/p2p/{p}", "/ip4/010.0.0.5/tcp/1/p2p/{p}", "/ip4/10.0.0.5/tcp/0/p2p/{p}",
    "/ip4/10.0.0.5/tcp/65536/p2p/{p}", "/ip4/10.0.0.5/tcp/0080/p2p/{p}",
    "/ip4/10.0.0.5/udp/1/p2p/{p}", "/ip6/fe80::1%eth0/tcp/1/p2p/{p}", "/dns/a_b/tcp/1/p2p/{p}",
    "/dns/-a/tcp/1/p2p/{p}", "/dns/a..b/tcp/1/p2p/{p}", "/unix/x/tcp/1/p2p/{p}",
    "/ip4/10.0.0.5/tcp/1/p2p/{p}/", "/ip4/10.0.0.5/tcp/1/p2p/{p}\n",
    "/ip4/10.0.0.5/tcp/1/p2p/{p} --new_swarm", "/ip4/10.0.0.5/tcp/1/p2p/{p};id",
    "/ip4/10.0.0.5/tcp/\u0661/p2p/{p}",  # an Arabic-Indic digit
])
def test_malformed_multiaddrs_are_refused(maddr: str) -> None:
    assert not backend.valid_multiaddr(maddr.format(p=PEER))


def _petals_node(python: str = "~/fake-python") -> NodeConfig:
    return NodeConfig(name="a", host="10.0.0.1", backend="petals", python=python)


def test_a_hostile_peer_id_never_becomes_a_multiaddr_or_an_argument() -> None:
    node = _petals_node()
    for peer in HOSTILE_PEERS:
        with pytest.raises(ValueError, match="refusing peer id"):
            backend.multiaddr(node, peer)
    # From the swarm file (the multiaddrs of running servers) into the next server's argv.
    from core.config import parse_config

    config = parse_config({"nodes": [{"name": "a", "host": "10.0.0.1", "backend": "petals"},
                                     {"name": "b", "host": "10.0.0.2", "backend": "petals"}]},
                          Path("/x/c.toml"))
    good = backend.multiaddr(config.node("a"), PEER)
    args = backend.server_args(config, config.node("b"), "/s", "/m", (0, 1), [good])
    assert args[args.index("--initial_peers") + 1] == good
    for planted in (f"/ip4/10.0.0.1/tcp/31337/p2p/{PEER}'; touch /tmp/x; '", "--new_swarm",
                    f"/ip4/10.0.0.1/tcp/31337/p2p/{PEER}\n--public_name"):
        with pytest.raises(ValueError, match="refusing initial peer"):
            backend.server_args(config, config.node("b"), "/s", "/m", (0, 1), [good, planted])


@pytest.mark.parametrize("shell", ["fish", "dash"])
async def test_a_node_reporting_a_hostile_peer_id_is_refused(shell: str, sshd_cluster) -> None:
    """Node A's Petals python (here a stand-in script) answers with a peer id that would run
    code in node B's command line: the preflight refuses it with a sentence."""
    _available(shell)
    user = login_user(shell)
    sshd = sshd_cluster(count=1)
    sshd.authorize(user)
    transport = ssh_transport_for(sshd, user=user)
    canary = Path("/tmp") / f"torbiz-canary-{secrets.token_hex(6)}"
    hostile = f"{PEER}'; touch {canary}; echo '\x1b]0;owned\x07"
    answer = backend.JSON_MARK + json.dumps({"python": "3.11", "peer_id": hostile})
    fake = f"#!/bin/sh\ncat <<'ANSWER'\n{answer}\nANSWER\n"
    try:
        written = await transport.run(f"cat > ~/fake-python <<'END'\n{fake}END\n"
                                      "chmod 700 ~/fake-python")
        assert written.ok, written
        node = _petals_node()
        result = await transport.run(backend.prepare_script(node, None), timeout=30)
        assert hostile.split("'")[0] in result.stdout  # the node did say it
        info = backend.parse_prepare(node, result.stdout, result.stderr)
        assert info.peer_id == "" and "is not one" in info.error, info
        assert "\x1b" not in info.error and "\x07" not in info.error
        with pytest.raises(ValueError):
            backend.multiaddr(node, hostile)
    finally:
        await transport.run("rm -f ~/fake-python")
        await transport.close()
    assert not canary.exists()
