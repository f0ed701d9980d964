#!/usr/bin/env bash
# Creates (idempotently) the Python env used by tests/golden/make_golden.py.
# Only needed to regenerate tests/data/; the Rust tests never run Python.
set -euo pipefail
VENV="${SCALPEL_PYENV:-$HOME/.cache/scalpel/pyenv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q torch==2.11.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
