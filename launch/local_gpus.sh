#!/usr/bin/env bash
# One host, all its GPUs, one process: prints the device topology, then trains with each batch split over the GPUs.
#
#   launch/local_gpus.sh TRAIN_FLAGS...
#   e.g. launch/local_gpus.sh --config=configs/rdan.py:shapes --workdir=runs/rdan_gpus
#
# Run from the repository root. config.batch_size must be a multiple of the GPU count (128 is, for 1, 2, 4, 8).
# Needs a CUDA build of jax (e.g. pip install -U 'jax[cuda12]'), which this script does not install; JAX_PLATFORMS
# defaults to cuda so that a CPU-only jax fails here instead of training on the CPU (JAX_PLATFORMS=rocm for AMD).
# CUDA_VISIBLE_DEVICES chooses the GPUs; $PYTHON is the interpreter (default python).
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 TRAIN_FLAGS... (e.g. $0 --config=configs/rdan.py:shapes --workdir=runs/rdan_gpus)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L
fi
# jax's view of the devices (no GPU memory reserved for this look).
XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m xmatch_jax.parallel
exec "$PYTHON" -m xmatch_jax.train "$@"
