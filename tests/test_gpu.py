"""`pair_style efa device cuda`: the same numbers as the CPU path. Runs where torch sees a
CUDA GPU (benchmarks/gpu/setup.sh prepares such a machine); skipped elsewhere."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file

from helpers import REPO, jittered_cluster, randomised_model, static_run, write_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ELEMENTS = ["H", "C", "O"]


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def model_and_tolerance(request, tmp_path_factory):
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=3, cutoff=4.0, r_max=20.0,
                         num_vector_frequencies=2, value_vectors=2, value_tensors=2)
    path = tmp_path_factory.mktemp("gpu") / "efa.pt"
    save_model_file(randomised_model(config, dtype=request.param), config, path)
    return path, (1e-10 if request.param == torch.float64 else 2e-4)


@pytest.mark.parametrize("nprocs", [1, 2])
def test_cuda_equals_cpu(tmp_path, model_and_tolerance, nprocs):
    model, tol = model_and_tolerance
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    atoms = jittered_cluster(40)
    for sub in ("cpu", "gpu"):
        write_data(atoms, tmp_path / sub / "data.lmp", ELEMENTS)
    cpu = static_run(tmp_path / "cpu", model, ELEMENTS)
    gpu = static_run(tmp_path / "gpu", model, ELEMENTS, nprocs=nprocs, pair_args="device cuda")
    assert gpu.energy == pytest.approx(cpu.energy, rel=tol)
    np.testing.assert_allclose(gpu.forces, cpu.forces, rtol=0, atol=tol * np.abs(cpu.forces).max())


def periodic_runs(tmp_path, kspace: str, nprocs: int, device_args: str):
    """The shipped periodic model (in float64) on its 40-ion box, on the CPU at one rank and with
    `device_args` at nprocs ranks."""
    from efa_deploy.modelfile import convert_model_file

    model = tmp_path / "ionic_efa_f64.pt"
    convert_model_file(REPO / "export" / "periodic" / "ionic_efa.pt", model, dtype="float64")
    results = []
    for sub, args, ranks in (("cpu", "", 1), ("device", device_args, nprocs)):
        (tmp_path / sub).mkdir()
        shutil.copy(REPO / "examples" / "periodic" / "ionic40.data", tmp_path / sub / "data.lmp")
        results.append(static_run(tmp_path / sub, model, ["Cl", "Na"], nprocs=ranks, boundary="p p p",
                                  pair_args=f"{args} kspace {kspace}"))
    return results


@pytest.mark.parametrize("kspace", ["direct", "mesh"])
@pytest.mark.parametrize("nprocs", [1, 2])
def test_periodic_cuda_equals_cpu_with_the_virial(tmp_path, kspace, nprocs):
    cpu, gpu = periodic_runs(tmp_path, kspace, nprocs, "device cuda")
    assert gpu.energy == pytest.approx(cpu.energy, rel=1e-10)
    np.testing.assert_allclose(gpu.forces, cpu.forces, rtol=0, atol=1e-10 * np.abs(cpu.forces).max())
    np.testing.assert_allclose(gpu.virial, cpu.virial, rtol=0, atol=1e-9 * np.abs(cpu.virial).max())
