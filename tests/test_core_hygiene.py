"""core/ is usable headless: importing every core module never pulls in Textual.

The modules are found by walking the package, so a new one is covered without editing this file.
The scripts under core/engines/petals/side run in the Petals venv (torch, hivemind) and are
never imported here: they are skipped by name."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import core

SIDE_SCRIPTS = "core.engines.petals.side."


def core_modules() -> list[str]:
    found = [info.name for info in pkgutil.walk_packages(core.__path__, "core.")]
    return sorted(name for name in found if not name.startswith(SIDE_SCRIPTS))


def test_every_core_module_is_discovered() -> None:
    modules = core_modules()
    # the walk must see the packages' insides, not just the top level
    assert "core.reach.transport" in modules
    assert "core.engines.llama_rpc.rpc" in modules
    assert len(modules) >= 25


def test_core_imports_without_textual() -> None:
    modules = core_modules()
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'textual' not in sys.modules, f'{name} imported textual'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
