"""build-llama: its cmake flags, idempotence against the real cache, safe sdist extraction."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

from core.llama_build import (
    LlamaBuildError,
    build_llama,
    cmake_configure_args,
    find_cached_binary,
    safe_extract_vendor,
)


def test_flags() -> None:
    native = cmake_configure_args(Path("s"), Path("b"), portable=False)
    portable = cmake_configure_args(Path("s"), Path("b"), portable=True)
    for args in (native, portable):
        assert {"-DGGML_RPC=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF",
                "-DCMAKE_BUILD_TYPE=Release"} <= set(args)
    assert "-DGGML_NATIVE=OFF" in portable and "-DGGML_NATIVE=OFF" not in native


def test_second_call_returns_at_once() -> None:
    if find_cached_binary("llama-server") is None:
        pytest.skip("llama.cpp not built yet")
    lines: list[str] = []
    started = time.monotonic()
    build_llama(progress=lines.append)
    assert time.monotonic() - started < 5
    assert "already built" in lines[-1]


def _tar(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "sdist.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extracts_only_the_vendored_tree(tmp_path: Path) -> None:
    archive = _tar(tmp_path, ["pkg/setup.py", "pkg/vendor/llama.cpp/CMakeLists.txt",
                              "pkg/vendor/llama.cpp/ggml/a.c"])
    safe_extract_vendor(archive, tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                   if p.is_file())
    assert files == ["CMakeLists.txt", "ggml/a.c"]


def test_refuses_path_traversal(tmp_path: Path) -> None:
    archive = _tar(tmp_path, ["pkg/vendor/llama.cpp/../../../evil"])
    with pytest.raises(LlamaBuildError, match="unsafe"):
        safe_extract_vendor(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
