"""Build llama.cpp's `ggml-rpc-server` and `llama-server` from the tree vendored in the pinned
llama-cpp-python sdist, once, into ~/.cache/torbiz/llama.cpp-<version>/bin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
RPC_SERVER_NAMES = ("rpc-server", "ggml-rpc-server")
COORDINATOR_NAME = "llama-server"
TARGETS = ("ggml-rpc-server", "llama-server")
STAMP = ".complete"

Progress = Callable[[str], None]


class LlamaBuildError(Exception):
    pass


def cache_root() -> Path:
    env = os.environ.get("TORBIZ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "torbiz"


def build_root(portable: bool = False) -> Path:
    suffix = "-portable" if portable else ""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}{suffix}"


def cached_bin_dir(portable: bool = False) -> Path:
    return build_root(portable) / "bin"


def find_cached_binary(name: str) -> Path | None:
    names = RPC_SERVER_NAMES if name in RPC_SERVER_NAMES else (name,)
    for portable in (False, True):
        bin_dir = cached_bin_dir(portable)
        if not (bin_dir / STAMP).is_file():
            continue
        for candidate in names:
            path = bin_dir / candidate
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def cmake_configure_args(src: Path, build: Path, portable: bool) -> list[str]:
    args = [
        "cmake", "-S", str(src), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_RPC=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # else it tries to download a web UI
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DBUILD_SHARED_LIBS=OFF",  # static: the binaries can be copied to other nodes
    ]
    if portable:
        args.append("-DGGML_NATIVE=OFF")  # -march=native may not run on another CPU
    return args


def safe_extract_vendor(archive: Path, dest: Path) -> None:
    """Extract only */vendor/llama.cpp/ from the sdist into dest, refusing unsafe members."""
    marker = "/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith("/") or ".." in Path(name).parts:
                raise LlamaBuildError(f"refusing unsafe path {name!r} in {archive.name}")
            if marker not in name or not (member.isfile() or member.isdir()):
                continue
            rel = name.split(marker, 1)[1]
            if not rel:
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            target.chmod(0o755 if member.mode & 0o111 else 0o644)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_logged(args: list[str], log: Path, step: str, progress: Progress) -> None:
    last_pct, last_time = -1, 0.0
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")
        except FileNotFoundError:
            raise LlamaBuildError(f"{args[0]} not found: install it (apt-get install cmake g++)") \
                from None
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            match = re.match(r"\[\s*(\d+)%\]", line)
            if match:
                pct = int(match.group(1))
                now = time.monotonic()
                if pct != last_pct and now - last_time >= 1.0:
                    progress(f"building llama.cpp {LLAMA_CPP_PYTHON_VERSION}: {pct}% (log: {log})")
                    last_pct, last_time = pct, now
        if proc.wait() != 0:
            raise LlamaBuildError(f"llama.cpp {step} failed (exit {proc.returncode}); last "
                                  f"lines:\n{_tail(log)}\nfull log: {log}")


def build_llama(portable: bool = False, progress: Progress = print,
                jobs: int | None = None) -> Path:
    root = build_root(portable)
    bin_dir = root / "bin"
    if (bin_dir / STAMP).is_file() and all((bin_dir / t).is_file() for t in TARGETS):
        progress(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} already built in {bin_dir}")
        return bin_dir
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaBuildError(f"{tool} not found: install a toolchain "
                                  "(apt-get install cmake g++) and run build-llama again")
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        progress(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (vendored "
                 "llama.cpp) ...")
        with tempfile.TemporaryDirectory(prefix="torbiz-sdist-") as tmp:
            _run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                         "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                         "-d", tmp], log, "download", progress)
            archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if not archives:
                raise LlamaBuildError(f"pip download produced no sdist; see {log}")
            partial = root / "src.partial"
            shutil.rmtree(partial, ignore_errors=True)
            safe_extract_vendor(archives[0], partial)
            partial.rename(src)
    build = root / "build"
    if not (build / "CMakeCache.txt").is_file():
        progress("configuring llama.cpp (cmake) ...")
        _run_logged(cmake_configure_args(src, build, portable), log, "configure", progress)
    progress(f"building ggml-rpc-server and llama-server (several minutes; log: {log})")
    _run_logged(["cmake", "--build", str(build), "--target", *TARGETS,
                 "-j", str(jobs or os.cpu_count() or 2)], log, "build", progress)
    bin_dir.mkdir(exist_ok=True)
    for target in TARGETS:
        built = build / "bin" / target
        if not built.is_file():
            raise LlamaBuildError(f"the build finished but {built} is missing; see {log}")
        shutil.copy2(built, bin_dir / target)
        (bin_dir / target).chmod(0o755)
    flags = " ".join(cmake_configure_args(Path("src"), Path("build"), portable)[5:])
    (bin_dir / STAMP).write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n{flags}\n")
    progress(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} built: {bin_dir}")
    return bin_dir
