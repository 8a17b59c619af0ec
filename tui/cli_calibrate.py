"""`torbiz-tui calibrate [NODE...] [--force]`: each node's speed for this model and its link,
measured through the real engine (or read from the cache), with what the measurement cost."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from core import operations
from core.cluster import Cluster
from core.config import ClusterConfig
from core.operations import OperationError
from tui.cli_format import print_problems


def add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="measure each node's speed for this model (a short "
                       "timed decode through its worker) and its link; cached per node and "
                       "model")
    p.add_argument("nodes", nargs="*", metavar="NODE", help="only these nodes (default: all)")
    p.add_argument("--force", action="store_true", help="measure again even when cached")
    p.add_argument("-c", "--config", dest="sub_config", help=argparse.SUPPRESS)


async def run_calibrate(config: ClusterConfig, args: argparse.Namespace) -> int:
    cluster = Cluster(config)
    started = time.monotonic()
    try:
        lines = await operations.calibrate(
            cluster, args.nodes or None, force=args.force,
            progress=lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    except OperationError as exc:
        print_problems(exc.problems)
        return 1
    finally:
        await cluster.close()
    for line in lines:
        print(line)
    print(f"calibration took {time.monotonic() - started:.1f} s")
    return 1 if any(" cannot be calibrated" in line or line.startswith("cannot ")
                    for line in lines) else 0
