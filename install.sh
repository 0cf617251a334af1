#!/usr/bin/env bash
# Installs qeq-ase and its dependencies into the active Python environment.
# torch is pinned: `pip install torch==2.13.0` takes the CPU build (an unpinned torch pulls a
# multi-GB CUDA build). torch-cluster compiles against that torch, so it is built without
# build isolation (about 8 minutes on 2 cores; skipped when already installed).
set -euo pipefail
python -m pip install --upgrade pip setuptools wheel
python -m pip install torch==2.13.0
python -c "import torch_cluster" 2>/dev/null || python -m pip install --no-build-isolation torch-cluster==1.6.3
python -m pip install ".[test,plot]"
