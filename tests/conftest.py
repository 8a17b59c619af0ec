"""Shared fixtures. Sections: real sshd nodes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .sshd_cluster import SSHD, SshdCluster

# ---- real sshd nodes --------------------------------------------------------------------------

# Each cluster gets its own 127.0.N.0/24 block so tests never fight over an address.
_blocks = itertools.count(10 + (os.getpid() % 200))


@pytest.fixture
def sshd_cluster(tmp_path: Path) -> Iterator[Callable[..., SshdCluster]]:
    """sshd_cluster(count=3) -> a started SshdCluster; every daemon is stopped afterwards."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} missing: apt-get install openssh-server")
    started: list[SshdCluster] = []

    def make(count: int = 3) -> SshdCluster:
        block = next(_blocks) % 250 + 1
        cluster = SshdCluster(tmp_path / f"sshd{len(started)}", count,
                              prefix=f"127.0.{block}")
        started.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
