# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The virtual environment and the C++ build are made once and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LIBS := efa_deploy/lib/libefa_ops.so efa_deploy/lib/libefa_pair.so efa_deploy/lib/efaplugin.so
# one thread per rank: ranks x threads above the core count is ten times slower
export OMP_NUM_THREADS ?= 1

.PHONY: all setup build test demo benchmark clean

all: build

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1" "cmake==4.1.2"
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet --no-build-isolation -c constraints.txt -e ".[test,periodic-data]"
	touch $(STAMP)

setup: $(STAMP)

$(LIBS) &: $(STAMP) $(wildcard ops/*.cpp ops/*.h ops/CMakeLists.txt lammps_plugin/*.cpp lammps_plugin/*.h lammps_plugin/*.in lammps_plugin/CMakeLists.txt lammps_plugin/build.py) efa_deploy/model_schema.json
	$(PY) lammps_plugin/build.py

build: $(LIBS)

test: build
	$(PY) -m pytest -q

demo: build
	$(PY) examples/demo.py

benchmark: build
	$(PY) benchmarks/efa_scaling.py

clean:
	rm -rf build $(LIBS)
