"""`w` on the dashboard: the pre-warm of `torbiz-tui cache warm` against real sshd nodes, each
node's progress in the panel under the node table, each node's outcome in the panel and the
event log; the key greyed while it runs, hidden read-only, and the caches warm afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core import operations
from core.cluster import Cluster
from core.config import load_config
from core.demo_model import write_demo_model
from tests.cluster_files import ssh_cluster_file
from tests.test_tui_pilot import SIZE, refreshed, wait_until
from tui.app import make_app
from tui.widgets.warm_panel import WarmPanel

pytestmark = pytest.mark.integration


def panel_text(app: Any) -> str:
    return str(app.main.query_one(WarmPanel).render())


async def test_w_prewarms_every_planned_node_and_the_standby_with_progress(
        tmp_path: Path, sshd_cluster: Any) -> None:
    # Two tensors above 10 MiB per block: something for the cache to hold.
    model = write_demo_model(tmp_path / "big.gguf", n_layer=2, n_embd=1024, n_head=8,
                             n_head_kv=8, n_ff=5632, n_vocab=8192)
    sshd = sshd_cluster(count=3)
    path = ssh_cluster_file(tmp_path, sshd, model, name="warmkey")
    path.write_text(path.read_text().replace("[plan]\n", "[plan]\n" + "standby = "
                                             + json.dumps(["node3"]) + "\n"))
    config = load_config(path)
    app = make_app(config)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh over SSH")
        panel = app.main.query_one(WarmPanel)
        assert not panel.has_class("-shown")
        assert app.main.check_action("warm_cache", ()) is True
        await pilot.press("w")
        await pilot.pause()
        assert panel.has_class("-shown")
        assert app.main.check_action("warm_cache", ()) is None  # greyed while it runs
        await wait_until(pilot, lambda: "pre-warm done" in panel_text(app),
                         f"the pre-warm's end ({panel_text(app)!r})", timeout=120)
        text = panel_text(app)
        for name in ("node1", "node2", "node3"):
            assert f"{name}: " in text and "tensor(s)" in text, text
        assert app.main.check_action("warm_cache", ()) is True
        events = "\n".join(app.main.model.event_log)
        assert "pre-warm node3: " in events, events
    cluster = Cluster(load_config(path))
    try:
        report, _ = await operations.cache_report(cluster)
        shares = {n.name: n.warm_share for n in report.nodes}
        assert shares == {"node1": 1.0, "node2": 1.0, "node3": 1.0}, shares
    finally:
        await cluster.close()


async def test_w_is_hidden_read_only(tmp_path: Path, sshd_cluster: Any) -> None:
    sshd = sshd_cluster(count=1)
    config = load_config(ssh_cluster_file(tmp_path, sshd, tmp_path / "absent.gguf",
                                          name="warmro"))
    app = make_app(config, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, refreshed(app), "the first refresh over SSH")
        assert app.main.check_action("warm_cache", ()) is False
        await pilot.press("w")
        await pilot.pause()
        assert not app.main.query_one(WarmPanel).has_class("-shown")
