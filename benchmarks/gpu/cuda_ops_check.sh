#!/usr/bin/env bash
# The device check of the CUDA kernels (issue 18), for a session lent a GPU: one short script.
# After benchmarks/gpu/setup.sh: rebuild the operator library with the CUDA kernels (EFA_CUDA=1),
# run their tests against the CPU operator, then the timing (results in benchmarks/results/).
#   bash benchmarks/gpu/cuda_ops_check.sh        (from the repository root)
set -euo pipefail
PY=$(command -v python3)
EFA_CUDA=1 "$PY" lammps_plugin/build.py -j 16 > /tmp/efa_cuda_build.log 2>&1 || { tail -60 /tmp/efa_cuda_build.log; exit 1; }
"$PY" -m pytest -q -x tests/test_cuda_ops.py tests/test_fused.py tests/test_fused_efa.py tests/test_gpu.py
"$PY" benchmarks/cuda_kernels.py
