"""Names, paths and arguments reach the node as data: a canary file proves nothing ran."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.config import NodeConfig
from core.reach import detached
from core.reach.shell import path_word, quote_argv
from core.reach.transport import LocalTransport
from tests.cluster_files import ssh_transport_for

HOSTILE = ["; touch {c}", "$(touch {c})", "`touch {c}`", "'; touch {c}; '", '"; touch {c}; "',
           "a\ntouch {c}", "ünï çødé {c}", "__ARGV__ __RESOLVE__ {c}", "-rf {c}"]


def test_quote_argv_and_path_word_are_inert_in_sh(tmp_path: Path) -> None:
    import subprocess

    canary = tmp_path / "canary"
    words = [w.format(c=canary) for w in HOSTILE]
    out = subprocess.run(["sh", "-c", "printf '%s\\n' " + quote_argv(words)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "".join(w + "\n" for w in words)
    assert path_word("~/x y;z") == "\"$HOME\"/'x y;z'"
    assert not canary.exists()


@pytest.mark.parametrize("transport_kind", ["local", "ssh"])
async def test_hostile_state_dir_and_argv_are_data(tmp_path: Path, transport_kind: str,
                                                   sshd_cluster) -> None:
    canary = tmp_path / "canary"
    if transport_kind == "local":
        transport = LocalTransport(NodeConfig(name="n", host="127.0.0.1", transport="local"))
    else:
        transport = ssh_transport_for(sshd_cluster(count=1))
    try:
        for template in HOSTILE:
            word = template.format(c=canary)
            state_dir = str(tmp_path / "state" / word.replace("/", "_"))
            started = await detached.spawn(transport, state_dir, ["printf", "%s\\n", word])
            assert started.state in ("running", "dead"), started
            for _ in range(40):  # printf may not have run yet when spawn answers
                lines = await detached.log_tail(transport, state_dir)
                if word.split("\n")[-1] in lines[-1]:
                    break
                await asyncio.sleep(0.05)
            assert word.split("\n")[-1] in lines[-1]
            await detached.stop(transport, state_dir)
        assert not canary.exists()
    finally:
        await transport.close()
