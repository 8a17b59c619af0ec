#!/usr/bin/env bash
# Set up everything torbiz-tui needs on this machine, idempotently:
#   system packages (sshd for the tests, tmux, a C++ toolchain), the Python venv in .venv,
#   and the llama.cpp binaries (cached under ~/.cache/torbiz/, keyed by version).
# Usage: scripts/setup.sh [--no-llama] [--with-test-tools]
#   --with-test-tools also installs what only the tests use (Debian's chromium, for the
#   `torbiz-tui web` test in a headless browser; Debian's prometheus, which the metrics test
#   starts on loopback to scrape `torbiz-tui metrics`; fish, zsh, tcsh, csh and busybox for
#   nodes with other login shells and tools; the Petals venv, scripts/petals-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
no_llama=0; test_tools=0
for arg in "$@"; do
  case $arg in
    --no-llama) no_llama=1;;
    --with-test-tools) test_tools=1;;
    *) echo "setup: unknown option $arg" >&2; exit 2;;
  esac
done

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
command -v tmux >/dev/null || need_apt+=(tmux)
command -v ip >/dev/null || need_apt+=(iproute2)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
[ "$test_tools" = 1 ] && ! command -v chromium >/dev/null && need_apt+=(chromium)
[ "$test_tools" = 1 ] && ! command -v prometheus >/dev/null && need_apt+=(prometheus)
# Login shells and a BusyBox userland for the tests of nodes unlike ours.
if [ "$test_tools" = 1 ]; then
  for tool in fish zsh tcsh csh busybox; do
    command -v $tool >/dev/null || need_apt+=($tool)
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  # Never let the package start the system sshd: the tests run their own on loopback.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.torbiz-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing torbiz-tui and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

if [ "$no_llama" = 0 ]; then
  .venv/bin/torbiz-tui build-llama
fi

# The Petals tests (tests/test_petals_env.py, tests/test_petals_cluster.py) run when this venv
# exists; about a minute once, then cached under ~/.cache/torbiz. A machine where it cannot be
# built (no python3.11, not x86-64) still runs every other test: those skip with the reason.
if [ "$test_tools" = 1 ]; then
  scripts/petals-env.sh || echo "setup: the Petals environment could not be built (see above);" \
    "the Petals tests will be skipped" >&2
fi
