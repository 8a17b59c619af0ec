#!/usr/bin/env bash
# Build a working Petals environment in a venv of its own: THE one recipe (see docs/petals.md).
#
#   scripts/petals-env.sh [VENV_DIR]     default: $TORBIZ_PETALS_VENV or ~/.cache/torbiz/petals-venv
#
# Idempotent: a finished venv carries a stamp naming this recipe; a second run sees it and returns
# at once. A run that stopped halfway resumes in the same venv. Nothing is mocked and nothing is
# downloaded at build time but packages from the package index.
#
# petals==2.2.0.post1 does not install with a plain `pip install petals` on Python 3.11 + torch
# 2.13; it needs these five fixes (why each: docs/petals.md):
#   1. hivemind 1.1.10.post2 (pinned by petals) is an sdist whose setup.py imports pkg_resources:
#      build it with setuptools<81, without build isolation.
#   2. its setup.py downloads p2pd from GitHub while building: take the static x86-64 p2pd out of
#      the hivemind 1.1.12 wheel on the package index instead, put it into the 1.1.10.post2 tree
#      and make setup.py's sha256 check name that binary, then build a wheel from the tree.
#   3. torch >= 2.3: hivemind/optim/grad_scaler.py must import from torch.amp.grad_scaler.
#   4. accelerate<0.32 (newer wants a huggingface_hub that petals' tokenizers forbid).
#   5. multiaddr==0.0.9 (with newer multiaddr the DHT works but every inference fails with
#      `Connection lost` retries).
# torch is pinned to 2.13.0 and installed FIRST: on these machines that takes a local CPU build,
# while an unpinned torch would pull gigabytes of CUDA wheels.
#
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
#              TORBIZ_PETALS_WHEELS (where the built hivemind wheel is kept, default
#              <venv's parent>/petals-wheels; copy it to other nodes to skip the build).
set -euo pipefail

RECIPE="torbiz-petals-env r1: petals==2.2.0.post1 hivemind==1.1.10.post2(+p2pd from 1.1.12, amp fix) torch==2.13.0 accelerate<0.32 multiaddr==0.0.9"
TORCH_REQ="torch==2.13.0"
PETALS_REQ="petals==2.2.0.post1"
HIVEMIND_VERSION="1.1.10.post2"
P2PD_DONOR_VERSION="1.1.12"
# sha256 of hivemind/hivemind_cli/p2pd inside hivemind-1.1.12-py3-none-manylinux2014_x86_64.whl
P2PD_SHA256="42f8f48e62583b97cdba3c31439c08029fb2b9fc506b5bdd82c46b7cc1d279d8"

VENV=${1:-${TORBIZ_PETALS_VENV:-$HOME/.cache/torbiz/petals-venv}}
VENV=$(realpath -m -- "$VENV")
STAMP="$VENV/.torbiz-petals-env"
WHEELS=${TORBIZ_PETALS_WHEELS:-$(dirname "$VENV")/petals-wheels}
LOG="$VENV.log"
T0=$(date +%s)

