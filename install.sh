#!/usr/bin/env bash
# Installs qeq-ase and its dependencies into the active Python environment.
#   bash install.sh                        qeq-ase, torch (CPU build), e3nn, ASE, matscipy, h5py, i-PI, pytest
#   bash install.sh --with-torch-cluster   also torch-cluster, an optional neighbour-list method
#                                          (compiled from source against torch: minutes on 2 cores)
# torch is pinned: `pip install torch==2.13.0` takes the CPU build (an unpinned torch pulls a
# multi-GB CUDA build). torch-cluster compiles against that torch, so it is built without build
# isolation, with ninja so that its files compile in parallel. The default neighbour list never
# needs it (docs/neighbor_lists.md).
set -euo pipefail
case "${1:-}" in
  "") with_cluster=0 ;;
  --with-torch-cluster) with_cluster=1 ;;
  *) echo "install.sh: unknown option '$1' (accepted: --with-torch-cluster)" >&2; exit 2 ;;
esac
python -m pip install --upgrade pip setuptools wheel
python -m pip install torch==2.13.0 "ninja>=1.10"
if [ "$with_cluster" = 1 ]; then
  python -c "import torch_cluster" 2>/dev/null || python -m pip install --no-build-isolation torch-cluster==1.6.3
fi
python -m pip install ".[test,plot,ipi]"
