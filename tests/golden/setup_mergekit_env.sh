#!/usr/bin/env bash
# Adds mergekit to setup_env.sh's venv (idempotent), for tests/golden/make_mergekit.py.
# mergekit 0.1.5 accepts transformers 5.x, so it shares the venv: installing it adds packages
# and changes none of setup_env.sh's pins. Its dependencies are pinned too, for reproducibility.
# Only needed to regenerate tests/data/mergekit/; the Rust tests never run Python.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$HERE/setup_env.sh"
VENV="${SCALPEL_PYENV:-$HOME/.cache/scalpel/pyenv}"
"$VENV/bin/pip" install -q mergekit==0.1.5 \
    accelerate==1.15.0 peft==0.21.2 datasets==5.2.0 immutables==0.21 scipy==1.17.1 \
    sentencepiece==0.2.3 protobuf==7.36.2 pandas==3.1.1 pyarrow==26.0.1 dill==0.4.1 \
    multiprocess==0.70.19 xxhash==4.1.0 psutil==7.2.2 python-dateutil==4.0.0 tzdata==2026.6
"$VENV/bin/pip" check
"$VENV/bin/python" -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('mergekit', 'torch', 'transformers', 'safetensors')))"
