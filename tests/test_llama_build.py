"""build-llama: its cmake flags, idempotence against the real cache, safe sdist extraction."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from core.engines.llama_rpc.build import (
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
    bin_dir = build_llama(progress=lines.append)
    assert time.monotonic() - started < 0.5
    assert lines == [f"llama.cpp 0.3.36 already built in {bin_dir}"]
    assert find_cached_binary("rpc-server") == bin_dir / "ggml-rpc-server"
    assert find_cached_binary("ggml-rpc-server") == bin_dir / "ggml-rpc-server"


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


def test_refuses_a_member_made_absolute_after_the_vendor_prefix(tmp_path: Path) -> None:
    archive = _tar(tmp_path, ["pkg/vendor/llama.cpp//tmp/evil"])
    with pytest.raises(LlamaBuildError, match="unsafe"):
        safe_extract_vendor(archive, tmp_path / "out")


# The steps after the sdist, with a stand-in `cmake` on PATH: a real build takes both cores of
# this machine for minutes (the real no-op rebuild is what produced the cache used above).
FAKE_CMAKE = """#!/bin/sh
# cmake --build BUILD --target A B -j N
build="$2"
for pct in 5 50 100; do echo "[ $pct%] Building CXX object x.o"; sleep 0.6; done
if [ -n "$FAKE_CMAKE_FAIL" ]; then echo "x.cpp:1: error: it broke"; exit 2; fi
mkdir -p "$build/bin"
for t in ggml-rpc-server llama-server; do printf '#!/bin/sh\n' > "$build/bin/$t"; done
"""


def _fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, text in (("cmake", FAKE_CMAKE), ("c++", "#!/bin/sh\n")):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("TORBIZ_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "llama.cpp-0.3.36"
    (root / "src").mkdir(parents=True)
    (root / "src" / "CMakeLists.txt").write_text("")
    (root / "build").mkdir()
    (root / "build" / "CMakeCache.txt").write_text("")
    return root


def test_build_reports_percent_installs_binaries_and_stamps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_tree(tmp_path, monkeypatch)
    lines: list[str] = []
    bin_dir = build_llama(progress=lines.append, jobs=1)
    assert bin_dir == root / "bin"
    percents = [line for line in lines if line.startswith("building llama.cpp 0.3.36: ")]
    assert percents and all(f"% (log: {root / 'build.log'})" in line for line in percents)
    assert len(percents) <= 3  # at most once per second and per change
    for name in ("ggml-rpc-server", "llama-server"):
        assert (bin_dir / name).stat().st_mode & stat.S_IXUSR
    stamp = (bin_dir / ".complete").read_text()
    assert "0.3.36" in stamp and "-DGGML_RPC=ON" in stamp and "GGML_NATIVE" not in stamp
    assert "--target ggml-rpc-server llama-server -j 1" in (root / "build.log").read_text()
    assert find_cached_binary("llama-server") == bin_dir / "llama-server"
    lines.clear()
    build_llama(progress=lines.append)
    assert lines == [f"llama.cpp 0.3.36 already built in {bin_dir}"]


def test_a_failed_build_names_the_step_the_last_lines_and_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_tree(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_CMAKE_FAIL", "1")
    with pytest.raises(LlamaBuildError) as caught:
        build_llama(progress=lambda _line: None)
    message = str(caught.value)
    assert "build failed" in message and "error: it broke" in message
    assert str(root / "build.log") in message
    assert not (root / "bin" / ".complete").exists()
    assert find_cached_binary("llama-server") is None


def test_no_toolchain_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("TORBIZ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LlamaBuildError, match=r"cmake and a C\+\+ compiler not found.*"
                                              r"apt-get install cmake g\+\+"):
        build_llama(progress=lambda _line: None)
