"""Build llama.cpp's `ggml-rpc-server` and `llama-server` from the tree vendored in the pinned
llama-cpp-python sdist, once, into ~/.cache/torbiz/llama.cpp-<version>/bin."""

from __future__ import annotations

import fcntl
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
            if not rel.strip("/"):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise LlamaBuildError(f"refusing unsafe path {name!r} in {archive.name}")
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


_HINTS = {
    "download": "check that pip can reach PyPI from this machine (proxy, network) and retry",
    "configure": "read the cmake error below, fix the toolchain, delete the build/ directory "
                 "next to the log and run build-llama again",
    "build": "read the compiler error below (a killed compiler usually means the machine ran "
             "out of memory: free some and retry) and run build-llama again",
}


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
        returncode = proc.wait()
    if returncode != 0:  # after the log is closed, so its tail has the compiler's last words
        raise LlamaBuildError(f"llama.cpp {step} failed (exit {returncode}): {_HINTS[step]}; "
                              f"full log: {log}. Its last lines:\n{_tail(log)}")


def build_llama(portable: bool = False, progress: Progress = print,
                jobs: int | None = None) -> Path:
    root = build_root(portable)
    bin_dir = root / "bin"
    if _is_built(bin_dir):
        progress(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} already built in {bin_dir}")
        return bin_dir
    _check_toolchain()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another build of llama.cpp is running in {root}; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_built(bin_dir):
            progress(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} already built in {bin_dir}")
            return bin_dir
        return _build_locked(root, portable, progress, jobs)


def _is_built(bin_dir: Path) -> bool:
    return (bin_dir / STAMP).is_file() and all((bin_dir / t).is_file() for t in TARGETS)


def _check_toolchain() -> None:
    compilers = [c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c]
    missing = [name for name, found in (
        ("cmake", shutil.which("cmake")),
        ("a C++ compiler", any(shutil.which(c) for c in compilers))) if not found]
    if missing:
        raise LlamaBuildError(f"cannot build llama.cpp: {' and '.join(missing)} not found; "
                              "install them (apt-get install cmake g++) and run build-llama "
                              "again")


def _build_locked(root: Path, portable: bool, progress: Progress, jobs: int | None) -> Path:
    bin_dir = root / "bin"
    log = root / "build.log"
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        progress(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (vendored "
                 "llama.cpp) ...")
        with tempfile.TemporaryDirectory(prefix="torbiz-sdist-") as tmp:
            _run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                         "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                         "-d", tmp], log, "download", progress)
            archives = sorted(Path(tmp).glob("*.tar.gz"))
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
        # copy then rename: never write into a binary a worker may be running (ETXTBSY)
        partial = bin_dir / f".{target}.partial"
        shutil.copy2(built, partial)
        partial.chmod(0o755)
        partial.replace(bin_dir / target)
    flags = " ".join(cmake_configure_args(Path("src"), Path("build"), portable)[5:])
    (bin_dir / STAMP).write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n{flags}\n")
    progress(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} built: {bin_dir}")
    return bin_dir