say() { printf 'petals-env [%3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'petals-env: ERROR: %s\n' "$*" >&2; exit 1; }

if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$RECIPE" ]; then
  say "already built: $VENV ($(sed -n 2p "$STAMP"))"
  exit 0
fi

mkdir -p "$(dirname "$VENV")" "$WHEELS"
# One build per venv at a time: a second run waits for the first, then sees its stamp.
exec 9>"$VENV.lock"
if ! flock -n 9; then
  say "another run is building $VENV; waiting for it"
  flock 9
fi
if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$RECIPE" ]; then
  say "already built: $VENV (by the run we waited for)"
  exit 0
fi

: >"$LOG"
# Run a pip step: stream its progress lines (Collecting/Building/Successfully), keep everything in
# the log, and on failure show the log's tail with the step's name.
pipstep() {
  local what=$1; shift
  say "$what"
  echo "---- $what" >>"$LOG"
  set +o pipefail
  PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1 "$VPY" -m pip "$@" 2>&1 | tee -a "$LOG" \
    | grep --line-buffered -E '^ *(Collecting|Building wheel|Successfully|Saved|ERROR)' \
    | cut -c1-200 | sed -u 's/^ */    /'
  local rc=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$rc" != 0 ]; then
    tail -n 40 "$LOG" >&2
    die "$what failed (pip exit $rc; full log: $LOG)"
  fi
}

# ---- 0. preconditions ----------------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
fi
command -v "$PY" >/dev/null || die "no Python interpreter '$PY' (set PYTHON=...)"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYVER" = "3.11" ] || say "WARNING: Python $PYVER, the recipe was measured with 3.11 (torch 2.13.0 for this Python may come from the index as a large CUDA build)"
ARCH=$(uname -m)
[ "$ARCH" = "x86_64" ] || die "p2pd is taken from an x86-64 wheel; this machine is $ARCH (build p2pd with Go for it)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY has no venv/ensurepip module (apt-get install python3-venv)"
say "recipe: $RECIPE"
say "venv: $VENV   wheels: $WHEELS   log: $LOG"

# ---- 1. the venv ---------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "step 1/7: creating the venv with $PY ($PYVER)"
  "$PY" -m venv "$VENV"
else
  say "step 1/7: venv exists, resuming in it"
fi
VPY="$VENV/bin/python"

# Constraints for every install below (fixes 4 and 5, and torch never replaced).
CONSTRAINTS="$VENV/torbiz-petals-constraints.txt"
cat >"$CONSTRAINTS" <<EOF
$TORCH_REQ
hivemind==$HIVEMIND_VERSION
accelerate<0.32
multiaddr==0.0.9
setuptools<81
EOF

# ---- 2. torch first ------------------------------------------------------------------------------
if "$VPY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  say "step 2/7: $TORCH_REQ already installed"
else
  pipstep "step 2/7: installing $TORCH_REQ (first, pinned: a local CPU build here)" \
    install "$TORCH_REQ"
fi
say "    torch $("$VPY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>>"$LOG")"

# ---- 3. build tools for hivemind's setup.py (fix 1) ----------------------------------------------
pipstep "step 3/7: build tools: setuptools<81 (setup.py imports pkg_resources), wheel, grpcio-tools" \
  install -c "$CONSTRAINTS" "setuptools<81" wheel "grpcio-tools>=1.33.2"

# ---- 4. the hivemind wheel (fixes 1, 2, 3) -------------------------------------------------------
HM_WHEEL=$(ls "$WHEELS"/hivemind-"$HIVEMIND_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$HM_WHEEL" ] && [ -f "$HM_WHEEL.torbiz-ok" ]; then
  say "step 4/7: reusing the patched hivemind wheel $HM_WHEEL"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/torbiz-petals-build.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  pipstep "step 4/7: downloading the hivemind $HIVEMIND_VERSION sdist (setup.py runs with setuptools<81)" \
    download --no-deps --no-build-isolation --no-binary hivemind -d "$WORK/dl" \
    "hivemind==$HIVEMIND_VERSION"
  pipstep "step 4/7: downloading the hivemind $P2PD_DONOR_VERSION x86-64 wheel (donor of p2pd)" \
    download --no-deps --only-binary :all: -d "$WORK/donor" "hivemind==$P2PD_DONOR_VERSION"
  say "step 4/7: patching the hivemind $HIVEMIND_VERSION tree"
  "$VPY" - "$WORK" "$HIVEMIND_VERSION" "$P2PD_SHA256" <<'PYEOF'
import glob, hashlib, os, re, sys, tarfile, zipfile

work, version, want_sha = sys.argv[1], sys.argv[2], sys.argv[3]
(sdist,) = glob.glob(os.path.join(work, "dl", f"hivemind-{version}.tar.gz"))
with tarfile.open(sdist) as tar:
    try:
        tar.extractall(os.path.join(work, "src"), filter="data")
    except TypeError:  # a Python without extraction filters
        tar.extractall(os.path.join(work, "src"))
tree = os.path.join(work, "src", f"hivemind-{version}")

# fix 2: p2pd from the donor wheel, checked against the sha256 this recipe was measured with
(donor,) = glob.glob(os.path.join(work, "donor", "hivemind-*manylinux*x86_64.whl"))
with zipfile.ZipFile(donor) as zf:
    p2pd = zf.read("hivemind/hivemind_cli/p2pd")
got = hashlib.sha256(p2pd).hexdigest()
if got != want_sha:
    sys.exit(f"p2pd in {os.path.basename(donor)} has sha256 {got}, expected {want_sha}")
dest = os.path.join(tree, "hivemind", "hivemind_cli", "p2pd")
with open(dest, "wb") as f:
    f.write(p2pd)
os.chmod(dest, 0o755)
setup_py = os.path.join(tree, "setup.py")
text = open(setup_py).read()
text, n = re.subn(r'("p2pd-linux-amd64":\s*")[0-9a-f]{64}(")', rf"\g<1>{got}\g<2>", text)
if n != 1:
    sys.exit("setup.py: the p2pd-linux-amd64 sha256 entry was not found")
