"""Shared fixtures, one section per concern. Add new helpers in their own section below."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sshd_cluster import SSHD, AddressInUse, SshdCluster

# ---- real sshd nodes --------------------------------------------------------------------------
#
# sshd_cluster(count=3) -> a started tests.sshd_cluster.SshdCluster: real OpenSSH daemons on
# loopback addresses, root login with cluster.client_key, host keys in cluster.known_hosts.
# Every cluster gets its own 127.A.B.0/24 block (nodes at .11, .12, ...), so clusters of one
# run never share an address; the start offset depends on the pid so that two pytest runs on one
# machine rarely collide, and a block found busy is skipped.

_blocks = itertools.count((os.getpid() * 7) % 60000)
_BLOCK_ATTEMPTS = 20


def _next_prefix() -> str:
    n = next(_blocks) % 60000  # 240 x 250 blocks: 127.0-239.1-250
    return f"127.{n // 250}.{n % 250 + 1}"


@pytest.fixture
def sshd_cluster(tmp_path: Path) -> Iterator[Callable[..., SshdCluster]]:
    """sshd_cluster(count=3) -> a started SshdCluster; every daemon is stopped afterwards."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} missing: apt-get install openssh-server")
    if os.geteuid() != 0:
        pytest.skip("real sshd nodes log in as root: run these tests as root (e.g. in CI)")
    started: list[SshdCluster] = []

    def make(count: int = 3, **options: Any) -> SshdCluster:
        """options: SshdCluster keywords (port=, first_octet=, start_timeout=)."""
        workdir = tmp_path / f"sshd{len(started)}"
        attempts = 1
        while True:
            cluster = SshdCluster(workdir, count, prefix=_next_prefix(), **options)
            started.append(cluster)
            try:
                cluster.start()
                return cluster
            except AddressInUse:
                if attempts == _BLOCK_ATTEMPTS:
                    raise
                attempts += 1

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()
