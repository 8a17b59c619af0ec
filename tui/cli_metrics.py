"""`torbiz-tui metrics`: torbiz's own figures for Prometheus, on 127.0.0.1 unless told."""

from __future__ import annotations

import sys
import time

from core import operations
from core.cluster import Cluster
from core.config import ClusterConfig
from core.metrics_export import Figures, MetricsServer


async def serve_metrics(config: ClusterConfig, host: str, port: int, interval: float) -> int:
    cluster = Cluster(config)

    async def gather() -> Figures:
        report = await operations.status(cluster, detail=True)
        try:
            predicted = await operations.predicted_tps(cluster)
        except Exception:  # a figure: never a reason to stop serving the others
            predicted = None
        return Figures(report.status, report.recovery, time.monotonic(), predicted)

    def started(url: str) -> None:
        print(f"serving cluster {config.name}'s figures on {url} (a status round every "
              f"{interval:g} s; Ctrl-C stops)", file=sys.stderr, flush=True)

    server = MetricsServer(gather, host=host, port=port, interval=interval)
    try:
        await server.serve(started)
    except OSError as exc:
        print(f"cannot serve metrics on {host} port {port}: {exc.strerror or exc}: choose "
              "another --port", file=sys.stderr)
        return 1
    finally:
        await cluster.close()
    return 0