open(setup_py, "w").write(text)
print(f"    p2pd ({len(p2pd)} bytes, sha256 {got[:16]}...) placed, setup.py's check updated")

# fix 3: torch >= 2.3 moved GradScaler's internals to torch.amp
gs = os.path.join(tree, "hivemind", "optim", "grad_scaler.py")
text = open(gs).read()
old = ("from torch.cuda.amp import GradScaler as TorchGradScaler\n"
       "from torch.cuda.amp.grad_scaler import OptState, _refresh_per_optimizer_state\n")
new = ("from torch.amp import GradScaler as TorchGradScaler\n"
       "from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state\n")
if old not in text:
    sys.exit("grad_scaler.py: the torch.cuda.amp imports were not found")
open(gs, "w").write(text.replace(old, new))
print("    optim/grad_scaler.py now imports from torch.amp")
PYEOF
  pipstep "step 4/7: building the hivemind wheel (no network: p2pd is already in place)" \
    wheel --no-deps --no-build-isolation -w "$WORK/wheel" "$WORK/src/hivemind-$HIVEMIND_VERSION"
  BUILT=$(ls "$WORK"/wheel/hivemind-"$HIVEMIND_VERSION"-*.whl)
  "$VPY" - "$BUILT" "$P2PD_SHA256" <<'PYEOF' || die "the built hivemind wheel lacks the expected p2pd"
import hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf:
    assert hashlib.sha256(zf.read("hivemind/hivemind_cli/p2pd")).hexdigest() == sys.argv[2]
PYEOF
  rm -f "$WHEELS"/hivemind-"$HIVEMIND_VERSION"-*.whl*
  cp "$BUILT" "$WHEELS/"
  HM_WHEEL="$WHEELS/$(basename "$BUILT")"
  touch "$HM_WHEEL.torbiz-ok"
  say "    built $HM_WHEEL"
fi

# ---- 5. petals with its pins and the constraints (fixes 4, 5) ------------------------------------
pipstep "step 5/7: installing $PETALS_REQ with the patched hivemind, accelerate<0.32, multiaddr==0.0.9" \
  install -c "$CONSTRAINTS" "$HM_WHEEL" "$PETALS_REQ"

# ---- 6. checks -----------------------------------------------------------------------------------
say "step 6/7: checking the environment"
"$VPY" -m pip check >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "pip check found conflicts (log: $LOG)"; }
VERSIONS=$("$VPY" - <<'PYEOF'
import os, subprocess, importlib.metadata as md
import warnings
warnings.simplefilter("ignore")
import torch, hivemind, petals, transformers  # noqa: F401  (bitsandbytes imports on CPU too)
import bitsandbytes  # noqa: F401
from hivemind.optim.grad_scaler import GradScaler  # noqa: F401  (fix 3)
p2pd = os.path.join(os.path.dirname(hivemind.__file__), "hivemind_cli", "p2pd")
assert os.access(p2pd, os.X_OK), f"{p2pd} is missing or not executable"
out = subprocess.run([p2pd, "-h"], capture_output=True, text=True, timeout=20)
assert "listen" in (out.stdout + out.stderr).lower(), "p2pd -h printed nothing useful"
names = ["petals", "hivemind", "torch", "transformers", "accelerate", "multiaddr", "bitsandbytes",
         "tokenizers", "huggingface-hub", "pydantic", "protobuf"]
print("VERSIONS " + " ".join(f"{n}={md.version(n)}" for n in names))
PYEOF
) 2>>"$LOG" || { tail -n 20 "$LOG" >&2; die "the environment does not import (log: $LOG)"; }
# bitsandbytes prints its "compiled without GPU support" warning on stdout: keep it in the log
printf '%s\n' "$VERSIONS" | grep -v '^VERSIONS ' >>"$LOG" || true
VERSIONS=$(printf '%s\n' "$VERSIONS" | sed -n 's/^VERSIONS //p')
say "    $VERSIONS"

# ---- 7. stamp ------------------------------------------------------------------------------------
"$VPY" -m pip freeze >"$VENV/torbiz-petals-freeze.txt" 2>>"$LOG"
printf '%s\n%s\n' "$RECIPE" "$VERSIONS" >"$STAMP"
say "step 7/7: done: $VENV (python: $VPY; stamp: $STAMP)"
