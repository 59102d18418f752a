#!/usr/bin/env bash
# Creates (or completes) the virtual environment in $VENV (default .venv) and installs
# model-workbench into it. Torch goes in first and pinned: unpinned, pip would pull a multi-GB
# CUDA build onto machines that have no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # A GPU machine: keep the user's CUDA torch if the venv has one, else take the default build.
    "$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install -q "torch==$TORCH_VERSION"
    EXTRA=gpu
else
    # TORCH_INDEX_URL points pip at the CPU wheel index (https://download.pytorch.org/whl/cpu) where
    # pip's own configuration does not already offer the CPU build of this torch version.
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
        $PIP install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
    fi
    EXTRA=cpu
fi
$PIP install -q -e ".[$EXTRA,dev,ray]"
"$VENV/bin/python" -c "import torch, onnxruntime, openvino, nncf, ray; print('model-workbench ready: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), '| openvino', openvino.__version__, openvino.Core().available_devices, '| nncf', nncf.__version__, '| ray', ray.__version__)"
