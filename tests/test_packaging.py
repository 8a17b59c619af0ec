"""An install without the source tree (`pip install .`, pipx) carries everything the product
runs from its own files: the Petals recipe `provision --petals` copies to a node, the side
scripts the Petals venv runs, the demo cluster, the dashboard's stylesheet."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEEDED = ("core/engines/petals/petals-env.sh", "core/engines/petals/side/dht_monitor.py",
          "core/engines/petals/side/generate.py", "core/engines/petals/side/sockets.py",
          "core/demo/demo.toml", "tui/app.tcss")


def test_a_non_editable_install_finds_its_own_files(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("torbiz_tui-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in NEEDED if n not in names] == []

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    # Run from a directory with no source tree, the installed copy first on the path.
    probe = ("import core, pathlib\n"
             "from core.engines.petals import provision\n"
             "from core.engines.petals.local import SIDE\n"
             "assert str(provision.SCRIPT).startswith(str(pathlib.Path(core.__file__).parent))\n"
             "assert provision.SCRIPT.is_file() and (SIDE / 'dht_monitor.py').is_file()\n"
             "print(provision.SCRIPT)\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(target))
    assert os.access(done.stdout.strip(), os.R_OK)
