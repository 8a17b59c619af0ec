"""core/ is usable headless: importing every core module never pulls in Textual."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_without_textual() -> None:
    code = ("import core.cluster, core.config, core.transport, core.detached, core.coordinator, "
            "core.llama_build, core.demo_model, core.backends.llama_rpc, core.load_log, "
            "core.throughput, core.supervisor, core.tunnel, sys; "
            "assert 'textual' not in sys.modules, 'textual imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
