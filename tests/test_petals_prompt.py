"""The Petals generation client takes its prompt on stdin: a command line is readable by every
user of the machine (ps, /proc/PID/cmdline) and holds at most 128 KiB per argument."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import core.engines.petals

GENERATE = Path(core.engines.petals.__file__).parent / "side" / "generate.py"
PROMPT = "line one\n  two \u2713 \x00 " + "x" * 300_000 + "\n\n"  # as is, past argv's limit


def generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torbiz_side_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only the standard library at import time
    return module


def test_the_prompt_comes_on_stdin_exactly() -> None:
    gen = generate_module()
    args = gen.parse_args(["/m", "--peers", "[]", "--prefix", "p", "--prompt-stdin"])
    assert gen.read_prompt(args, io.BytesIO(PROMPT.encode())) == PROMPT
    old = gen.parse_args(["/m", "--peers", "[]", "--prefix", "p", "--prompt", "hi"])
    assert gen.read_prompt(old, io.BytesIO(b"ignored")) == "hi"
    for missing_or_both in (["--prefix", "p"], ["--prefix", "p", "--prompt", "x",
                                                "--prompt-stdin"]):
        with pytest.raises(SystemExit):
            gen.parse_args(["/m", "--peers", "[]", *missing_or_both])


def test_a_long_prompt_fits_stdin_not_a_command_line() -> None:
    base = [sys.executable, str(GENERATE), "/m", "--peers", "[]", "--prefix", "p"]
    with pytest.raises(OSError):  # E2BIG: no argument longer than 128 KiB
        subprocess.run([*base, "--prompt", PROMPT.replace("\x00", "")], check=False)
    done = subprocess.run([*base, "--prompt-stdin"], input=PROMPT.encode(),
                          capture_output=True, timeout=60, check=False)
    # The client read it all, then stopped at the empty peer list (before importing Petals).
    assert done.returncode == 2
    answer = json.loads(done.stdout.decode().split("TORBIZ-JSON ", 1)[1])
    assert answer == {"error": "no initial peers"}
