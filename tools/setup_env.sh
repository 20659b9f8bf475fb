# Sourced (not run) by examples/run_prism_tiny.sh and tests/run.sh: makes sure .venv exists,
# holds torch and this package, and activates it. Safe to source again: each step is skipped when
# already done, so a warm machine pays about a second.
#
# Order matters: torch==2.13.0 is installed before the package. That exact pin is satisfied by the
# CPU wheel this machine keeps locally (pip's find-links); installing the package first would let
# its "torch>=2.6" requirement pull the newest CUDA build from PyPI, several GB.
#
# GPU machines: a CUDA torch already installed is never replaced, and on a machine with an NVIDIA GPU
# and no CUDA torch the package is installed with the engine extra PRISM_GPU_EXTRA (default sglang;
# or vllm), which brings the torch that engine pins, instead of the CPU torch 2.13.
#
# Environment: PRISM_PYTHON picks the interpreter for a new .venv (default python3.11, else python3);
# PRISM_GPU_EXTRA the engine extra on a GPU machine (sglang | vllm; README "On a GPU cluster").

PRISM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRISM_TORCH_VERSION="2.13.0"

_prism_say() { echo "[setup] $*"; }

if [ ! -x "$PRISM_ROOT/.venv/bin/python" ]; then
    _prism_python="${PRISM_PYTHON:-$(command -v python3.11 || command -v python3)}"
    _prism_say "creating .venv with $_prism_python ($("$_prism_python" --version 2>&1))"
    "$_prism_python" -m venv "$PRISM_ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$PRISM_ROOT/.venv/bin/activate"

_prism_extras="test"
if python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    _prism_say "keeping the installed CUDA torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    _prism_extras="test,${PRISM_GPU_EXTRA:-sglang}"
    _prism_say "GPU machine: installing with the [${PRISM_GPU_EXTRA:-sglang}] extra (its pinned CUDA torch)"
elif [ "$(python -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])' 2>/dev/null)" != "$PRISM_TORCH_VERSION" ]; then
    _prism_say "installing torch==$PRISM_TORCH_VERSION (first, so the CPU wheel is used)"
    python -m pip install -q "torch==$PRISM_TORCH_VERSION"
fi

# Re-install the package only when setup.py changed (or it is not installed): an editable install
# already picks up every source change, and pip's resolver costs several seconds per call.
_prism_stamp="$PRISM_ROOT/.venv/.prism-setup-stamp"
_prism_want="$(cksum < "$PRISM_ROOT/setup.py") $_prism_extras"
if [ ! -f "$_prism_stamp" ] || [ "$(cat "$_prism_stamp")" != "$_prism_want" ] || ! command -v prism > /dev/null \
    || ! python -c 'import pytest_timeout' 2> /dev/null; then
    _prism_say "installing megatron_prism (editable) with extras [$_prism_extras]"
    # PYTHONWARNINGS only hushes setuptools' generic "editable installation" banner.
    PYTHONWARNINGS=ignore python -m pip install -q -e "$PRISM_ROOT[$_prism_extras]"
    echo "$_prism_want" > "$_prism_stamp"
fi
_prism_say "environment ready: $(python --version), torch $(python -c 'import torch; print(torch.__version__)')"
unset _prism_python _prism_stamp _prism_want _prism_extras
